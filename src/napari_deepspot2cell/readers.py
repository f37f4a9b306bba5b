"""npe2 readers: DeepSpot2Cell predictions (``CELLS.h5ad``) and H&E slides.

``get_prediction_reader`` claims only ``.h5ad`` files this plugin wrote (they
hold ``uns["deepspot2cell"]``; checked with h5py, X is not read), so other
AnnData readers keep every other ``.h5ad``. Opening one gives back the painted
layers: the slide (when ``image_path`` still exists), the expression of the
first gene and the cells, from the mask at ``labels_path``. Without the mask
the cells come back as points at ``obsm["spatial"]`` coloured by the first gene.

``get_slide_reader`` claims RGB TIFF / OME-TIFF / SVS files (a single-channel
TIFF is left to other readers: it is most likely a label mask).
"""

from __future__ import annotations

import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

__all__ = [
    "get_prediction_reader",
    "get_slide_reader",
    "is_prediction_file",
    "read_predictions",
    "read_slide",
]

META = "deepspot2cell"
_SLIDE_SUFFIXES = (".svs", ".tif", ".tiff")
_LABEL_IMAGE_SUFFIXES = (".npy", ".tif", ".tiff", ".png")


def _single(path) -> str | None:
    if isinstance(path, list | tuple):
        return str(path[0]) if len(path) == 1 else None
    return str(path)


# ---------------------------------------------------------------- predictions


def is_prediction_file(path) -> bool:
    """True for an ``.h5ad`` holding ``uns/deepspot2cell`` (reads only the HDF5 tree)."""
    path = str(path)
    if not path.lower().endswith(".h5ad"):
        return False
    try:
        import h5py

        with h5py.File(path, "r") as f:
            return "uns" in f and META in f["uns"]
    except (OSError, ValueError):
        return False


def get_prediction_reader(path):
    """npe2 reader hook: ``read_predictions`` for this plugin's ``.h5ad`` files, else None."""
    if isinstance(path, list | tuple):
        return read_predictions if path and all(is_prediction_file(p) for p in path) else None
    return read_predictions if is_prediction_file(path) else None


def read_predictions(path) -> list[tuple]:
    """LayerDataTuples of one or more predictions files (see the module docstring)."""
    if isinstance(path, list | tuple):
        return [layer for p in path for layer in read_predictions(p)]
    import anndata as ad

    from .widgets.layers import decorate_when_added, pixel_size, prediction_layers

    path = Path(path)
    adata = ad.read_h5ad(path)
    info = dict(adata.uns.get(META, {}))
    um = pixel_size(adata)
    out: list[tuple] = []
    slide_shape = None
    image_path = _resolve(info.get("image_path"), path)
    recorded = str(info.get("image_path") or "").strip()
    if image_path is None and recorded:
        warnings.warn(f"{path.name}: the slide {recorded} is not there; showing the cells without it")
    if image_path is not None:
        try:
            slide_layer = read_slide(image_path, um_per_px=um)[0]
            data = slide_layer[0]
            slide_shape = tuple(int(s) for s in (data[0] if slide_layer[1]["multiscale"] else data).shape[:2])
            out.append(slide_layer)
        except Exception as exc:  # noqa: BLE001 - the predictions still open without the slide
            warnings.warn(f"{path.name}: the slide {image_path} could not be opened ({exc}); showing cells only")
    labels = _open_labels(_resolve(info.get("labels_path"), path), slide_shape, um, adata, path)
    key = uuid.uuid4().hex
    if labels is not None:
        layers = prediction_layers(adata, labels, scale=(um, um), key=key)
        for _, meta, _ in layers:
            meta["name"] = f"{meta['name']} [{path.stem}]"
        decorate_when_added(key)
        return out + layers
    return out + [_cell_points(adata, um, key, path)]


def _resolve(value, h5ad: Path) -> Path | None:
    if value is None:
        return None
    value = str(np.asarray(value).ravel()[0]) if not isinstance(value, str) else value
    if not value.strip():
        return None
    p = Path(value).expanduser()
    if not p.is_absolute() and not p.exists():
        p = h5ad.parent / p
    return p if p.exists() else None


def _open_labels(labels_path: Path | None, slide_shape, um: float, adata, h5ad: Path):
    """The label image (lazy where possible) or None with a warning saying why."""
    from .widgets.layers import cell_labels

    if labels_path is None:
        recorded = adata.uns.get(META, {}).get("labels_path", "")
        warnings.warn(
            f"{h5ad.name}: the cell mask {str(recorded) or '(none recorded)'} is not there; "
            "showing the cells as points at their centroids"
        )
        return None
    suffix = labels_path.name.lower()
    try:
        if slide_shape is None and suffix.endswith(_LABEL_IMAGE_SUFFIXES):
            labels = _read_label_image(labels_path)
        else:
            shape = slide_shape or _shape_from_obs(adata)
            labels = _open_cells(labels_path, shape, um)
    except Exception as exc:  # noqa: BLE001 - any unreadable mask falls back to points
        warnings.warn(f"{h5ad.name}: the cell mask {labels_path} could not be read ({exc}); showing points")
        return None
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        warnings.warn(f"{h5ad.name}: {labels_path} is not a 2-D integer label image; showing points")
        return None
    ids = cell_labels(adata)
    if ids.size and (int(ids.max()) > np.iinfo(labels.dtype).max):
        warnings.warn(f"{h5ad.name}: {labels_path} cannot hold the predicted label ids; showing points")
        return None
    return labels


