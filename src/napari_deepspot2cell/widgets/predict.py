"""The "Predict expression" widget: slide + cells + checkpoint -> painted cells in napari.

A thin face over :func:`napari_deepspot2cell.predict.iter_predict_cells`: it
picks the inputs (viewer layers or files), runs the job through
:mod:`.jobs` (progress bars, cancel, one-line errors) and adds the
results as the layers of :func:`.layers.prediction_layers` to the layers chosen
when Run was pressed. No science here.

Hugging Face tokens typed here go to ``huggingface_hub.login`` (its own token
store) and nowhere else: never into a layer, its metadata, the log or the AnnData.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from pathlib import Path

import numpy as np
from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..encoders import DEFAULT_ENCODER, describe_encoders
from ..encoders.device import DEVICES, describe_device, resolve_device
from ..errors import InputError
from ..progress import Progress
from . import jobs
from .layers import (
    META,
    UNCERTAINTY_PREFIX,
    add_prediction_layers,
    decorate,
    paint_gene,
)

__all__ = ["ArraySlide", "LayerPicker", "PredictWidget", "open_predict_widgets", "slide_from_layer"]

log = logging.getLogger(__name__)

#: every Predict widget alive (weakly held), for "Use in Predict" of the Train widget
_REGISTRY: weakref.WeakSet = weakref.WeakSet()


def open_predict_widgets(viewer=None) -> list[PredictWidget]:
    """The Predict widgets alive, those of ``viewer`` first when given."""
    alive = []
    for w in list(_REGISTRY):
        try:
            w.objectName()  # raises once the C++ widget is gone
        except RuntimeError:
            continue
        alive.append(w)
    if viewer is not None:
        alive.sort(key=lambda w: w.viewer is not viewer)
    return alive


# ---------------------------------------------------------------- slides from layers


class ArraySlide:
    """A :class:`~napari_deepspot2cell.io.slides.Slide`-like view of an in-memory RGB layer.

    ``levels``: (H, W, 3) uint8 arrays (numpy or dask), level 0 first;
    ``read_region`` pads with ``fill`` outside; ``identity()`` hashes a pixel
    sample (the whole level 0 when small) and the shape: the embedding cache key.
    """

    def __init__(self, levels, um_per_px: float, name: str = "layer"):
        self.levels = list(levels)
        self.um_per_px = float(um_per_px)
        self.name = str(name)
        self.path = None
        self._identity: dict | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.levels[0].shape[0]), int(self.levels[0].shape[1])

    def read_region(self, y0: int, x0: int, y1: int, x1: int, level: int = 0, fill: int = 255) -> np.ndarray:
        y0, x0, y1, x1 = (int(v) for v in (y0, x0, y1, x1))
        if y1 < y0 or x1 < x0:
            raise ValueError(f"empty or inverted window ({y0}, {x0}, {y1}, {x1})")
        out = np.full((y1 - y0, x1 - x0, 3), fill, dtype=np.uint8)
        arr = self.levels[level]
        h, w = int(arr.shape[0]), int(arr.shape[1])
        oy0, ox0, oy1, ox1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if oy0 < oy1 and ox0 < ox1:
            out[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = np.asarray(arr[oy0:oy1, ox0:ox1, :3])
        return out

    def identity(self) -> dict:
        if self._identity is None:
            h, w = self.shape
            digest = hashlib.sha256(repr((h, w, [list(lv.shape) for lv in self.levels])).encode())
            if h * w <= 2048 * 2048:
                digest.update(np.ascontiguousarray(self.read_region(0, 0, h, w)).tobytes())
            else:
                grid, side = 8, 64
                for i in range(grid):
                    for j in range(grid):
                        y, x = int((i + 0.5) * h / grid) - side // 2, int((j + 0.5) * w / grid) - side // 2
                        digest.update(self.read_region(y, x, y + side, x + side).tobytes())
            self._identity = {
                "layer": self.name,
                "shape": [h, w],
                "level_shapes": [list(lv.shape[:2]) for lv in self.levels],
                "um_per_px": self.um_per_px,
                "pixel_sha256": digest.hexdigest(),
            }
        return self._identity

    def close(self) -> None:  # the Slide interface; nothing to release
        pass


def _layer_info(layer) -> dict:
    info = getattr(layer, "metadata", {}).get(META)
    return info if isinstance(info, dict) else {}


def layer_um_per_px(layer, override: float | None = None) -> float:
    """um per level-0 px of an image layer: the override, the reader's record, else its scale."""
    if override:
        return float(override)
    recorded = _layer_info(layer).get("um_per_px")
    if recorded:
        return float(recorded)
    sy, sx = (float(v) for v in layer.scale[-2:])
    if abs(sy - sx) > 1e-6 * max(sy, sx):
        raise InputError(layer.name, f"the layer's pixels are not square (scale {sy:g} x {sx:g}); set um/px")
    return sx


