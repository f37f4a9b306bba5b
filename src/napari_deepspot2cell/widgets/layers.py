"""Napari layers for a predictions AnnData: a painted expression image and the cells.

The expression of one gene is an Image layer (a lazy multiscale float32 pyramid
from :mod:`napari_deepspot2cell.paint`, colormap + contrast limits + colorbar),
the cells a Labels layer (outlines, low opacity, ``features`` with ``index`` =
label id and the shown gene's value for the status-bar readout). Both carry
``metadata["deepspot2cell"]`` with a shared ``key``; the Labels layer also holds
the AnnData itself under ``"adata"``, which is how the Gene browser and the
writers find it. No secrets (tokens) ever go into metadata.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import paint as _paint

__all__ = [
    "IMAGE_PREFIX",
    "UNCERTAINTY_PREFIX",
    "CELLS_NAME",
    "add_prediction_layers",
    "decorate",
    "decorate_when_added",
    "cell_labels",
    "find_adata",
    "gene_values",
    "paint_gene",
    "prediction_layers",
    "pixel_size",
    "update_gene",
]

IMAGE_PREFIX = "DeepSpot2Cell: "
UNCERTAINTY_PREFIX = "DeepSpot2Cell uncertainty: "
CELLS_NAME = "DeepSpot2Cell cells"
META = "deepspot2cell"


# ---------------------------------------------------------------- AnnData helpers


def cell_labels(adata) -> np.ndarray:
    """The label id of every cell (row) as int64: ``obs["label"]``, else the index."""
    if "label" in adata.obs:
        return np.asarray(adata.obs["label"].to_numpy(), dtype=np.int64)
    return np.asarray(adata.obs_names.astype(np.int64), dtype=np.int64)


def gene_values(adata, gene: str, layer: str | None = None) -> np.ndarray:
    """One gene across all cells as float32, from ``X`` or ``layers[layer]`` (dense or sparse)."""
    try:
        j = int(adata.var_names.get_loc(gene))
    except KeyError:
        raise KeyError(f"gene {gene!r} is not among the {adata.n_vars} predicted genes") from None
    mat = adata.X if layer is None else adata.layers[layer]
    col = mat[:, j]
    if hasattr(col, "toarray"):
        col = col.toarray()
    return np.asarray(col, dtype=np.float32).ravel()


def pixel_size(adata, default: float = 1.0) -> float:
    """um per level-0 pixel recorded in ``uns["deepspot2cell"]`` (several spellings), else ``default``."""
    info = adata.uns.get(META, {}) if hasattr(adata, "uns") else {}
    for key in ("um_per_px", "pixel_size_um", "pixel_size", "mpp"):
        if key in info:
            try:
                value = float(np.asarray(info[key]).ravel()[0])
            except (TypeError, ValueError, IndexError):
                continue
            if np.isfinite(value) and value > 0:
                return value
    return float(default)


def _scale2(scale) -> tuple[float, float]:
    if scale is None:
        return 1.0, 1.0
    if np.isscalar(scale):
        return float(scale), float(scale)
    s = tuple(float(v) for v in scale)
    if len(s) != 2:
        raise ValueError(f"scale must be one number or (row, col), got {scale!r}")
    return s


def _labels_levels(labels) -> list:
    """The label pyramid: reuse a list/MultiScaleData of levels as is, else build one."""
    if isinstance(labels, list | tuple) or type(labels).__name__ == "MultiScaleData":
        return list(labels)
    return _paint.label_pyramid(labels)


def paint_gene(adata, gene: str, levels: Sequence, layer: str | None = None):
    """(painted levels, values, contrast limits) of one gene over a label pyramid."""
    values = gene_values(adata, gene, layer)
    lut = _paint.lookup_table(cell_labels(adata), values)
    return _paint.paint(levels, lut), values, _paint.robust_limits(values)


# ---------------------------------------------------------------- layers


def prediction_layers(
    adata,
    labels,
    *,
    gene: str | None = None,
    scale=None,
    translate=None,
    colormap: str = "magma",
    key: str | None = None,
) -> list[tuple[Any, dict, str]]:
    """LayerDataTuples: the painted expression of ``gene`` (Image) and the cells (Labels).

    ``labels`` is the level-0 label image (numpy, dask or a list of pyramid levels);
    ``scale`` the slide's um per px (one number or (row, col)); None reads it from
    ``uns["deepspot2cell"]``. ``gene=None`` shows the first predicted gene.
    """
    if adata.n_vars == 0:
        raise ValueError("the predictions hold no genes")
    gene = str(adata.var_names[0]) if gene is None else str(gene)
    scale = _scale2(pixel_size(adata) if scale is None else scale)
    translate = (0.0, 0.0) if translate is None else tuple(float(v) for v in translate)
    key = key or uuid.uuid4().hex
    levels = _labels_levels(labels)
    painted, values, limits = paint_gene(adata, gene, levels)
    multiscale = len(levels) > 1  # napari mis-reads a one-level "pyramid": pass the array then
    common = {"scale": scale, "translate": translate, "multiscale": multiscale}
    image = (
        painted if multiscale else painted[0],
        {
            **common,
            "name": IMAGE_PREFIX + gene,
            "colormap": colormap,
            "contrast_limits": limits,
            "blending": "translucent",
            "opacity": 0.9,
            "metadata": {META: {"kind": "expression", "key": key, "gene": gene, "source": "X"}},
        },
        "image",
    )
    features = pd.DataFrame({"index": cell_labels(adata), gene: values})
    cells = (
        levels if multiscale else levels[0],
        {
            **common,
            "name": CELLS_NAME,
            "opacity": 0.35,
            "blending": "translucent",
            "features": features,
            "colormap": _outline_colormap(),
            "metadata": {META: {"kind": "cells", "key": key, "gene": gene, "adata": adata}},
        },
        "labels",
    )
    return [image, cells]


def _outline_colormap():
    """Every cell in one light colour (outlines read well over any colormap); O(1) size."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: (0.9, 0.9, 0.9, 1.0), 0: (0.0, 0.0, 0.0, 0.0)})


