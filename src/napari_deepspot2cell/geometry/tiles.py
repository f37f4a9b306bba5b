"""Tile boxes and batched crop-and-resize on the device.

A tile is a square (cx, cy, side) in level-0 px, in the pixel-centre convention
of the cell table (pixel i covers [i - 0.5, i + 0.5]). Tiles are cut from a
region already read from the slide with one `grid_sample` call per batch, on
whatever device the encoder runs on: no per-tile PIL round trips.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from .spots import Spots

MIN_SIDE = 1.0


def cell_tile_boxes(cells: pd.DataFrame) -> np.ndarray:
    """(N, 3) float64 (cx, cy, side): the square of side max(w, h) of the cell's
    mask bounding box, centred on its centroid (DESIGN.md: cell tile)."""
    side = np.maximum(cells["x1"].to_numpy() - cells["x0"].to_numpy(), cells["y1"].to_numpy() - cells["y0"].to_numpy())
    return np.stack(
        [cells["x"].to_numpy(np.float64), cells["y"].to_numpy(np.float64), np.maximum(side, MIN_SIDE).astype(np.float64)],
        axis=1,
    )


def spot_tile_boxes(spots: Spots) -> np.ndarray:
    """(M, 3) float64: the square around each spot's disk, or each grid patch."""
    side = np.full(len(spots), float(spots.tile_px))
    return np.concatenate([spots.xy.astype(np.float64), side[:, None]], axis=1)


def box_extent(boxes: np.ndarray) -> tuple[int, int, int, int]:
    """Integer pixel window (y0, x0, y1, x1) holding every box, plus one pixel for interpolation."""
    half = boxes[:, 2] / 2
    x0 = int(np.floor((boxes[:, 0] - half).min())) - 1
    x1 = int(np.ceil((boxes[:, 0] + half).max())) + 2
    y0 = int(np.floor((boxes[:, 1] - half).min())) - 1
    y1 = int(np.ceil((boxes[:, 1] + half).max())) + 2
    return y0, x0, y1, x1


def crop_resize(
    region: torch.Tensor,
    origin: tuple[int, int],
    boxes: np.ndarray | torch.Tensor,
    size: int,
    *,
    fill: float = 1.0,
    max_supersample: int = 4,
    shifted: bool = False,
) -> torch.Tensor:
    """Cut `boxes` out of `region` and resize each to (size, size).

    region: (3, H, W) float in [0, 1] on the target device, whose pixel (0, 0)
    is slide pixel `origin` = (y, x). Returns (B, 3, size, size) in region's
    dtype. Parts of a box outside the region take the value `fill` (white, as
    glass is). Tiles shrunk by more than 2x are sampled at up to
    `max_supersample` times the size and average-pooled, so small outputs of
    large tiles are not aliased. With `shifted=True` the region already holds
    `pixels - fill` (see :func:`prepare_region`), which saves a copy of the whole
    region per batch.
    """
    boxes_t = torch.as_tensor(boxes, dtype=torch.float64)
    # The supersampling factor is a property of each tile alone, so that a tile
    # comes out the same whatever batch it is cut in.
    shrink = boxes_t[:, 2] / size
    ks = torch.where(shrink > 2, torch.ceil(shrink / 2).clamp(max=max_supersample), torch.ones_like(shrink)).long()
    src = region if shifted else region - fill
    factors = torch.unique(ks).tolist()
    if len(factors) == 1:  # the usual case: no scatter into a second batch-sized buffer
        return _sample(src, origin, boxes_t, size, int(factors[0])).add_(fill)
    out = torch.empty((boxes_t.shape[0], 3, size, size), dtype=region.dtype, device=region.device)
    for k in factors:
        sel = torch.nonzero(ks == k).flatten()
        out[sel.to(region.device)] = _sample(src, origin, boxes_t[sel], size, int(k))
    return out.add_(fill)


def prepare_region(pixels: np.ndarray, device: torch.device, fill: float = 1.0) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 `pixels / 255 - fill` on the device, for `crop_resize(..., shifted=True)`."""
    t = torch.from_numpy(np.ascontiguousarray(pixels)).to(device).permute(2, 0, 1).float()
    return t.div_(255.0).sub_(fill)


def _sample(src: torch.Tensor, origin, boxes_t: torch.Tensor, size: int, k: int) -> torch.Tensor:
    """Bilinear samples of the fill-shifted region `src`; outside it they are 0."""
    region = src
    b = boxes_t.shape[0]
    _, h, w = region.shape
    oy, ox = origin
    s = size * k
    # Output sample j of S sits at t = (2j + 1) / S - 1 in [-1, 1]; slide coordinate
    # X = cx + t * side / 2; grid_sample (align_corners=False) wants
    # u = 2 * (X - (ox - 0.5)) / W - 1 for the region.
    t = (torch.arange(s, dtype=torch.float64) * 2 + 1) / s - 1
    cx, cy, side = boxes_t[:, 0:1], boxes_t[:, 1:2], boxes_t[:, 2:3]
    u = 2 * (cx + t[None, :] * side / 2 - ox + 0.5) / w - 1  # (B, S)
    v = 2 * (cy + t[None, :] * side / 2 - oy + 0.5) / h - 1  # (B, S)
    # The grid is separable: only u and v (B x S each) cross to the device, and the
    # (B, S, S, 2) grid is broadcast there. Built on the host it was ~100 MB and
    # ~0.1 s of one core per batch of 256 at 224 px, more than a GPU needs to encode it.
    u, v = (a.to(device=region.device, dtype=region.dtype) for a in (u, v))
    grid = torch.stack(torch.broadcast_tensors(u[:, None, :], v[:, :, None]), dim=-1)  # (B, S, S, 2) as (x, y)
    # All tiles sampled as one tall image from the single region: no copy of the region per tile.
    grid = grid.reshape(1, b * s, s, 2)
    out = F.grid_sample(src.unsqueeze(0), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    out = out.view(3, b, s, s).permute(1, 0, 2, 3)
    if k > 1:
        out = F.avg_pool2d(out, k)
    return out