def slide_from_layer(layer, um_per_px: float | None = None):
    """A Slide for an RGB Image layer: reopened from its file when the reader recorded one."""
    path = _layer_info(layer).get("path")
    if path and Path(path).is_file():
        from ..io.slides import open_slide

        return open_slide(path, um_per_px=layer_um_per_px(layer, um_per_px))
    if not getattr(layer, "rgb", False):
        raise InputError(layer.name, "not an RGB image layer; choose the H&E slide")
    levels = list(layer.data) if layer.multiscale else [layer.data]
    for lv in levels:
        if lv.ndim != 3 or lv.shape[-1] not in (3, 4):
            raise InputError(layer.name, f"expected an (H, W, 3) RGB image, got shape {tuple(lv.shape)}")
        if np.dtype(lv.dtype) != np.uint8:
            raise InputError(layer.name, f"expected 8-bit RGB (uint8), got {lv.dtype}")
    return ArraySlide(levels, layer_um_per_px(layer, um_per_px), name=layer.name)


def labels_from_layer(layer):
    """The level-0 label image of a Labels layer (lazy arrays stay lazy)."""
    return layer.data[0] if layer.multiscale else layer.data


def check_same_shape(slide, labels, labels_name: str) -> None:
    if tuple(int(s) for s in labels.shape[:2]) != tuple(slide.shape) or labels.ndim != 2:
        raise InputError(
            labels_name,
            f"the cell mask is {tuple(labels.shape)} px but the slide is {tuple(slide.shape)} px; "
            "they must have the same level-0 shape",
        )


# ---------------------------------------------------------------- small widgets


class LayerPicker(QComboBox):
    """A combo of the viewer's layers of one kind, kept in sync with ``viewer.layers``."""

    def __init__(self, viewer, kind, accept=None, parent=None):
        super().__init__(parent)
        self.viewer = viewer
        self.kind = kind
        self.accept = accept or (lambda layer: True)
        self._layers: list = []
        events = viewer.layers.events
        for name in ("inserted", "removed", "reordered", "moved"):
            getattr(events, name).connect(self.refresh)
        refresh = self.refresh
        self.destroyed.connect(lambda *_: _disconnect_layers(viewer, refresh))
        self.refresh()

    @property
    def layers(self) -> list:
        return list(self._layers)

    @property
    def layer(self):
        i = self.currentIndex()
        return self._layers[i] if 0 <= i < len(self._layers) else None

    def set_layer(self, layer) -> None:
        self.refresh()
        for i, ly in enumerate(self._layers):
            if ly is layer:
                self.setCurrentIndex(i)
                return
        raise ValueError(f"{getattr(layer, 'name', layer)!r} is not among the {self.kind.__name__} layers offered")

    def refresh(self, event=None) -> None:
        try:
            current = self.layer
            found = [ly for ly in self.viewer.layers if isinstance(ly, self.kind) and self.accept(ly)]
        except RuntimeError:  # the widget is being deleted
            return
        for ly in found:
            ly.events.name.connect(self._on_name)  # napari ignores a callback connected twice
        names = [ly.name for ly in found]
        if [id(x) for x in found] == [id(x) for x in self._layers] and names == [
            self.itemText(i) for i in range(self.count())
        ]:
            return
        self._layers = found
        self.blockSignals(True)
        self.clear()
        self.addItems(names)
        if current is not None and any(ly is current for ly in found):
            keep = next(i for i, ly in enumerate(found) if ly is current)
        else:
            keep = len(found) - 1  # the newest layer of this kind
        self.setCurrentIndex(keep)
        self.blockSignals(False)
        if self.layer is not current:
            self.currentIndexChanged.emit(self.currentIndex())

    def _on_name(self, event=None) -> None:
        self.refresh()