def decorate_when_added(key: str, viewer=None) -> bool:
    """Once the layers of ``key`` land in ``viewer`` (default: the current one), decorate them.

    For readers: a LayerDataTuple cannot switch on the colorbar or the outlines,
    so this waits for napari to add the layers. Returns False without a viewer.
    """
    if viewer is None:
        try:
            import napari

            viewer = napari.current_viewer()
        except Exception:  # noqa: BLE001 - no Qt, no viewer: nothing to decorate
            viewer = None
    if viewer is None:
        return False
    pending = {"expression", "cells"}

    def _on_inserted(event) -> None:
        layer = event.value
        info = getattr(layer, "metadata", {}).get(META)
        if not isinstance(info, dict) or info.get("key") != key:
            return
        kind = info.get("kind")
        if kind == "expression":
            decorate(image_layer=layer, viewer=viewer)
        elif kind == "cells":
            decorate(labels_layer=layer)
        pending.discard(kind)
        if not pending:
            viewer.layers.events.inserted.disconnect(_on_inserted)

    viewer.layers.events.inserted.connect(_on_inserted)
    return True


def add_prediction_layers(viewer, adata, labels, **kwargs):
    """Add :func:`prediction_layers` to ``viewer``; show the colorbar and cell outlines.

    The colorbar and contour are layer state that a LayerDataTuple cannot carry
    in napari 0.9, so they are set here after adding. Returns (image, labels).
    """
    image_layer = labels_layer = None
    for data, meta, kind in prediction_layers(adata, labels, **kwargs):
        layer = viewer.add_image(data, **meta) if kind == "image" else viewer.add_labels(data, **meta)
        if kind == "image":
            image_layer = layer
        else:
            labels_layer = layer
    decorate(image_layer, labels_layer, viewer=viewer)
    return image_layer, labels_layer


