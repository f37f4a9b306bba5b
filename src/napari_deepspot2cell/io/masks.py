"""Open a cell segmentation as a lazy label image of the slide's level-0 shape.

Three kinds of input give the same thing, a dask (H, W) integer array with
0 = background:
- label images (TIFF, PNG, NPY), read lazily where the format allows;
- GeoJSON polygons (QuPath, CellViT), rasterised chunk by chunk;
- centroid tables (CSV, parquet, AnnData obs) with a nominal cell diameter,
  drawn as Voronoi-limited disks chunk by chunk.
"""

from __future__ import annotations

import json
import math
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import dask.array as da
import numpy as np
import pandas as pd

from napari_deepspot2cell.errors import InputError, positive_number
from napari_deepspot2cell.io.slides import _short

_CHUNK = 1024
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TABLE_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet", ".pq", ".h5ad")
_GEOJSON_SUFFIXES = (".geojson", ".json")
# unambiguous centroid conventions, in order of preference: (x = column, y = row, units)
_CONVENTIONS = (
    ("x_centroid", "y_centroid", "um"),  # 10x Xenium cells table
    ("x", "y", "px"),
    ("pxl_col_in_fullres", "pxl_row_in_fullres", "px"),  # Space Ranger
    ("center_x", "center_y", "px"),
    ("Centroid X px", "Centroid Y px", "px"),  # QuPath measurement export
    ("Centroid X µm", "Centroid Y µm", "um"),
)
_ON_TISSUE = 215  # a pixel darker than this (mean of RGB) is tissue, not glass


@dataclass(eq=False)
class CellMask:
    """A cell segmentation as labels over the slide; ``centroids`` only for centroid tables."""

    path: Path
    labels: da.Array
    source_kind: str  # "labels" | "polygons" | "centroids"
    centroids: pd.DataFrame | None = None  # label, x, y (level-0 px), cell_id; index = label as str
    n_cells: int | None = None  # known for polygons and centroids without a scan
    _handle: Any = field(default=None, repr=False)  # keeps a TIFF's zarr store open

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def open_cells(
    path,
    slide_shape: tuple[int, int],
    um_per_px: float,
    *,
    cell_diameter_um: float | None = None,
    centroid_columns: tuple[str, str] | None = None,
    centroid_units: str = "px",
    slide=None,
) -> CellMask:
    """Open cells from a label image, GeoJSON polygons or a centroid table.

    Label images (TIFF/PNG/NPY) must have the slide's level-0 shape and
    non-negative integer labels. GeoJSON coordinates are level-0 pixels (x, y);
    each Polygon is one cell; a MultiPolygon is one cell when it comes from
    QuPath (``properties.objectType``) and one cell per part otherwise (CellViT
    stores all cells of a class in one MultiPolygon). Labels are 1..N in file order.

    Centroid tables (CSV, parquet, ``.h5ad`` obs) need ``cell_diameter_um``;
    each cell is a disk of that diameter, split with its neighbours by nearest
    centroid. ``centroid_columns=(x_column, y_column)`` names the columns, x
    being the image column and y the row, in ``centroid_units`` ("px" or "um").
    Without it the known conventions are tried: Xenium ``x_centroid``/``y_centroid``
    (um), ``x``/``y``, ``pxl_col_in_fullres``/``pxl_row_in_fullres``,
    ``center_x``/``center_y``, QuPath ``Centroid X px``/``Centroid X µm``.
    ``x_pixel``/``y_pixel`` is ambiguous: the HEST/DeepSpot convention has
    x_pixel = ROW. Both readings are scored, first by how many centroids fall
    inside the image, then (with ``slide``) by how many fall on tissue; the
    clearly better one is used with a warning that names it and how to force
    it; if neither is clearly better, an InputError asks for ``centroid_columns``.
    Cell labels are the table's positive unique integer ``label``/``cell_id``
    column when there is one, else 1..N in table order.
    """
    path = Path(path)
    shape = _check_shape(path, slide_shape)
    um_per_px = positive_number(path, um_per_px, "pixel size (um per px)")
    if not path.is_file():
        raise InputError(path, "no such file")
    name = path.name.lower()
    if name.endswith(_TABLE_SUFFIXES):
        if cell_diameter_um is None:
            raise InputError(path, "--cell-diameter-um is needed for centroid tables")
        diameter = positive_number(path, cell_diameter_um, "--cell-diameter-um")
        table = _read_table(path)
        return _centroid_cells(path, table, shape, um_per_px, diameter, centroid_columns, centroid_units, slide)
    if name.endswith(_GEOJSON_SUFFIXES):
        return _polygon_cells(path, shape)
    return _label_image(path, shape)