def _disconnect_layers(viewer, refresh) -> None:
    try:
        for name in ("inserted", "removed", "reordered", "moved"):
            getattr(viewer.layers.events, name).disconnect(refresh)
    except Exception:
        log.debug("could not disconnect from the viewer's layers", exc_info=True)


def _is_rgb_image(layer) -> bool:
    return bool(getattr(layer, "rgb", False))


def encoder_combo(parent=None) -> QComboBox:
    """Editable combo of the known encoders (default first); a timm name or a weights path may be typed."""
    combo = QComboBox(parent)
    combo.setEditable(True)
    for i, (name, description) in enumerate(describe_encoders()):
        combo.addItem(name)
        combo.setItemData(i, description, 3)  # Qt.ToolTipRole
    combo.setCurrentText(DEFAULT_ENCODER)
    combo.setToolTip("A preset, a timm model name (timm:NAME) or a local weights file/folder")
    return combo


def device_text(choice: str) -> str:
    try:
        return describe_device(resolve_device(choice))
    except InputError as exc:
        return f"unavailable: {exc.problem}"


def device_row(parent=None) -> tuple[QComboBox, QLabel]:
    combo = QComboBox(parent)
    combo.addItems(list(DEVICES))
    label = QLabel(device_text("auto"), parent)
    label.setWordWrap(True)
    combo.currentTextChanged.connect(lambda c: label.setText(device_text(c)))
    return combo, label


def file_row(edit: QLineEdit, *buttons: QPushButton) -> QHBoxLayout:
    row = QHBoxLayout()
    row.setContentsMargins(0, 0, 0, 0)
    row.addWidget(edit, 1)
    for b in buttons:
        row.addWidget(b)
    return row


def hf_login(token: str) -> None:
    """Store a Hugging Face token in huggingface_hub's token store (not git's)."""
    import huggingface_hub

    huggingface_hub.login(token=token, add_to_git_credential=False)


def add_opened_slide(viewer, path, um_per_px: float | None = None):
    """Open a slide file with the project's reader and add it as an Image layer (scale = um/px)."""
    from ..readers import read_slide

    data, meta, _ = read_slide(path, um_per_px=um_per_px)[0]
    return viewer.add_image(data, **meta)


def add_opened_mask(viewer, path, slide_layer, um_per_px: float | None = None):
    """Open a cell mask (labels, GeoJSON, centroids) for ``slide_layer`` and add it as Labels."""
    from ..io.masks import open_cells

    if slide_layer is None:
        raise InputError(path, "open or choose the slide first: the mask is read at its size")
    slide_shape = tuple(int(s) for s in (slide_layer.data[0] if slide_layer.multiscale else slide_layer.data).shape[:2])
    um = layer_um_per_px(slide_layer, um_per_px)
    mask = open_cells(path, slide_shape, um)
    return viewer.add_labels(
        mask.labels,
        name=Path(path).name,
        scale=tuple(slide_layer.scale[-2:]),
        translate=tuple(slide_layer.translate[-2:]),
        metadata={META: {"kind": "mask", "path": str(Path(path).resolve())}},
    )


# ---------------------------------------------------------------- the widget