def decorate(image_layer=None, labels_layer=None, *, viewer=None) -> None:
    """Colorbar on the expression image, outlines on the cells (state not in LayerDataTuples).

    With ``viewer``, only the top-most visible painted layer keeps its colorbar
    (see :class:`_OneColorbar`)."""
    if image_layer is not None:
        image_layer.colorbar.visible = True
    if labels_layer is not None:
        labels_layer.contour = 1
    if viewer is not None:
        keeper = _KEEPERS.get(viewer.layers)
        if keeper is None:
            keeper = _KEEPERS[viewer.layers] = _OneColorbar(viewer.layers)
        keeper.update()


def _painted(layer) -> bool:
    info = getattr(layer, "metadata", {}).get(META)
    return isinstance(info, dict) and info.get("kind") in ("expression", "uncertainty")


class _OneColorbar:
    """Shows the colorbar of the top-most visible painted layer alone.

    napari draws each layer's colorbar side by side, unlabelled: with an
    uncertainty layer or a second prediction over the first, nobody can tell
    which bar belongs to the colours on screen. This follows inserts, removals,
    moves and visibility."""

    def __init__(self, layers):
        self._layers = weakref.ref(layers)
        layers.events.inserted.connect(self._on_inserted)
        layers.events.removed.connect(self.update)
        layers.events.moved.connect(self.update)
        for layer in layers:
            self._watch(layer)

    def _watch(self, layer) -> None:
        if _painted(layer):
            layer.events.visible.connect(self.update)

    def _on_inserted(self, event) -> None:
        self._watch(event.value)
        self.update()

    def update(self, event=None) -> None:
        layers = self._layers()
        if layers is None:
            return
        painted = [layer for layer in layers if _painted(layer)]
        top = next((layer for layer in reversed(painted) if layer.visible), None)
        for layer in painted:
            if layer.colorbar.visible != (layer is top):
                layer.colorbar.visible = layer is top


# one keeper per layer list, alive as long as the list (napari holds callbacks weakly)
_KEEPERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def find_adata(layer):
    """The predictions AnnData attached to a layer by :func:`prediction_layers`, or None."""
    info = getattr(layer, "metadata", {}).get(META) if layer is not None else None
    return info.get("adata") if isinstance(info, dict) else None


def update_gene(image_layer, labels_layer, adata, gene: str, *, layer: str | None = None) -> None:
    """Repaint ``image_layer`` with ``gene`` in place: O(cells) table + new lazy pyramid.

    ``layer=None`` paints ``X``, ``layer="uncertainty"`` that layer. Refreshes the
    contrast limits and name; on ``labels_layer`` (may be None) replaces the
    shown gene's features column (same rows, no per-label Python work).
    """
    gene = str(gene)
    if labels_layer is None:
        raise ValueError("update_gene needs the cells Labels layer (its label pyramid)")
    levels = list(labels_layer.data) if labels_layer.multiscale else [labels_layer.data]
    painted, values, limits = paint_gene(adata, gene, levels, layer)
    image_layer.data = painted if image_layer.multiscale else painted[0]
    image_layer.contrast_limits_range = limits
    image_layer.contrast_limits = limits
    prefix = IMAGE_PREFIX if layer is None else UNCERTAINTY_PREFIX
    image_layer.name = prefix + gene
    info = image_layer.metadata.setdefault(META, {})
    info.update(gene=gene, source="X" if layer is None else layer)
    if layer is None:
        _set_feature_column(labels_layer, adata, gene, values)


def _set_feature_column(labels_layer, adata, gene: str, values: np.ndarray) -> None:
    info = labels_layer.metadata.setdefault(META, {})
    old = info.get("gene")
    feats = labels_layer.features
    ids = cell_labels(adata)
    same_rows = "index" in feats and len(feats) == ids.size and np.array_equal(feats["index"].to_numpy(), ids)
    if same_rows:
        # in place: napari's label -> row index stays valid, nothing is rebuilt per label
        if old is not None and old != gene and old in feats and old != "index":
            del feats[old]
        feats[gene] = values
        labels_layer.events.features()
    else:
        labels_layer.features = pd.DataFrame({"index": ids, gene: values})
    info["gene"] = gene