def _check_shape(path: Path, slide_shape) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in tuple(slide_shape)[:2])
    except (TypeError, ValueError):
        raise ValueError(f"slide_shape must be (rows, cols), got {slide_shape!r}") from None
    if h <= 0 or w <= 0:
        raise InputError(path, f"the slide shape {h} x {w} is empty")
    return h, w


def _name() -> str:
    # dask would otherwise hash the arguments (polygon lists, KD-trees) to name the graph
    return f"cells-{uuid.uuid4().hex}"


# ---------------------------------------------------------------- label images


def _label_image(path: Path, shape: tuple[int, int]) -> CellMask:
    with open(path, "rb") as fh:
        head = fh.read(8)
    handle = None
    if path.name.lower().endswith(".npy"):
        arr = _read_npy(path)
    elif head.startswith(_TIFF_MAGIC):
        arr, handle = _read_label_tiff(path)
    else:
        arr = _read_label_picture(path)
    try:
        labels = _as_labels(path, arr, shape)
    except BaseException:
        if handle is not None:
            handle.close()
        raise
    return CellMask(path=path, labels=labels, source_kind="labels", _handle=handle)


def _read_npy(path: Path):
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise InputError(path, f"not a readable .npy label array ({_short(exc)})") from exc


def _read_label_tiff(path: Path):
    import zarr

    from napari_deepspot2cell.io.slides import open_tiff

    tif = open_tiff(path)
    try:
        return zarr.open_array(tif.series[0].aszarr(level=0), mode="r"), tif
    except InputError:
        tif.close()
        raise
    except Exception as exc:
        tif.close()
        raise InputError(path, f"the TIFF cannot be read ({_short(exc)})") from exc