def _open_cells(labels_path: Path, shape, um: float):
    try:
        from .io.masks import open_cells
    except ImportError:
        return _read_label_image(labels_path)
    return open_cells(labels_path, shape, um).labels


def _shape_from_obs(adata) -> tuple[int, int]:
    xy = np.asarray(adata.obsm["spatial"], dtype=float) if "spatial" in adata.obsm else np.zeros((1, 2))
    return int(np.ceil(xy[:, 1].max())) + 64, int(np.ceil(xy[:, 0].max())) + 64


def _read_label_image(path: Path):
    import dask.array as da

    name = path.name.lower()
    if name.endswith(".npy"):
        arr = np.load(path, mmap_mode="r", allow_pickle=False)  # never unpickle a file one opens
        return da.from_array(arr, chunks=(2048, 2048)) if arr.ndim == 2 else arr
    if name.endswith((".tif", ".tiff")):
        import tifffile

        try:
            import zarr

            store = tifffile.imread(path, aszarr=True)
            z = zarr.open(store, mode="r")
            if hasattr(z, "shape"):
                return da.from_zarr(z)
        except Exception:  # noqa: BLE001 - fall back to reading the whole (small) TIFF
            pass
        return tifffile.imread(path)
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im)


def _cell_points(adata, um: float, key: str, path: Path) -> tuple:
    from .paint import robust_limits
    from .widgets.layers import cell_labels, gene_values

    gene = str(adata.var_names[0])
    values = gene_values(adata, gene)
    if "spatial" in adata.obsm:
        xy = np.asarray(adata.obsm["spatial"], dtype=float)
    else:
        xy = adata.obs[["x", "y"]].to_numpy(float)
    area = adata.obs["area"].to_numpy(float) if "area" in adata.obs else np.full(adata.n_obs, 100.0)
    features = pd.DataFrame({"label": cell_labels(adata), gene: values})
    return (
        xy[:, ::-1].copy(),  # napari points are (row, col) = (y, x)
        {
            "name": f"DeepSpot2Cell cells [{path.stem}]",
            "scale": (um, um),
            "features": features,
            "face_color": gene,
            "face_colormap": "magma",
            "face_contrast_limits": robust_limits(values),
            "border_width": 0,
            "size": 2 * np.sqrt(np.maximum(area, 1.0) / np.pi),
            "metadata": {META: {"kind": "cells", "key": key, "gene": gene, "adata": adata}},
        },
        "points",
    )


# ---------------------------------------------------------------- slides


def _is_rgb_tiff(path: str) -> bool:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            page = tif.series[0].keyframe if tif.series else tif.pages[0]
            photometric = getattr(page, "photometric", None)
            rgbish = photometric is not None and int(photometric) in (2, 6)  # RGB, YCbCr
            return bool(rgbish or page.samplesperpixel >= 3)
    except Exception:  # noqa: BLE001 - not a TIFF we understand: let other readers try
        return False


def get_slide_reader(path):
    """npe2 reader hook: ``read_slide`` for RGB TIFF / OME-TIFF / SVS files, else None."""
    path = _single(path)
    if path is None or not path.lower().endswith(_SLIDE_SUFFIXES):
        return None
    return read_slide if _is_rgb_tiff(path) else None


def read_slide(path, um_per_px: float | None = None) -> list[tuple]:
    """A lazy multiscale RGB Image layer of a slide, scaled in um (1 um/px when unknown, warned)."""
    from .errors import InputError
    from .io.slides import open_slide

    path = Path(_single(path) or path)
    try:
        slide = open_slide(path, um_per_px=um_per_px)
    except InputError as exc:
        if "pixel size" not in exc.problem:
            raise
        warnings.warn(f"{path.name}: pixel size unknown; showing it at 1 um per px")
        slide = open_slide(path, um_per_px=1.0)
    um = float(slide.um_per_px)
    levels = list(slide.levels)
    multiscale = len(levels) > 1
    return [
        (
            levels if multiscale else levels[0],
            {
                "name": path.name,
                "rgb": True,
                "multiscale": multiscale,
                "contrast_limits": (0, 255),
                "scale": (um, um),
                "metadata": {META: {"kind": "slide", "path": str(path), "um_per_px": um}},
            },
            "image",
        )
    ]