class SlideAndMaskInputs:
    """What the Predict and Train widgets share: the slide and cell-mask inputs
    (layer pickers with Open... buttons, the pixel-size override) and starting,
    cancelling and finishing their one job.

    Needs ``viewer``, ``image_combo``, ``labels_combo``, ``um_per_px``,
    ``run_button``, ``cancel_button``, ``status``, ``running`` and the
    ``_on_result`` / ``_on_event`` / ``_on_cancelled`` callbacks."""

    cancel_message = "cancelling…"

    def _start(self, job, name: str):
        running = jobs.start_job(
            job, name=name,
            on_result=self._on_result, on_event=self._on_event, on_cancelled=self._on_cancelled,
            on_error=self._on_error, on_finished=self._on_finished,
        )
        if running is not None and not running.done:
            self.running = running
            self.run_button.setEnabled(False)
            self.cancel_button.setEnabled(True)
        return running

    def cancel(self) -> None:
        if self.running is not None and not self.running.done:
            self.running.cancel()
            self.status.setText(self.cancel_message)

    def _on_error(self, exc) -> None:
        self.status.setText(" ".join(str(exc).split()))

    def _on_finished(self, running) -> None:
        self.running = None
        try:
            self.run_button.setEnabled(True)
            self.cancel_button.setEnabled(False)
        except RuntimeError:  # the widget was closed meanwhile
            pass

    @property
    def image_layer(self):
        return self.image_combo.layer

    @property
    def labels_layer(self):
        return self.labels_combo.layer

    def _um_override(self) -> float | None:
        v = float(self.um_per_px.value())
        return v if v > 0 else None

    def open_slide_file(self, path=None):
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Open a slide", "", "Slides (*.svs *.tif *.tiff *.ome.tif *.png *.jpg *.jpeg);;All files (*)")
            if not path:
                return None
        try:
            layer = add_opened_slide(self.viewer, path, self._um_override())
        except InputError as exc:
            _show_error(str(exc))
            return None
        self.image_combo.set_layer(layer)
        return layer

    def open_mask_file(self, path=None):
        if path is None:
            path, _ = QFileDialog.getOpenFileName(self, "Open a cell mask", "", "Cell masks (*.tif *.tiff *.png *.npy *.geojson *.json *.csv *.parquet *.h5ad);;All files (*)")
            if not path:
                return None
        try:
            layer = add_opened_mask(self.viewer, path, self.image_layer, self._um_override())
        except InputError as exc:
            _show_error(str(exc))
            return None
        self.labels_combo.set_layer(layer)
        return layer