def _read_label_picture(path: Path) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    from napari_deepspot2cell.io.slides import _no_bomb_check

    try:
        with _no_bomb_check(Image), Image.open(path) as im:  # a label image as big as a slide is normal
            return np.array(im)
    except UnidentifiedImageError as exc:
        raise InputError(path, "not a label image this reader knows (expected TIFF, PNG or NPY)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise InputError(path, f"the image cannot be decoded; is the file truncated? ({_short(exc)})") from exc


def _as_labels(path: Path, arr, shape: tuple[int, int]) -> da.Array:
    dims = tuple(int(n) for n in arr.shape)
    squeeze = tuple(i for i, n in enumerate(dims) if n == 1 and len(dims) > 2)
    kept = tuple(n for i, n in enumerate(dims) if i not in squeeze)
    if len(kept) != 2:
        raise InputError(path, f"the mask has shape {dims}; a label image has one channel (rows x cols)")
    dtype = np.dtype(arr.dtype)
    if dtype == np.bool_:
        raise InputError(path, "the mask is binary (True/False); a label image needs one integer id per cell")
    if not np.issubdtype(dtype, np.integer):
        raise InputError(path, f"the mask has {dtype} values; labels must be non-negative integers")
    if kept != shape:
        raise InputError(path, f"mask is {kept[0]} x {kept[1]} (rows x cols) but the slide is {shape[0]} x {shape[1]}")
    raw_chunks = getattr(arr, "chunks", None) or dims
    chunks = tuple(1 if i in squeeze else min(n, max(1, int(c)) * max(1, round(_CHUNK / max(1, int(c)))))
                   for i, (n, c) in enumerate(zip(dims, raw_chunks)))
    labels = da.from_array(arr, chunks=chunks, name=_name(), asarray=True)
    if squeeze:
        labels = labels.squeeze(axis=squeeze)
    if np.issubdtype(dtype, np.signedinteger):
        labels = _check_non_negative(path, arr, labels)
    return labels


def _check_non_negative(path: Path, arr, labels: da.Array) -> da.Array:
    if isinstance(arr, np.ndarray):  # in memory or memory-mapped: one streaming pass is cheap
        if arr.size and int(arr.min()) < 0:
            raise InputError(path, "the mask has negative values; labels must be non-negative integers")
        return labels

    def check(block: np.ndarray) -> np.ndarray:
        if block.size and block.min() < 0:  # a lazy TIFF is checked as its chunks are read
            raise InputError(path, "the mask has negative values; labels must be non-negative integers")
        return block

    return labels.map_blocks(check, dtype=labels.dtype, name=_name())


# ---------------------------------------------------------------- GeoJSON polygons


def _polygon_cells(path: Path, shape: tuple[int, int]) -> CellMask:
    cells = _read_geojson(path)
    return CellMask(path=path, labels=_rasterise(cells, shape), source_kind="polygons", n_cells=len(cells))


def _read_geojson(path: Path) -> list[list[list[np.ndarray]]]:
    """Cells in file order; a cell is a list of polygons; a polygon is [exterior, *holes], rings (n, 2) x, y."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise InputError(path, "not a GeoJSON text file") from exc
    except json.JSONDecodeError as exc:
        raise InputError(path, f"not valid JSON (line {exc.lineno}: {exc.msg})") from exc
    features = _features(path, doc)
    if not features:
        raise InputError(path, "the GeoJSON has no features")
    qupath_types = [str((f.get("properties") or {}).get("objectType", "")).lower() for f in features]
    skip_annotations = any(t in ("cell", "detection", "tile") for t in qupath_types)
    cells, skipped = [], 0
    for i, (feature, kind) in enumerate(zip(features, qupath_types)):
        if skip_annotations and kind == "annotation":
            skipped += 1  # a tissue outline drawn beside the cells is not a cell
            continue
        polygons = _polygons(path, i, feature.get("geometry"))
        if not polygons:
            skipped += 1
            continue
        cells.extend([polygons] if kind else [[p] for p in polygons])
    if skipped:
        warnings.warn(f"{path.name}: {skipped} features that are not cell polygons were skipped", stacklevel=4)
    if not cells:
        raise InputError(path, "the GeoJSON has no Polygon or MultiPolygon features")
    return cells


def _features(path: Path, doc) -> list[dict]:
    if isinstance(doc, dict):
        kind = doc.get("type")
        if kind == "FeatureCollection":
            doc = doc.get("features")
            if not isinstance(doc, list):
                raise InputError(path, "the FeatureCollection has no 'features' list")
        elif kind == "Feature":
            doc = [doc]
        elif kind in ("Polygon", "MultiPolygon", "GeometryCollection"):
            doc = [{"type": "Feature", "geometry": doc}]
        else:
            raise InputError(path, f"not GeoJSON features (top-level type {kind!r})")
    if not isinstance(doc, list):
        raise InputError(path, "not GeoJSON: expected a FeatureCollection or a list of Features")
    for i, feature in enumerate(doc):
        if not isinstance(feature, dict) or not isinstance(feature.get("geometry"), dict):
            raise InputError(path, f"feature {i} has no geometry object")
    return doc


def _polygons(path: Path, index: int, geometry: dict) -> list[list[np.ndarray]]:
    kind = geometry.get("type")
    if kind == "GeometryCollection":
        return [p for g in geometry.get("geometries") or [] if isinstance(g, dict) for p in _polygons(path, index, g)]
    if kind not in ("Polygon", "MultiPolygon"):
        return []
    coords = geometry.get("coordinates")
    if not isinstance(coords, list) or not coords:
        raise InputError(path, f"feature {index} has a {kind} without coordinates")
    parts = coords if kind == "MultiPolygon" else [coords]
    return [[_ring(path, index, ring) for ring in part] for part in parts if part]


def _ring(path: Path, index: int, ring) -> np.ndarray:
    try:
        arr = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.empty((0,))
    if arr.ndim != 2 or arr.shape[0] < 3 or arr.shape[1] < 2 or not np.isfinite(arr[:, :2]).all():
        raise InputError(path, f"feature {index} has a ring that is not a list of at least 3 (x, y) points")
    return arr[:, :2]


def _rasterise(cells: list, shape: tuple[int, int]) -> da.Array:
    """Labels 1..N drawn per chunk; later cells win where polygons overlap.

    Always lazy (even for small slides): each chunk draws only the cells whose
    bounding box meets it, found by a y-sorted index, so a million polygons on a
    whole slide never become one big array.
    """
    boxes = np.array([_bbox(c) for c in cells])  # x0, y0, x1, y1
    order = np.argsort(boxes[:, 1], kind="stable")
    y0_sorted = boxes[order, 1]
    tallest = float((boxes[:, 3] - boxes[:, 1]).max())
    dtype = np.uint32 if len(cells) < 2**32 - 1 else np.uint64

    def block(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        out = np.zeros((r1 - r0, c1 - c0), dtype=dtype)
        lo, hi = np.searchsorted(y0_sorted, [r0 - tallest - 1, r1 + 1])
        near = order[lo:hi]
        b = boxes[near]
        near = np.sort(near[(b[:, 3] >= r0) & (b[:, 1] <= r1) & (b[:, 2] >= c0) & (b[:, 0] <= c1)])
        for i in near:
            _draw(out, cells[i], int(i) + 1, r0, c0)
        return out

    chunks = tuple(_chunks(n) for n in shape)
    return da.map_blocks(block, dtype=dtype, chunks=chunks, name=_name(), meta=np.empty((0, 0), dtype))


def _bbox(cell: list) -> tuple[float, float, float, float]:
    pts = np.concatenate([poly[0] for poly in cell])
    return pts[:, 0].min(), pts[:, 1].min(), pts[:, 0].max(), pts[:, 1].max()


def _draw(out: np.ndarray, cell: list, label: int, r0: int, c0: int) -> None:
    from skimage.draw import polygon

    # GeoJSON pixel (c, r) spans [c, c+1): its centre is at c + 0.5, which skimage puts at c
    for poly in cell:
        mask = np.zeros(out.shape, dtype=bool)
        for k, ring in enumerate(poly):
            rr, cc = polygon(ring[:, 1] - 0.5 - r0, ring[:, 0] - 0.5 - c0, shape=out.shape)
            mask[rr, cc] = k == 0  # rings after the first are holes
        out[mask] = label


def _chunks(n: int) -> tuple[int, ...]:
    return (_CHUNK,) * (n // _CHUNK) + ((n % _CHUNK,) if n % _CHUNK else ())


# ---------------------------------------------------------------- centroid tables


def _read_table(path: Path) -> pd.DataFrame:
    name = path.name.lower()
    try:
        if name.endswith(".h5ad"):
            return _read_obs(path)
        if name.endswith((".parquet", ".pq")):
            return pd.read_parquet(path)
        return pd.read_csv(path, sep="\t" if ".tsv" in name else ",")
    except InputError:
        raise
    except Exception as exc:  # pandas/pyarrow/h5py raise many kinds for damaged files
        raise InputError(path, f"cannot read the centroid table ({_short(exc)})") from exc


def _read_obs(path: Path) -> pd.DataFrame:
    import anndata
    import h5py

    with h5py.File(path, "r") as f:  # obs only: X may be gigabytes, and nothing is unpickled
        if "obs" not in f:
            raise InputError(path, "the .h5ad has no obs table")
        obs = anndata.io.read_elem(f["obs"])
    return obs


def _centroid_cells(path, table, shape, um_per_px, diameter_um, columns, units, slide) -> CellMask:
    if units not in ("px", "um"):
        raise InputError(path, f"centroid units must be 'px' or 'um', got {units!r}")
    if table.empty:
        raise InputError(path, "the centroid table has no rows")
    if columns is not None:
        x, y = _columns(path, table, tuple(columns), units, um_per_px)
    else:
        x, y = _detect_columns(path, table, shape, um_per_px, slide)
    centroids = _centroid_table(path, table, x, y, shape)
    radius = diameter_um / um_per_px / 2
    labels = _disks(centroids, shape, radius)
    return CellMask(path=path, labels=labels, source_kind="centroids", centroids=centroids, n_cells=len(centroids))


def _columns(path, table, columns, units, um_per_px) -> tuple[np.ndarray, np.ndarray]:
    if len(columns) != 2:
        raise InputError(path, f"centroid_columns must be (x_column, y_column), got {columns!r}")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise InputError(path, f"no column {missing[0]!r} in the table (it has {_list(table.columns)})")
    scale = 1.0 / um_per_px if units == "um" else 1.0
    try:
        return (pd.to_numeric(table[columns[0]]).to_numpy(np.float64) * scale,
                pd.to_numeric(table[columns[1]]).to_numpy(np.float64) * scale)
    except (TypeError, ValueError) as exc:
        raise InputError(path, f"centroid columns {columns} are not numeric ({_short(exc)})") from exc


def _list(cols) -> str:
    names = [str(c) for c in cols]
    return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "")


def _detect_columns(path, table, shape, um_per_px, slide) -> tuple[np.ndarray, np.ndarray]:
    for x_col, y_col, units in _CONVENTIONS:
        if x_col in table.columns and y_col in table.columns:
            return _columns(path, table, (x_col, y_col), units, um_per_px)
    if "x_pixel" in table.columns and "y_pixel" in table.columns:
        return _hest_reading(path, table, shape, um_per_px, slide)
    raise InputError(path, f"no centroid columns found (it has {_list(table.columns)}); name them with "
                           "--centroid-columns X_COLUMN Y_COLUMN")


def _hest_reading(path, table, shape, um_per_px, slide) -> tuple[np.ndarray, np.ndarray]:
    """Decide whether x_pixel is the column (as named) or the row (HEST/DeepSpot)."""
    a = _columns(path, table, ("x_pixel", "y_pixel"), "px", um_per_px)  # as named: x = column
    readings = {("y_pixel", "x_pixel"): (a[1], a[0]), ("x_pixel", "y_pixel"): a}  # keys: (x_column, y_column)
    tests = [("inside the image", {k: float(_inside(x, y, shape).mean()) for k, (x, y) in readings.items()},
              lambda best, other: best >= 0.99 and other < 0.95)]
    if slide is not None:
        tests.append(("on tissue", {k: _on_tissue(slide, x, y, shape) for k, (x, y) in readings.items()},
                      lambda best, other: best - other >= 0.15 and best >= 0.5))
    verdicts, evidence = set(), []
    for what, scores, is_clear in tests:
        (best, s_best), (other, s_other) = sorted(scores.items(), key=lambda kv: -kv[1])
        if is_clear(s_best, s_other):
            verdicts.add(best)
            evidence.append(f"{100 * s_best:.0f} % of centroids fall {what} against {100 * s_other:.0f} %")
    if len(verdicts) != 1:
        hint = "" if slide is not None else " (or give the slide, so tissue can decide)"
        raise InputError(path, "x_pixel/y_pixel can be read either way round (x_pixel as the column, or as the "
                               "row as in HEST/DeepSpot); name them with centroid_columns=(x_column, y_column), "
                               f"e.g. --centroid-columns y_pixel x_pixel for HEST{hint}")
    best = verdicts.pop()
    other = ("x_pixel", "y_pixel") if best == ("y_pixel", "x_pixel") else ("y_pixel", "x_pixel")
    row, col = ("x_pixel", "y_pixel") if best == ("y_pixel", "x_pixel") else ("y_pixel", "x_pixel")
    warnings.warn(
        f"{path.name}: read {row} as the row and {col} as the column: {'; '.join(evidence)} the other way round; "
        f"pass centroid_columns={best!r} (x_column, y_column) to force this reading, {other!r} for the other",
        stacklevel=4,
    )
    return readings[best]


def _inside(x: np.ndarray, y: np.ndarray, shape) -> np.ndarray:
    h, w = shape
    with np.errstate(invalid="ignore"):
        return (x >= 0) & (x < w) & (y >= 0) & (y < h)


def _on_tissue(slide, x: np.ndarray, y: np.ndarray, shape) -> float:
    """Fraction of centroids on a pixel darker than glass, looked up in a thumbnail (cheap)."""
    from napari_deepspot2cell.io.slides import read_thumbnail

    thumb = read_thumbnail(slide, 2048).mean(axis=2)
    ok = _inside(x, y, shape)
    if not ok.any():
        return 0.0
    ty = np.clip((y[ok] * thumb.shape[0] / shape[0]).astype(int), 0, thumb.shape[0] - 1)
    tx = np.clip((x[ok] * thumb.shape[1] / shape[1]).astype(int), 0, thumb.shape[1] - 1)
    return float((thumb[ty, tx] < _ON_TISSUE).sum() / len(x))


def _centroid_table(path, table, x, y, shape) -> pd.DataFrame:
    ids = _label_ids(table)
    if "cell_id" in table.columns:  # Xenium and most exporters name their cells here
        cell_id = table["cell_id"].astype(str).to_numpy()
    else:
        cell_id = table.index.astype(str).to_numpy()
    keep = _inside(x, y, shape) & np.isfinite(x) & np.isfinite(y)
    dropped = int((~keep).sum())
    if dropped == len(keep):
        raise InputError(path, f"none of the {len(keep)} centroids lies inside the slide "
                               f"({shape[0]} x {shape[1]} px); check the columns and units")
    if dropped:
        warnings.warn(f"{path.name}: {dropped} of {len(keep)} centroids lie outside the slide and were dropped",
                      stacklevel=4)
    out = pd.DataFrame({"label": ids[keep], "x": x[keep], "y": y[keep], "cell_id": cell_id[keep]})
    out.index = out["label"].astype(str).to_numpy()
    return out


def _label_ids(table: pd.DataFrame) -> np.ndarray:
    for col in ("label", "cell_id"):
        if col in table.columns and pd.api.types.is_integer_dtype(table[col]):
            ids = table[col].to_numpy(np.int64)
            if ids.min() > 0 and len(np.unique(ids)) == len(ids):
                return ids
    return np.arange(1, len(table) + 1, dtype=np.int64)


def _disks(centroids: pd.DataFrame, shape, radius: float) -> da.Array:
    """Disks of ``radius`` px around each centroid; a pixel in several goes to the nearest centroid.

    Per chunk, a KD-tree finds the centroids that can reach it; their disks are
    stamped from one stencil of pixel offsets and each pixel keeps its nearest
    centroid (a Voronoi-limited disk). That costs about the disks' area, several
    times less than querying the tree for every pixel of the chunk.
    """
    from scipy.spatial import cKDTree

    pts = np.column_stack([centroids["y"].to_numpy(), centroids["x"].to_numpy()])  # pixel (r, c) centre = (r, c)
    ids = centroids["label"].to_numpy()
    dtype = np.uint32 if ids.max() < 2**32 else np.int64
    ids = ids.astype(dtype)
    tree = cKDTree(pts)
    reach = max(radius, 0.75)  # every cell keeps at least the pixel under its centroid
    span = int(math.ceil(reach)) + 1
    dr, dc = (a.ravel() for a in np.mgrid[-span:span + 1, -span:span + 1])

    def block(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        h, w = r1 - r0, c1 - c0
        out = np.zeros(h * w, dtype=dtype)
        centre = [(r0 + r1 - 1) / 2, (c0 + c1 - 1) / 2]
        near = tree.query_ball_point(centre, max(h, w) / 2 + reach + 1, p=np.inf)  # a square around the chunk
        if not near:
            return out.reshape(h, w)
        near = np.asarray(near)
        p = pts[near]
        rr = np.rint(p[:, :1]).astype(np.int64) + dr  # (cells, stencil) candidate pixels
        cc = np.rint(p[:, 1:]).astype(np.int64) + dc
        dist = np.hypot(rr - p[:, :1], cc - p[:, 1:])
        ok = (dist <= reach) & (rr >= r0) & (rr < r1) & (cc >= c0) & (cc < c1)
        pix = ((rr - r0) * w + (cc - c0))[ok]
        owner = np.broadcast_to(near[:, None], ok.shape)[ok]
        order = np.lexsort((dist[ok], pix))  # by pixel, nearest centroid first
        first = np.unique(pix[order], return_index=True)[1]
        out[pix[order][first]] = ids[owner[order][first]]
        return out.reshape(h, w)

    chunks = tuple(_chunks(n) for n in shape)
    return da.map_blocks(block, dtype=dtype, chunks=chunks, name=_name(), meta=np.empty((0, 0), dtype))
