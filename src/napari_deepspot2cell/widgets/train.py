"""The "Train DeepSpot2Cell" widget: spot data + slide + cells -> a checkpoint, with a live loss plot.

A thin face over :func:`napari_deepspot2cell.train.iter_train` run through
:mod:`.jobs`: the inputs are viewer layers (or files opened into layers), the
training and validation loss are plotted per epoch as the job's
``Progress("training", ...)`` events arrive, the final metrics land in a
small table, and "Use in Predict" hands the new checkpoint to a Predict widget.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from napari.layers import Image, Labels
from qtpy.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QPushButton,
    QSizePolicy,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)
from superqt import QCollapsible

from ..encoders import DEFAULT_ENCODER
from ..errors import InputError
from ..progress import Progress
from . import jobs
from .predict import (
    LayerPicker,
    SlideAndMaskInputs,
    _is_rgb_image,
    _show_error,
    check_same_shape,
    device_row,
    encoder_combo,
    file_row_widget,
    labels_from_layer,
    open_predict_widgets,
    slide_from_layer,
)

__all__ = ["TrainWidget", "default_output", "metrics_rows"]


def default_output(spots) -> Path:
    """MODEL.ckpt next to the spot data: beside an .h5ad, inside a Space Ranger folder."""
    p = Path(spots)
    if p.is_dir():
        return p / "deepspot2cell.ckpt"
    return p.with_name(p.name.split(".")[0] + ".deepspot2cell.ckpt")


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def metrics_rows(m: dict) -> list[tuple[str, str]]:
    """(what, value) rows of a training's metrics, for the table."""
    rows = [
        ("best epoch", f"{_fmt(m.get('best_epoch'))} of {_fmt(m.get('epochs_run'))} ({m.get('stopped', '?')})"),
    ]
    spot = m.get("spot") or {}
    for split in ("validation", "train"):
        s = spot.get(split) or {}
        rows.append((f"spot Pearson, {split}", f"{_fmt(s.get('mean_pearson'))} ({_fmt(s.get('n_rows'))} spots)"))
    cell = m.get("cell") or {}
    for scope in ("validation", "all"):
        for where in ("inside", "outside"):
            c = (cell.get(scope) or {}).get(where)
            if not c:
                continue
            model, base = c.get("model") or {}, c.get("baseline") or {}
            rows.append((f"cell Pearson, {scope} spots, {where}",
                         f"{_fmt(model.get('mean_pearson'))} (nearest spot {_fmt(base.get('mean_pearson'))})"))
    return rows


class LossPlot(QWidget):
    """Training and validation loss per epoch (matplotlib in Qt), redrawn on each epoch."""

    def __init__(self, parent=None):
        super().__init__(parent)
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(3.2, 2.0), layout="constrained")
        self.ax = self.figure.add_subplot(111)
        self.canvas = FigureCanvasQTAgg(self.figure)
        self.canvas.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.canvas.setFixedHeight(180)
        (self.train_line,) = self.ax.plot([], [], "o-", ms=3, label="training")
        (self.val_line,) = self.ax.plot([], [], "o-", ms=3, label="validation")
        self.ax.set_xlabel("epoch")
        self.ax.set_ylabel("MSE")
        self.ax.legend(loc="upper right", fontsize="small")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(self.canvas)
        self.clear()

    def clear(self) -> None:
        self.epochs: list[int] = []
        self.train: list[float] = []
        self.val: list[float] = []
        self._redraw()

    def add(self, epoch: int, train_loss: float, val_loss: float | None) -> None:
        self.epochs.append(int(epoch))
        self.train.append(float(train_loss))
        self.val.append(float("nan") if val_loss is None else float(val_loss))
        self._redraw()

    def _redraw(self) -> None:
        self.train_line.set_data(self.epochs, self.train)
        self.val_line.set_data(self.epochs, self.val)
        self.ax.relim()
        self.ax.autoscale_view()
        self.canvas.draw_idle()


