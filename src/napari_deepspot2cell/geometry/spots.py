"""Spot layouts (Visium disks or a square patch grid) and their neighbours.

A `Spots` holds, for every spot or patch, the centre of the square tile that is
embedded as its context, and the indices of its neighbours (-1 = missing).
Visium spots also carry the disk used by the 60 % inside rule; so do simulated
spots, which sit on a grid with a disk in the middle of each patch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from ..errors import InputError

GRID_OFFSETS = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1)]
# Visium array coordinates: the six hexagonal neighbours of (row, col).
HEX_OFFSETS = [(0, -2), (0, 2), (-1, -1), (-1, 1), (1, -1), (1, 1)]


@dataclass
class Spots:
    ids: np.ndarray  # (M,) str
    xy: np.ndarray  # (M, 2) float64 tile centres, level-0 px, (x, y)
    tile_px: float  # side of the square context tile
    kind: str  # "visium" or "grid"
    neighbours: np.ndarray  # (M, K) int64, -1 where missing
    diameter_px: float | None = None  # disk of the inside rule; None: no disk (inference grid)
    grid_rc: np.ndarray | None = None  # (M, 2) int64 (row, col) of each patch, grid only
    patch_px: float | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def neighbour_missing(self) -> np.ndarray:
        return self.neighbours < 0


def _neighbours_from_rc(rc: np.ndarray, offsets) -> np.ndarray:
    index = {(int(r), int(c)): i for i, (r, c) in enumerate(rc)}
    out = np.full((len(rc), len(offsets)), -1, dtype=np.int64)
    for i, (r, c) in enumerate(rc):
        for k, (dr, dc) in enumerate(offsets):
            out[i, k] = index.get((int(r) + dr, int(c) + dc), -1)
    return out


def hex_neighbours(xy: np.ndarray, pitch_px: float | None = None) -> np.ndarray:
    """Up to six nearest spots within 1.25 pitch, for spots without array coordinates."""
    m = len(xy)
    out = np.full((m, 6), -1, dtype=np.int64)
    if m < 2:
        return out
    tree = cKDTree(xy)
    if pitch_px is None:
        d, _ = tree.query(xy, k=2)
        pitch_px = float(np.median(d[:, 1]))
    d, idx = tree.query(xy, k=min(7, m), distance_upper_bound=1.25 * pitch_px)
    for i in range(m):
        found = [j for dj, j in zip(d[i], idx[i]) if j != i and j < m and np.isfinite(dj)][:6]
        out[i, : len(found)] = found
    return out


def patch_grid(
    shape: tuple[int, int],
    patch_px: float,
    cell_xy: np.ndarray,
    *,
    spot_diameter_px: float | None = None,
) -> tuple[Spots, np.ndarray]:
    """The square patch grid over the slide, limited to patches that hold a cell
    centroid and their 8 neighbours (the others are never needed).

    Returns the grid and, for every cell, the index of the patch holding its
    centroid. Patch (r, c) holds the pixel rows [r * patch_px, (r + 1) * patch_px).
    """
    if not patch_px > 0:
        raise InputError(None, f"patch size must be positive, got {patch_px} px")
    h, w = shape
    nrow, ncol = int(np.ceil(h / patch_px)), int(np.ceil(w / patch_px))
    cell_rc = np.stack(
        [np.clip(np.floor((cell_xy[:, 1] + 0.5) / patch_px), 0, nrow - 1), np.clip(np.floor((cell_xy[:, 0] + 0.5) / patch_px), 0, ncol - 1)],
        axis=1,
    ).astype(np.int64)
    occupied = np.unique(cell_rc, axis=0) if len(cell_rc) else np.zeros((0, 2), np.int64)
    ring = [occupied + np.array(o) for o in GRID_OFFSETS]
    rc = np.unique(np.concatenate([occupied, *ring]), axis=0) if len(occupied) else occupied
    keep = (rc[:, 0] >= 0) & (rc[:, 0] < nrow) & (rc[:, 1] >= 0) & (rc[:, 1] < ncol)
    rc = rc[keep]
    key = rc[:, 0] * ncol + rc[:, 1]  # sorted, since rc is sorted row-major
    cell_patch = np.searchsorted(key, cell_rc[:, 0] * ncol + cell_rc[:, 1])
    # Centres in the pixel-centre convention of the cell table (pixel i spans i +- 0.5).
    xy = np.stack([(rc[:, 1] + 0.5) * patch_px - 0.5, (rc[:, 0] + 0.5) * patch_px - 0.5], axis=1)
    ids = np.array([f"r{r}_c{c}" for r, c in rc], dtype=object)
    grid = Spots(
        ids=ids,
        xy=xy,
        tile_px=float(patch_px),
        kind="grid",
        neighbours=_neighbours_from_rc(rc, GRID_OFFSETS),
        diameter_px=spot_diameter_px,
        grid_rc=rc,
        patch_px=float(patch_px),
    )
    return grid, cell_patch


def spots_from_anndata(adata) -> Spots:
    """Visium spots from the normalised AnnData of :func:`io.spots.read_spots`."""
    meta = adata.uns["deepspot2cell_spots"]
    diameter = float(meta["diameter_px"])
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    if {"array_row", "array_col"} <= set(adata.obs.columns):
        rc = adata.obs[["array_row", "array_col"]].to_numpy(dtype=np.int64)
        neighbours = _neighbours_from_rc(rc, HEX_OFFSETS)
    else:
        neighbours = hex_neighbours(xy)
    return Spots(
        ids=np.asarray(adata.obs_names, dtype=object),
        xy=xy,
        tile_px=diameter,
        kind="visium",
        neighbours=neighbours,
        diameter_px=diameter,
    )
