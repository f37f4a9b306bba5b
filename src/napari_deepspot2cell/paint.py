"""Paint per-cell values onto a label image, lazily, at any number of cells.

A gene is shown as a float image: every pixel of cell ``i`` carries the cell's
value, background is NaN (transparent under a napari colormap). Nothing is
painted up front: a lookup table indexed by label id (O(cells) to build) is
applied with ``dask.array.map_blocks`` over a nearest-neighbour pyramid of the
label image, so only the blocks a canvas actually draws are ever computed, and
switching the gene is a new table plus new lazy arrays.

Pure numpy/dask: no Qt, no napari.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import dask.array as da
import numpy as np
from dask.base import tokenize

__all__ = [
    "DENSE_LIMIT",
    "SortedLookup",
    "label_pyramid",
    "lookup_table",
    "paint",
    "robust_limits",
]

DENSE_LIMIT = 2**26  # above this label id the table is a sorted search, not a dense array (256 MiB)
_MIN_SIDE = 1024  # the pyramid stops once the long side is at most this
_CACHE_PIXELS = 2048 * 2048  # coarse levels up to this size are computed once, on first use
_MIN_CHUNK = 512  # strided levels whose chunks shrink below this are rechunked
_TARGET_CHUNK = 2048


# ---------------------------------------------------------------- lookup tables


class SortedLookup:
    """A lookup table for huge label ids: sorted ids + values, ``lut[block]`` by binary search.

    Behaves like the dense table for :func:`paint` (``lut[block]`` returns float32
    values, ``fill`` for background and unknown ids) while holding two arrays of
    length n_cells instead of max_label + 1 floats.
    """

    def __init__(self, ids: np.ndarray, values: np.ndarray, fill: float = np.nan):
        order = np.argsort(ids, kind="stable")
        ids = ids[order]
        values = values[order]
        # duplicated ids: the last one wins, as in the dense table
        keep = np.ones(ids.size, dtype=bool)
        if ids.size > 1:
            keep[:-1] = ids[1:] != ids[:-1]
        keep &= ids != 0  # background is never painted
        self.ids = np.ascontiguousarray(ids[keep])
        self.values = np.ascontiguousarray(values[keep], dtype=np.float32)
        self.fill = np.float32(fill)
        self.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + self.values.nbytes)

    def __len__(self) -> int:
        return int(self.ids[-1]) + 1 if self.ids.size else 1

    def __getitem__(self, block) -> np.ndarray:
        block = np.asarray(block)
        if self.ids.size == 0:
            return np.full(block.shape, self.fill, dtype=np.float32)
        idx = np.searchsorted(self.ids, block)
        np.minimum(idx, self.ids.size - 1, out=idx)
        hit = self.ids[idx] == block
        return np.where(hit, self.values[idx], self.fill).astype(np.float32, copy=False)

    def __dask_tokenize__(self):
        return ("SortedLookup", tokenize(self.ids, self.values, float(self.fill)))


def lookup_table(label_ids, values, fill: float = np.nan) -> np.ndarray | SortedLookup:
    """The table mapping label id -> value: float32 of length max_label + 1.

    Entry 0 (background) and every id not in ``label_ids`` hold ``fill`` (NaN by
    default: transparent under a napari colormap). A repeated id keeps its last
    value. Past :data:`DENSE_LIMIT` a :class:`SortedLookup` is returned instead
    of a dense table (same ``lut[block]`` interface, memory O(cells)).
    """
    ids = np.asarray(label_ids)
    vals = np.asarray(values, dtype=np.float32).ravel()
    if ids.ndim != 1:
        ids = ids.ravel()
    if ids.size != vals.size:
        raise ValueError(f"{ids.size} label ids but {vals.size} values")
    if ids.size and not np.issubdtype(ids.dtype, np.integer):
        as_int = ids.astype(np.int64)
        if not np.array_equal(as_int, ids):
            raise ValueError("label ids must be integers")
        ids = as_int
    ids = ids.astype(np.int64, copy=False)
    if ids.size and ids.min() < 0:
        raise ValueError("label ids must be >= 0")
    top = int(ids.max()) if ids.size else 0
    if top > DENSE_LIMIT:
        return SortedLookup(ids, vals, fill)
    lut = np.full(top + 1, fill, dtype=np.float32)
    lut[ids] = vals
    lut[0] = fill
    return lut


def _apply_lut(block: np.ndarray, lut) -> np.ndarray:
    """``lut[block]`` for one block; ids outside a dense table read as the background value."""
    if not isinstance(lut, np.ndarray):
        return lut[block]
    n = lut.shape[0]
    out = lut.take(block, mode="clip")  # negative ids clip to 0 = background
    if block.size and np.iinfo(block.dtype).max >= n and block.max() >= n:
        out[block >= n] = lut[0]
    return out


# ---------------------------------------------------------------- pyramid


class _CachedLevel:
    """A small pyramid level that is computed whole once, on first read, then kept.

    A strided level of a lazily read mask touches every chunk of level 0; keeping
    the coarse levels (at most a few MiB) means the overview is read once per mask,
    not once per gene switch.
    """

    def __init__(self, source: da.Array):
        self._source = source
        self.shape = tuple(int(s) for s in source.shape)
        self.dtype = source.dtype
        self.ndim = source.ndim
        self._value: np.ndarray | None = None
        self._lock = threading.Lock()

    def __getitem__(self, key):
        if self._value is None:
            with self._lock:
                if self._value is None:
                    self._value = np.asarray(self._source.compute())
        return self._value[key]

    def __dask_tokenize__(self):
        return ("_CachedLevel", self._source.name)


def _as_dask(labels) -> da.Array:
    if isinstance(labels, da.Array):
        return labels
    arr = labels if hasattr(labels, "shape") and hasattr(labels, "dtype") else np.asarray(labels)
    return da.from_array(arr, chunks=(_TARGET_CHUNK, _TARGET_CHUNK))


def _n_levels(shape: Sequence[int], min_side: int = _MIN_SIDE) -> int:
    side = max(int(shape[0]), int(shape[1]), 1)
    return 1 + max(0, math.ceil(math.log2(side / min_side))) if side > min_side else 1


def label_pyramid(labels, levels: int | None = None) -> list[da.Array]:
    """Nearest-neighbour pyramid of a 2-D label image: ``labels[::2**k, ::2**k]``, lazy.

    ``levels=None`` goes down until the long side is at most 1024 px. Levels of
    at most 2048 x 2048 px are computed once on first read and then kept (see
    :class:`_CachedLevel`); nothing is computed here.
    """
    base = _as_dask(labels)
    if base.ndim != 2:
        raise ValueError(f"labels must be 2-D (rows, cols), got shape {base.shape}")
    if not np.issubdtype(base.dtype, np.integer):
        raise ValueError(f"labels must be integers, got {base.dtype}")
    n = _n_levels(base.shape) if levels is None else int(levels)
    if n < 1:
        raise ValueError("levels must be >= 1")
    out = [base]
    for k in range(1, n):
        step = 2**k
        if min(base.shape[0], base.shape[1]) // step < 1:
            break
        lvl = base[::step, ::step]
        if max(lvl.chunksize) < _MIN_CHUNK:
            lvl = lvl.rechunk(tuple(min(_TARGET_CHUNK, s) for s in lvl.shape))
        if lvl.shape[0] * lvl.shape[1] <= _CACHE_PIXELS:
            cached = _CachedLevel(lvl)
            lvl = da.from_array(
                cached,
                chunks=tuple(min(_TARGET_CHUNK, s) for s in lvl.shape),
                name=f"deepspot2cell-labels-{tokenize(lvl.name)}",
                meta=np.empty((0, 0), dtype=lvl.dtype),
                asarray=False,
            )
        out.append(lvl)
    return out


# ---------------------------------------------------------------- paint


def paint(levels: Sequence[da.Array], lut) -> list[da.Array]:
    """Each label level mapped through ``lut`` block by block: lazy float32 arrays.

    Building is O(levels) graph work; ``lut`` is shared by every task (not copied).
    """
    token = tokenize(lut)
    painted = []
    for lvl in levels:
        lvl = _as_dask(lvl)
        painted.append(
            da.map_blocks(
                _apply_lut,
                lvl,
                lut=lut,
                dtype=np.float32,
                meta=np.empty((0,) * lvl.ndim, dtype=np.float32),
                name=f"deepspot2cell-paint-{tokenize(lvl.name, token)}",
            )
        )
    return painted


def robust_limits(values, lo: float = 1, hi: float = 99) -> tuple[float, float]:
    """Percentile limits of ``values`` ignoring NaN/inf; never equal (widened when flat)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return 0.0, 1.0
    a, b = (float(x) for x in np.percentile(v, [lo, hi]))
    if not b > a:
        a, b = float(v.min()), float(v.max())
    if not b > a:
        pad = max(abs(a) * 0.05, 0.5)
        a, b = a - pad, a + pad
    return a, b