class TrainWidget(SlideAndMaskInputs, QWidget):
    """Dock widget "Train DeepSpot2Cell"."""

    cancel_message = "cancelling… (the best model so far is kept)"

    def __init__(self, napari_viewer, parent=None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.running: jobs.RunningJob | None = None
        self.last_result = None  # TrainResult of the last finished run
        self.last_checkpoint: Path | None = None  # also set after a cancel that saved the best model
        self._out_edited = False
        self._started_at = 0.0
        self._out_at_press: Path | None = None

        self.image_combo = LayerPicker(napari_viewer, Image, _is_rgb_image, self)
        self.labels_combo = LayerPicker(napari_viewer, Labels, None, self)  # a predictions cells layer is the same mask
        self.open_slide_button = QPushButton("Open…")
        self.open_mask_button = QPushButton("Open…")
        self.spots = QLineEdit()
        self.spots.setPlaceholderText("spots .h5ad or a Space Ranger folder")
        self.spots_file_button = QPushButton("File…")
        self.spots_folder_button = QPushButton("Folder…")
        self.encoder = encoder_combo(self)
        self.output = QLineEdit()
        self.output.setPlaceholderText("MODEL.ckpt (default: next to the spot data)")
        self.output_button = QPushButton("Save as…")
        self.device, self.device_label = device_row(self)

        self.aggregate = QComboBox()
        self.aggregate.addItems(["counts", "codes"])
        self.aggregate.setToolTip("counts: sum the cells' rates in count space (default); codes: the reference")
        self.max_epochs = QSpinBox()
        self.max_epochs.setRange(1, 10000)
        self.max_epochs.setValue(100)
        self.patience = QSpinBox()
        self.patience.setRange(1, 1000)
        self.patience.setValue(5)
        self.val_fraction = QDoubleSpinBox()
        self.val_fraction.setRange(0.0, 0.9)
        self.val_fraction.setSingleStep(0.05)
        self.val_fraction.setValue(0.2)
        self.n_ensemble = QSpinBox()
        self.n_ensemble.setRange(1, 100)
        self.n_ensemble.setValue(10)
        self.hidden = QSpinBox()
        self.hidden.setRange(4, 8192)
        self.hidden.setValue(512)
        self.lr = QLineEdit("1e-4")
        self.seed = QSpinBox()
        self.seed.setRange(0, 2**31 - 1)
        self.seed.setValue(0)
        self.um_per_px = QDoubleSpinBox()
        self.um_per_px.setDecimals(4)
        self.um_per_px.setRange(0.0, 100.0)
        self.um_per_px.setSpecialValueText("from the slide")
        self.advanced = QCollapsible("Hyper-parameters")
        adv = QWidget()
        f = QFormLayout(adv)
        f.addRow("aggregate", self.aggregate)
        f.addRow("max epochs", self.max_epochs)
        f.addRow("patience", self.patience)
        f.addRow("validation fraction", self.val_fraction)
        f.addRow("ensemble size", self.n_ensemble)
        f.addRow("hidden size", self.hidden)
        f.addRow("learning rate", self.lr)
        f.addRow("seed", self.seed)
        f.addRow("um / px", self.um_per_px)
        self.advanced.addWidget(adv)

        self.run_button = QPushButton("Train")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.plot = LossPlot(self)
        self.metrics_table = QTableWidget(0, 2)
        self.metrics_table.setHorizontalHeaderLabels(["metric", "value"])
        self.metrics_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.metrics_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.metrics_table.verticalHeader().setVisible(False)
        self.use_button = QPushButton("Use in Predict")
        self.use_button.setEnabled(False)

        form = QFormLayout()
        form.addRow("slide", file_row_widget(self.image_combo, self.open_slide_button))
        form.addRow("cells", file_row_widget(self.labels_combo, self.open_mask_button))
        form.addRow("spots", file_row_widget(self.spots, self.spots_file_button, self.spots_folder_button))
        form.addRow("encoder", self.encoder)
        form.addRow("output", file_row_widget(self.output, self.output_button))
        form.addRow("device", self.device)
        form.addRow("", self.device_label)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.advanced)
        row = QHBoxLayout()
        row.addWidget(self.run_button)
        row.addWidget(self.cancel_button)
        layout.addLayout(row)
        layout.addWidget(self.status)
        layout.addWidget(self.plot)
        layout.addWidget(self.metrics_table)
        layout.addWidget(self.use_button)
        layout.addStretch(1)

        self.open_slide_button.clicked.connect(lambda: self.open_slide_file())
        self.open_mask_button.clicked.connect(lambda: self.open_mask_file())
        self.spots_file_button.clicked.connect(lambda: self._browse_spots(folder=False))
        self.spots_folder_button.clicked.connect(lambda: self._browse_spots(folder=True))
        self.output_button.clicked.connect(self._browse_output)
        self.spots.textChanged.connect(self._on_spots_changed)
        self.output.textEdited.connect(lambda *_: setattr(self, "_out_edited", True))
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.use_button.clicked.connect(self.use_in_predict)

    # ------------------------------------------------------------ inputs

    def set_spots(self, path) -> None:
        self.spots.setText(str(path))

    def _browse_spots(self, folder: bool) -> None:
        if folder:
            path = QFileDialog.getExistingDirectory(self, "Space Ranger output folder")
        else:
            path, _ = QFileDialog.getOpenFileName(self, "Spot data", "", "AnnData (*.h5ad);;All files (*)")
        if path:
            self.set_spots(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the model as", self.output.text(), "Checkpoints (*.ckpt)")
        if path:
            self._out_edited = True
            self.output.setText(path if path.endswith(".ckpt") else path + ".ckpt")

    def _on_spots_changed(self, text: str) -> None:
        if text.strip() and not self._out_edited:
            self.output.setText(str(default_output(text.strip())))

    # ------------------------------------------------------------ run

    def run(self):
        """Start training on the inputs chosen now; returns the running job (None if refused)."""
        from ..train import TrainInput, iter_train

        image_layer, labels_layer = self.image_layer, self.labels_layer
        spots = self.spots.text().strip()
        if image_layer is None or labels_layer is None:
            _show_error("choose (or open) the slide and the cell mask first")
            return None
        if not spots:
            _show_error("choose the spot data (.h5ad or a Space Ranger folder) first")
            return None
        if jobs.current_job() is not None:
            _show_error(jobs.BUSY_MESSAGE)
            return None
        out = Path(self.output.text().strip() or default_output(spots))
        try:
            if not os.path.exists(spots):
                raise InputError(spots, "no such file or folder")
            try:
                lr = float(self.lr.text())
            except ValueError:
                raise InputError(None, f"learning rate must be a number, got {self.lr.text()!r}") from None
            if not (math.isfinite(lr) and lr > 0):
                raise InputError(None, f"learning rate must be positive, got {lr}")
            slide = slide_from_layer(image_layer, self._um_override())
            labels = labels_from_layer(labels_layer)
            check_same_shape(slide, labels, labels_layer.name)
        except InputError as exc:
            _show_error(str(exc))
            return None
        inp = TrainInput(image=slide, labels=labels, spots=spots, name=image_layer.name)
        job = iter_train(
            [inp], out, encoder=self.encoder.currentText().strip() or DEFAULT_ENCODER,
            aggregate=self.aggregate.currentText(), val_fraction=float(self.val_fraction.value()),
            max_epochs=int(self.max_epochs.value()), patience=int(self.patience.value()), lr=lr,
            n_ensemble=int(self.n_ensemble.value()), phi2rho_size=int(self.hidden.value()),
            seed=int(self.seed.value()), device=self.device.currentText(),
        )
        self.plot.clear()
        self.metrics_table.setRowCount(0)
        self.use_button.setEnabled(False)
        self.last_result = None
        self.last_checkpoint = None
        self._started_at = time.time()
        self._out_at_press = out
        self.status.setText("training…")
        return self._start(job, "DeepSpot2Cell train")

    def _on_event(self, event: Progress) -> None:
        if event.stage == "training":
            i = event.info or {}
            self.plot.add(i.get("epoch", event.done), i.get("train_loss", float("nan")), i.get("val_loss"))
            val = i.get("val_loss")
            self.status.setText(
                f"epoch {event.done}/{event.total}: training loss {i.get('train_loss', float('nan')):.4f}, "
                f"validation loss {'-' if val is None else f'{val:.4f}'}"
            )
        else:
            total = f"/{event.total}" if event.total else ""
            self.status.setText(f"{event.stage}: {event.done}{total}")

    def _on_result(self, result) -> None:
        self.last_result = result
        self.last_checkpoint = Path(result.checkpoint)
        self._show_metrics(result.metrics)
        self.use_button.setEnabled(True)
        self.status.setText(f"wrote {result.checkpoint}")

    def _show_metrics(self, metrics: dict) -> None:
        rows = metrics_rows(metrics)
        self.metrics_table.setRowCount(len(rows))
        for r, (what, value) in enumerate(rows):
            self.metrics_table.setItem(r, 0, QTableWidgetItem(what))
            self.metrics_table.setItem(r, 1, QTableWidgetItem(value))

    def _on_cancelled(self) -> None:
        out = self._out_at_press
        if out is not None and out.is_file() and out.stat().st_mtime >= self._started_at - 1:
            self.last_checkpoint = out
            self.use_button.setEnabled(True)
            self.status.setText(f"cancelled; the best model so far is at {out}")
        else:
            self.status.setText("cancelled before the first epoch ended; nothing was written")

    # ------------------------------------------------------------ hand over

    def use_in_predict(self):
        """Give the new checkpoint to a Predict widget (this viewer's first); returns it, or None."""
        if self.last_checkpoint is None:
            _show_error("train a model first")
            return None
        targets = open_predict_widgets(self.viewer)
        if not targets:
            from napari.utils.notifications import show_info

            show_info("open the Predict expression widget first (Plugins > DeepSpot2Cell), then press Use in Predict")
            return None
        target = targets[0]
        target.set_checkpoint(self.last_checkpoint)
        encoder = self.encoder.currentText().strip()
        if encoder:
            target.encoder.setCurrentText(encoder)  # predict with the encoder the model was trained on
        self.status.setText(f"the Predict widget now uses {self.last_checkpoint.name}")
        return target
