"""Cells to spots by the inside rule: a cell is inside a spot when at least 60 %
of its mask pixels lie in the spot's disk.

The fractions are measured on the mask itself, block by block over the label
image, for all cells and spots at once. Each spot's disk is hashed onto the
blocks its bounding box touches; in a block, the pixels of each touching disk
are read from the block and reduced to (label, pixel count) pairs. The sparse
(cell, spot, count) triples of all blocks are merged at the end. The cost is
one pass over the pixels of the disks plus a sort of about one triple per cell;
never cells x spots.

A pixel (r, c) has its centre at (x=c, y=r), as in the cell table, and lies in
the disk of centre (x, y) and diameter d when (c - x)^2 + (r - y)^2 <= (d/2)^2.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy.spatial import cKDTree

from ..errors import InputError
from ..progress import Job, Progress, run
from .spots import Spots

STAGE = "assigning cells"


@dataclass
class Assignment:
    """Each cell's context spot and whether it lies inside that spot.

    spot: (N,) int64 index into the spots (-1: no context spot); for a grid the
    patch holding the centroid, for Visium the spot the cell is inside, else the
    nearest spot centre within one pitch. inside: (N,) bool. inside_fraction:
    (N,) fraction of the cell's pixels in its context spot's disk (0 without a
    disk). cells_per_spot: (M,) number of inside cells per spot. label: (N,) the
    cells' label ids, in the order of the cell table.
    """

    spot: np.ndarray
    inside: np.ndarray
    inside_fraction: np.ndarray
    cells_per_spot: np.ndarray
    label: np.ndarray | None = None
    pitch_px: float | None = None

    def __len__(self) -> int:
        return len(self.spot)


def spot_pitch(spots: Spots) -> float:
    """Median distance between a spot centre and its nearest other spot centre."""
    xy = np.asarray(spots.xy, dtype=np.float64)
    if len(xy) < 2:
        return float(spots.patch_px or spots.tile_px or spots.diameter_px or 0.0)
    d, _ = cKDTree(xy).query(xy, k=2)
    return float(np.median(d[:, 1]))


def _disk_bboxes(xy: np.ndarray, radius: float, shape: tuple[int, int]) -> np.ndarray:
    """Half-open pixel boxes (r0, c0, r1, c1) of the disks, clipped to the image."""
    h, w = shape
    x, y = xy[:, 0], xy[:, 1]
    r0 = np.clip(np.ceil(y - radius), 0, h).astype(np.int64)
    r1 = np.clip(np.floor(y + radius) + 1, 0, h).astype(np.int64)
    c0 = np.clip(np.ceil(x - radius), 0, w).astype(np.int64)
    c1 = np.clip(np.floor(x + radius) + 1, 0, w).astype(np.int64)
    return np.stack([r0, c0, r1, c1], axis=1)


def _block_hash(boxes: np.ndarray, block: int, nbc: int) -> dict[int, np.ndarray]:
    """Grid hash: block id -> indices of the spots whose disk box touches the block."""
    nonempty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    idx = np.flatnonzero(nonempty)
    b = boxes[idx]
    br0, bc0 = b[:, 0] // block, b[:, 1] // block
    br1, bc1 = (b[:, 2] - 1) // block, (b[:, 3] - 1) // block
    spot_parts, key_parts = [], []
    for dr in range(int((br1 - br0).max(initial=0)) + 1):
        for dc in range(int((bc1 - bc0).max(initial=0)) + 1):
            ok = (br0 + dr <= br1) & (bc0 + dc <= bc1)
            spot_parts.append(idx[ok])
            key_parts.append((br0[ok] + dr) * nbc + bc0[ok] + dc)
    if not spot_parts:
        return {}
    sp, keys = np.concatenate(spot_parts), np.concatenate(key_parts)
    order = np.argsort(keys, kind="stable")
    sp, keys = sp[order], keys[order]
    uk, start = np.unique(keys, return_index=True)
    stops = np.append(start[1:], len(keys))
    return {int(k): np.sort(sp[a:b]) for k, a, b in zip(uk, start, stops)}


def _pixel_counts(labels, xy: np.ndarray, diameter: float, block: int) -> Job[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Job: (label, spot, pixel count) triples of every label pixel in every disk."""
    h, w = labels.shape
    radius = float(diameter) / 2.0
    r2 = radius * radius
    boxes = _disk_bboxes(xy, radius, (h, w))
    nbr, nbc = -(-h // block), -(-w // block)
    table = _block_hash(boxes, block, nbc)
    total = nbr * nbc
    labs_parts, spot_parts, count_parts = [], [], []
    done = 0
    for bi in range(nbr):
        for bj in range(nbc):
            members = table.get(bi * nbc + bj)
            if members is not None:
                by, bx = bi * block, bj * block
                arr = np.asarray(labels[by : by + block, bx : bx + block])
                bh, bw = arr.shape
                for s in members:
                    r0, c0, r1, c1 = boxes[s]
                    r0, r1 = max(r0, by), min(r1, by + bh)
                    c0, c1 = max(c0, bx), min(c1, bx + bw)
                    if r0 >= r1 or c0 >= c1:
                        continue
                    win = arr[r0 - by : r1 - by, c0 - bx : c1 - bx]
                    dy2 = (np.arange(r0, r1, dtype=np.float64) - xy[s, 1]) ** 2
                    dx2 = (np.arange(c0, c1, dtype=np.float64) - xy[s, 0]) ** 2
                    disk = (dy2[:, None] + dx2[None, :]) <= r2
                    vals = win[disk & (win != 0)]
                    if vals.size == 0:
                        continue
                    u, n = np.unique(vals, return_counts=True)
                    labs_parts.append(u.astype(np.int64, copy=False))
                    spot_parts.append(np.full(u.size, s, dtype=np.int64))
                    count_parts.append(n.astype(np.int64, copy=False))
            done += 1
            yield Progress(STAGE, done, total)
    if not labs_parts:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty
    return np.concatenate(labs_parts), np.concatenate(spot_parts), np.concatenate(count_parts)


def _grid_context(cells_xy: np.ndarray, spots: Spots, shape: tuple[int, int]) -> np.ndarray:
    """The patch holding each centroid, by the rule of :func:`patch_grid`; -1 if absent."""
    patch = float(spots.patch_px or spots.tile_px)
    if spots.grid_rc is None:
        raise ValueError("a grid Spots needs grid_rc")
    h, w = shape
    nrow, ncol = int(np.ceil(h / patch)), int(np.ceil(w / patch))
    r = np.clip(np.floor((cells_xy[:, 1] + 0.5) / patch), 0, nrow - 1).astype(np.int64)
    c = np.clip(np.floor((cells_xy[:, 0] + 0.5) / patch), 0, ncol - 1).astype(np.int64)
    rc = np.asarray(spots.grid_rc, dtype=np.int64)
    width = max(ncol, int(rc[:, 1].max(initial=0)) + 1)
    keys = rc[:, 0] * width + rc[:, 1]
    out = np.full(len(r), -1, np.int64)
    if len(keys) == 0:
        return out
    order = np.argsort(keys, kind="stable")
    sk = keys[order]
    q = r * width + c
    pos = np.clip(np.searchsorted(sk, q), 0, len(sk) - 1)
    found = sk[pos] == q
    out[found] = order[pos[found]]
    return out


def _pair_lookup(pair_cell, pair_spot, pair_frac, m, qcell, qspot) -> np.ndarray:
    """The fraction of each queried (cell, spot) pair; 0 for pairs that share no pixel.

    The pairs come out of np.unique on cell * m + spot, so their keys are sorted.
    """
    out = np.zeros(len(qcell))
    if pair_cell.size == 0 or len(qcell) == 0:
        return out
    keys = pair_cell * m + pair_spot
    q = np.asarray(qcell, np.int64) * m + np.asarray(qspot, np.int64)
    pos = np.clip(np.searchsorted(keys, q), 0, keys.size - 1)
    hit = keys[pos] == q
    out[hit] = pair_frac[pos[hit]]
    return out


def iter_assign_cells(
    labels,
    cells: pd.DataFrame,
    spots: Spots,
    *,
    inside_threshold: float = 0.6,
    block: int = 4096,
) -> Job[Assignment]:
    """Job: assign every cell of the table to its context spot and decide inside/outside.

    labels: numpy or dask (H, W) integer mask, 0 = background; cells: the cell
    table of that mask (label, x, y, area); spots: the layout. Yields
    ``Progress("assigning cells", done, total)`` per block of the label image.
    """
    if labels.ndim != 2:
        raise InputError(None, f"a label image must be 2-D, got shape {tuple(labels.shape)}")
    if block < 1:
        raise ValueError("block must be >= 1")
    cell_labels = cells["label"].to_numpy(dtype=np.int64)
    cells_xy = cells[["x", "y"]].to_numpy(dtype=np.float64)
    area = cells["area"].to_numpy(dtype=np.float64)
    n, m = len(cell_labels), len(spots)
    spot_xy = np.asarray(spots.xy, dtype=np.float64).reshape(-1, 2)
    diameter = spots.diameter_px
    pitch = spot_pitch(spots) if m else 0.0

    if diameter is not None and n:
        disk_area = np.pi * (float(diameter) / 2.0) ** 2
        median_area = float(np.median(area))
        if disk_area < median_area:
            cell_d = 2.0 * np.sqrt(median_area / np.pi)
            raise InputError(
                None,
                f"spots are smaller than cells: spot diameter {float(diameter):.1f} px against a median cell "
                f"diameter {cell_d:.1f} px; check --um-per-px / the spot diameter",
            )

    # Sparse (cell, spot) -> pixel count, merged over blocks.
    pair_cell = pair_spot = pair_count = np.zeros(0, np.int64)
    if diameter is not None and n and m:
        labs, sp, cnt = yield from _pixel_counts(labels, spot_xy, float(diameter), int(block))
        order = np.argsort(cell_labels, kind="stable")
        sorted_labels = cell_labels[order]
        pos = np.clip(np.searchsorted(sorted_labels, labs), 0, n - 1)
        known = sorted_labels[pos] == labs
        ci = order[pos[known]]
        sp, cnt = sp[known], cnt[known]
        key = ci * m + sp
        uk, inv = np.unique(key, return_inverse=True)
        pair_count = np.bincount(inv.ravel(), weights=cnt, minlength=uk.size).astype(np.int64)
        pair_cell, pair_spot = uk // m, uk % m
    else:
        yield Progress(STAGE, 1, 1)

    with np.errstate(divide="ignore", invalid="ignore"):
        pair_frac = np.where(area[pair_cell] > 0, pair_count / area[pair_cell], 0.0)

    # Best spot per cell: sort pairs by (cell, fraction, -spot) and keep each cell's
    # last: the largest fraction, ties (overlapping disks) to the lowest spot index.
    best_spot = np.full(n, -1, np.int64)
    best_frac = np.zeros(n)
    if pair_cell.size:
        o = np.lexsort((-pair_spot, pair_frac, pair_cell))
        last = np.append(pair_cell[o][1:] != pair_cell[o][:-1], True)
        sel = o[last]
        best_spot[pair_cell[sel]] = pair_spot[sel]
        best_frac[pair_cell[sel]] = pair_frac[sel]

    if spots.kind == "grid":
        context = _grid_context(cells_xy, spots, labels.shape) if n and m else np.full(n, -1, np.int64)
        frac = np.zeros(n)
        want = np.flatnonzero(context >= 0)
        frac[want] = _pair_lookup(pair_cell, pair_spot, pair_frac, m, want, context[want])
        inside = frac >= inside_threshold if diameter is not None else np.zeros(n, bool)
    else:
        inside = (best_spot >= 0) & (best_frac >= inside_threshold) if diameter is not None else np.zeros(n, bool)
        context = np.where(inside, best_spot, -1)
        frac = np.where(inside, best_frac, 0.0)
        rest = np.flatnonzero(~inside)
        if rest.size and m:
            d, j = cKDTree(spot_xy).query(cells_xy[rest])
            near = d <= pitch
            context[rest[near]] = j[near]
            frac[rest[near]] = _pair_lookup(pair_cell, pair_spot, pair_frac, m, rest[near], j[near])

    if diameter is not None and not inside.any():
        raise InputError(
            None,
            f"no cell lies >= {inside_threshold * 100:g} % inside any spot: check the pixel size and that the "
            "spots belong to this slide",
        )
    cells_per_spot = np.bincount(context[inside], minlength=m).astype(np.int64) if m else np.zeros(0, np.int64)
    return Assignment(
        spot=context.astype(np.int64),
        inside=inside.astype(bool),
        inside_fraction=frac.astype(np.float64),
        cells_per_spot=cells_per_spot,
        label=cell_labels,
        pitch_px=pitch,
    )


def assign_cells(
    labels,
    cells: pd.DataFrame,
    spots: Spots,
    *,
    inside_threshold: float = 0.6,
    block: int = 4096,
) -> Assignment:
    """Assign cells to spots without progress events (see :func:`iter_assign_cells`)."""
    return run(iter_assign_cells(labels, cells, spots, inside_threshold=inside_threshold, block=block))


def nearest_spot_baseline(cells_xy: np.ndarray, spots: Spots, spot_values) -> np.ndarray:
    """(N, G): each cell painted with the value of its nearest spot centre.

    The baseline every cell-level metric compares against. ``spot_values`` is
    (M, G), dense or scipy sparse, in the order of ``spots``.
    """
    cells_xy = np.asarray(cells_xy, dtype=np.float64).reshape(-1, 2)
    if len(spots) == 0:
        raise InputError(None, "no spots to paint cells from")
    if spot_values.shape[0] != len(spots):
        raise ValueError(f"spot_values has {spot_values.shape[0]} rows for {len(spots)} spots")
    _, j = cKDTree(np.asarray(spots.xy, dtype=np.float64)).query(cells_xy)
    out = spot_values[j]
    if hasattr(out, "toarray"):
        out = out.toarray()
    return np.asarray(out)