class PredictWidget(SlideAndMaskInputs, QWidget):
    """Dock widget "Predict expression"."""

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.last_result = None  # the AnnData of the last finished run
        self.last_layers: tuple = ()  # (expression Image, cells Labels[, uncertainty Image])
        self.running: jobs.RunningJob | None = None
        self._pending: dict | None = None

        self.image_combo = LayerPicker(napari_viewer, Image, _is_rgb_image, self)
        self.labels_combo = LayerPicker(napari_viewer, Labels, None, self)  # a predictions cells layer is the same mask
        self.open_slide_button = QPushButton("Open…")
        self.open_slide_button.setToolTip("Open a slide file (TIFF, OME-TIFF, SVS, PNG/JPEG)")
        self.open_mask_button = QPushButton("Open…")
        self.open_mask_button.setToolTip("Open a cell mask: label image, GeoJSON polygons")

        self.encoder = encoder_combo(self)
        self.token = QLineEdit()
        self.token.setEchoMode(QLineEdit.EchoMode.Password)
        self.token.setPlaceholderText("Hugging Face token (for gated models)")
        self.login_button = QPushButton("Log in")
        self.login_status = QLabel("")

        self.checkpoint = QLineEdit()
        self.checkpoint.setPlaceholderText("MODEL.ckpt")
        self.checkpoint_button = QPushButton("Browse…")
        self.device, self.device_label = device_row(self)

        self.batch_size = QSpinBox()
        self.batch_size.setRange(0, 4096)
        self.batch_size.setSpecialValueText("auto")
        self.um_per_px = QDoubleSpinBox()
        self.um_per_px.setDecimals(4)
        self.um_per_px.setRange(0.0, 100.0)
        self.um_per_px.setSingleStep(0.05)
        self.um_per_px.setSpecialValueText("from the slide")
        self.advanced = QCollapsible("Advanced")
        adv = QWidget()
        adv_form = QFormLayout(adv)
        adv_form.addRow("batch size", self.batch_size)
        adv_form.addRow("um / px", self.um_per_px)
        self.advanced.addWidget(adv)

        self.uncertainty = QCheckBox("add the uncertainty layer")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("slide", file_row_widget(self.image_combo, self.open_slide_button))
        form.addRow("cells", file_row_widget(self.labels_combo, self.open_mask_button))
        form.addRow("encoder", self.encoder)
        form.addRow("HF token", file_row_widget(self.token, self.login_button))
        form.addRow("", self.login_status)
        form.addRow("checkpoint", file_row_widget(self.checkpoint, self.checkpoint_button))
        form.addRow("device", self.device)
        form.addRow("", self.device_label)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.advanced)
        layout.addWidget(self.uncertainty)
        buttons = QHBoxLayout()
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.cancel_button)
        layout.addLayout(buttons)
        layout.addWidget(self.status)
        layout.addStretch(1)

        self.open_slide_button.clicked.connect(lambda: self.open_slide_file())
        self.open_mask_button.clicked.connect(lambda: self.open_mask_file())
        self.checkpoint_button.clicked.connect(lambda: self.browse_checkpoint())
        self.login_button.clicked.connect(self.log_in)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.uncertainty.toggled.connect(self._on_uncertainty)
        _REGISTRY.add(self)

    # ------------------------------------------------------------ inputs

    def set_checkpoint(self, path) -> None:
        self.checkpoint.setText(str(path))

    def browse_checkpoint(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "DeepSpot2Cell checkpoint", "", "Checkpoints (*.ckpt *.pt *.pth);;All files (*)")
        if path:
            self.set_checkpoint(path)

    def log_in(self) -> None:
        token = self.token.text().strip()
        self.token.clear()  # the token leaves the widget at once, whatever happens next
        if not token:
            _show_error("type a Hugging Face token first (huggingface.co/settings/tokens)")
            return
        try:
            hf_login(token)
        except Exception as exc:  # noqa: BLE001 - never echo the token back
            message = " ".join(str(exc).replace(token, "***").split())
            self.login_status.setText("not logged in")
            _show_error(f"Hugging Face login failed: {message}")
            return
        finally:
            token = None
        self.login_status.setText("logged in to Hugging Face (token stored by huggingface_hub)")

    # ------------------------------------------------------------ run

    def run(self):
        """Start predicting on the layers chosen now; returns the running job (None if refused)."""
        image_layer, labels_layer = self.image_layer, self.labels_layer
        if image_layer is None or labels_layer is None:
            _show_error("choose (or open) the slide and the cell mask first")
            return None
        ckpt_path = self.checkpoint.text().strip()
        if not ckpt_path:
            _show_error("choose a DeepSpot2Cell checkpoint (.ckpt) first")
            return None
        if jobs.current_job() is not None:
            _show_error(jobs.BUSY_MESSAGE)
            return None
        try:
            slide = slide_from_layer(image_layer, self._um_override())
            labels = labels_from_layer(labels_layer)
            check_same_shape(slide, labels, labels_layer.name)
        except InputError as exc:
            _show_error(str(exc))
            return None
        pending = {
            "image_layer": image_layer,
            "labels_layer": labels_layer,
            "labels_data": labels_layer.data,  # the pyramid as shown, for painting
            "scale": tuple(float(v) for v in image_layer.scale[-2:]),
            "translate": tuple(float(v) for v in image_layer.translate[-2:]),
            "uncertainty": self.uncertainty.isChecked(),
        }
        mask_path = _layer_info(labels_layer).get("path")
        source = {
            "image": str(getattr(slide, "path", "") or ""),
            "labels": str(mask_path or ""),
            "checkpoint": str(Path(ckpt_path).resolve()),
        }
        job = _predict_job(
            slide, labels, ckpt_path, self.encoder.currentText().strip() or DEFAULT_ENCODER,
            device=self.device.currentText(), batch_size=int(self.batch_size.value()) or None, source=source,
        )
        self._pending = pending
        self.status.setText("running…")
        return self._start(job, "DeepSpot2Cell predict")

    def _on_event(self, event: Progress) -> None:
        total = f"/{event.total}" if event.total else ""
        rate = event.info.get("tiles_per_s") if event.info else None
        self.status.setText(f"{event.stage}: {event.done}{total}" + (f" ({rate:.1f} tiles/s)" if rate else ""))

    def _on_result(self, adata) -> None:
        p = self._pending
        viewer = self.viewer
        image, cells = add_prediction_layers(viewer, adata, p["labels_data"], scale=p["scale"], translate=p["translate"])
        added = [image, cells]
        if p["uncertainty"]:
            unc = self._add_uncertainty(cells, adata)
            if unc is not None:
                added.append(unc)
        self.last_result = adata
        self.last_layers = tuple(added)
        self.status.setText(f"predicted {adata.n_vars} genes for {adata.n_obs} cells")

    def _on_cancelled(self) -> None:
        self.status.setText("cancelled; no layers were added")

    def _on_finished(self, running) -> None:
        self._pending = None
        super()._on_finished(running)

    # ------------------------------------------------------------ uncertainty

    def _add_uncertainty(self, cells, adata):
        if adata is None or "uncertainty" not in adata.layers:
            return None
        info = _layer_info(cells)
        gene = info.get("gene") or str(adata.var_names[0])
        levels = list(cells.data) if cells.multiscale else [cells.data]
        painted, _, limits = paint_gene(adata, gene, levels, "uncertainty")
        layer = self.viewer.add_image(
            painted if cells.multiscale else painted[0],
            multiscale=cells.multiscale,
            name=UNCERTAINTY_PREFIX + gene,
            colormap="viridis",
            contrast_limits=limits,
            blending="translucent",
            scale=cells.scale,
            translate=cells.translate,
            metadata={META: {"kind": "uncertainty", "key": info.get("key"), "gene": gene, "source": "uncertainty"}},
        )
        decorate(image_layer=layer, viewer=self.viewer)
        order = list(self.viewer.layers)
        self.viewer.layers.move(order.index(layer), order.index(cells))  # keep the outlines on top
        return layer

    def _uncertainty_layer(self):
        if len(self.last_layers) < 2:
            return None
        key = _layer_info(self.last_layers[1]).get("key")
        return next(
            (ly for ly in self.viewer.layers if _layer_info(ly).get("key") == key and _layer_info(ly).get("kind") == "uncertainty"),
            None,
        )

    def _on_uncertainty(self, checked: bool) -> None:
        """Toggled after a run: add or remove the last result's uncertainty layer."""
        if self.running is not None or self.last_result is None or len(self.last_layers) < 2:
            return
        cells = self.last_layers[1]
        if cells not in self.viewer.layers:
            return
        existing = self._uncertainty_layer()
        if checked and existing is None:
            self._add_uncertainty(cells, self.last_result)
        elif not checked and existing is not None:
            self.viewer.layers.remove(existing)


def file_row_widget(main: QWidget, *buttons: QPushButton) -> QWidget:
    w = QWidget()
    w.setLayout(file_row(main, *buttons))
    return w


def _show_error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def _predict_job(slide, labels, checkpoint, encoder_name, *, device, batch_size, source):
    """Job: load the checkpoint and the encoder (in the worker), then predict every cell."""
    from ..encoders import get_encoder
    from ..model.checkpoint import load_checkpoint
    from ..predict import iter_predict_cells

    yield Progress("opening", 0, 2)
    ckpt = load_checkpoint(checkpoint)
    yield Progress("opening", 1, 2, {"checkpoint": str(checkpoint)})
    encoder = get_encoder(encoder_name)
    yield Progress("opening", 2, 2, {"encoder": encoder.id})
    adata = yield from iter_predict_cells(
        slide, labels, ckpt, encoder, device=device, batch_size=batch_size, source=source,
    )
    return adata
