"""The cell table from a label image, computed block by block.

A whole-slide mask (40k x 40k px, a million cells) is never held whole: each
block of the dask array is reduced to per-label partial sums (pixel count,
coordinate sums, bounding box) and the partials are merged. Memory is one block
plus a few arrays per cell.
"""

from __future__ import annotations

from collections.abc import Iterator

import dask.array as da
import numpy as np
import pandas as pd

from ..errors import InputError
from ..progress import Job, Progress

COLUMNS = ["label", "x", "y", "area", "y0", "x0", "y1", "x1"]
_BLOCK = 4096


def _block_partials(block: np.ndarray, oy: int, ox: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-label ids (int64) and (n, sum_y, sum_x, min_y, min_x, max_y, max_x) of one block.

    Works on runs, not pixels: a cell crosses each row of the block in a run or a
    few, so the sums and extremes are taken over ~25x fewer items than pixels
    (a run [c0, c1) on row r adds c1 - c0 pixels, (c1 - c0) * r to sum_y and
    (c1 - c0) * (c0 + c1 - 1) / 2 to sum_x, all exact integers).

    reliability: the ids stay int64, apart from the float statistics; as float64 two
    ids above 2**53 (int64 masks) became one cell with a third id."""
    w = block.shape[1]
    flat = block.ravel()
    if flat.size == 0:
        return None
    starts_mask = np.empty(flat.size, dtype=bool)
    starts_mask[0] = True
    np.not_equal(flat[1:], flat[:-1], out=starts_mask[1:])
    starts_mask[::w] = True  # a run never crosses a row
    starts = np.flatnonzero(starts_mask)
    del starts_mask
    ends = np.empty_like(starts)
    ends[:-1] = starts[1:]
    ends[-1] = flat.size
    labs = flat[starts]
    fg = labs != 0
    if not fg.any():
        return None
    starts, ends, labs = starts[fg], ends[fg], labs[fg]
    rows = starts // w
    c0 = starts - rows * w
    length = ends - starts
    c1 = c0 + length  # exclusive
    uniq, inv = np.unique(labs, return_inverse=True)
    inv = inv.ravel()
    k = uniq.size
    n = np.bincount(inv, weights=length, minlength=k)
    sy = np.bincount(inv, weights=rows * length, minlength=k)
    sx = np.bincount(inv, weights=(length * (c0 + c1 - 1)) // 2, minlength=k)
    miny = np.full(k, np.iinfo(np.int64).max)
    minx = miny.copy()
    maxy = np.full(k, -1)
    maxx = maxy.copy()
    np.minimum.at(miny, inv, rows)
    np.minimum.at(minx, inv, c0)
    np.maximum.at(maxy, inv, rows)
    np.maximum.at(maxx, inv, c1 - 1)
    return uniq.astype(np.int64), np.stack(
        [n, sy + oy * n, sx + ox * n, miny + oy, minx + ox, maxy + oy, maxx + ox],
        axis=1,
    ).astype(np.float64)


def _blocks(labels: da.Array, block: int) -> Iterator[tuple[np.ndarray, int, int]]:
    h, w = labels.shape
    for y in range(0, h, block):
        for x in range(0, w, block):
            yield np.asarray(labels[y : y + block, x : x + block]), y, x


def iter_cell_table(labels, *, block: int = _BLOCK, source=None) -> Job[pd.DataFrame]:
    """Job: the cell table of a label image (numpy or dask, 2-D, 0 = background).

    Returns a DataFrame indexed by label with columns label, x, y (centroid in
    level-0 px, x = column), area (px) and the half-open bounding box y0, x0,
    y1, x1. Rows are sorted by label.
    """
    if labels.ndim != 2:
        raise InputError(source, f"a label image must be 2-D, got shape {tuple(labels.shape)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise InputError(source, f"labels must be integers, got {labels.dtype}")
    if not isinstance(labels, da.Array):
        labels = da.from_array(labels, chunks=(block, block))
    h, w = labels.shape
    total = -(-h // block) * -(-w // block)
    parts: list[np.ndarray] = []
    for i, (arr, oy, ox) in enumerate(_blocks(labels, block)):
        if arr.min(initial=0) < 0:
            raise InputError(source, "labels must be >= 0 (0 = background)")
        if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            # reliability: such ids wrapped to negative int64 labels
            raise InputError(source, f"label ids above {np.iinfo(np.int64).max} (2**63 - 1) are not supported; renumber the cells")
        part = _block_partials(arr, oy, ox)
        if part is not None:
            parts.append(part)
        yield Progress("cells", i + 1, total)
    return _merge(parts)


def _merge(parts: list[np.ndarray]) -> pd.DataFrame:
    if not parts:
        return pd.DataFrame({c: pd.Series(dtype=np.int64 if c not in ("x", "y") else np.float64) for c in COLUMNS}).set_index(
            pd.Index([], name="label_id", dtype=np.int64), drop=False
        )
    labs = np.concatenate([q[0] for q in parts])
    p = np.concatenate([q[1] for q in parts])
    uniq, inv = np.unique(labs, return_inverse=True)
    inv = inv.ravel()
    k = uniq.size
    n = np.bincount(inv, weights=p[:, 0], minlength=k)
    sy = np.bincount(inv, weights=p[:, 1], minlength=k)
    sx = np.bincount(inv, weights=p[:, 2], minlength=k)
    ext = []
    for col, fn, init in ((3, np.minimum, np.inf), (4, np.minimum, np.inf), (5, np.maximum, -np.inf), (6, np.maximum, -np.inf)):
        out = np.full(k, init)
        fn.at(out, inv, p[:, col])
        ext.append(out.astype(np.int64))
    df = pd.DataFrame(
        {
            "label": uniq.astype(np.int64),
            "x": sx / n,
            "y": sy / n,
            "area": n.astype(np.int64),
            "y0": ext[0],
            "x0": ext[1],
            "y1": ext[2] + 1,
            "x1": ext[3] + 1,
        }
    )
    df.index = pd.Index(df["label"].to_numpy(), name="label_id")
    return df


def cell_table(labels, *, block: int = _BLOCK, source=None) -> pd.DataFrame:
    """The cell table, computed without progress events (see :func:`iter_cell_table`)."""
    from ..progress import run

    return run(iter_cell_table(labels, block=block, source=source))
