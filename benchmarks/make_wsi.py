"""Write a synthetic whole-slide image and its label mask, tile by tile.

* ``slide.tif``: pyramidal tiled RGB BigTIFF, JPEG tiles of 512 x 512, a SubIFD
  pyramid halving down to ~1k px, resolution tags giving um/px.
* ``mask.tif``: tiled uint32 label BigTIFF (zstd, 512 tiles), same level-0 shape.

Cells sit on a jittered square lattice of pitch ``p`` px: lattice cell (i, j)
holds one disk of radius r(i, j) centred at its lattice point plus a jitter,
all drawn from an integer hash of (i, j, seed); the disk never leaves its
lattice cell, so any tile is rendered analytically on its own, and neither file
is ever held whole in memory (``TiffWriter.write`` takes a tile generator).
Label of (i, j) = i * ncols + j + 1; only lattice cells wholly inside the image
get a cell, so the cell count is exactly ``rows * cols`` (see :func:`lattice`).
Colours are H&E-like: pale pink glass, pink cytoplasm, purple nucleus, with
per-cell variation and a little pixel noise.

    python benchmarks/make_wsi.py OUT_DIR --size 40000 --cells 1000000 [--check]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TILE = 512
_M1, _M2, _M3 = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_BACKGROUND = np.array([239.0, 222.0, 233.0], np.float32)  # pale pink glass
_CYTOPLASM = np.array([224.0, 145.0, 185.0], np.float32)  # eosin pink
_NUCLEUS = np.array([98.0, 58.0, 142.0], np.float32)  # haematoxylin purple


@dataclass(frozen=True)
class Lattice:
    shape: tuple[int, int]  # (H, W) level-0 px
    pitch: float  # px per lattice cell
    seed: int

    @property
    def rows(self) -> int:
        return int(math.floor(self.shape[0] / self.pitch))

    @property
    def cols(self) -> int:
        return int(math.floor(self.shape[1] / self.pitch))

    @property
    def n_cells(self) -> int:
        return self.rows * self.cols


def lattice(size, n_cells: int | None = None, pitch: float | None = None, seed: int = 0) -> Lattice:
    """The lattice of a (H, W) (or square ``size``) slide with about ``n_cells`` cells or the given pitch."""
    h, w = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    if pitch is None:
        if not n_cells:
            raise ValueError("give n_cells or pitch")
        pitch = math.sqrt(h * w / float(n_cells))
    if pitch < 8:
        raise ValueError(f"lattice pitch {pitch:.2f} px is too small (>= 8 px: a cell needs a radius of >= 2 px)")
    return Lattice((h, w), float(pitch), int(seed))


# ---------------------------------------------------------------- the analytic cells


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic)."""
    z = (z ^ (z >> np.uint64(30))) * _M2
    z = (z ^ (z >> np.uint64(27))) * _M3
    return z ^ (z >> np.uint64(31))


def _uniforms(i: np.ndarray, j: np.ndarray, seed: int, k: int) -> list[np.ndarray]:
    """k independent uniforms in [0, 1) per lattice cell, from a hash of (i, j, seed)."""
    base = (i.astype(np.int64).astype(np.uint64) * _M1) ^ (j.astype(np.int64).astype(np.uint64) * _M3) ^ np.uint64(seed * 0x632BE59BD9B4E019 % 2**64)
    z = _mix(base)
    out = []
    for _ in range(k):
        z = _mix(z + _M1)
        out.append(((z >> np.uint64(11)).astype(np.float64) * (1.0 / 2**53)).astype(np.float32))
    return out


def cell_params(lat: Lattice, i: np.ndarray, j: np.ndarray) -> dict[str, np.ndarray]:
    """Geometry and colour of the cells of lattice cells (i, j) (arrays broadcast together)."""
    p = lat.pitch
    u = _uniforms(i, j, lat.seed, 8)
    r = p * (0.26 + 0.12 * u[0])
    m = p / 2 - r - 1.0  # jitter room: the disk stays >= 1 px inside its lattice cell
    cy = (i + 0.5) * p - 0.5 + (2 * u[1] - 1) * m
    cx = (j + 0.5) * p - 0.5 + (2 * u[2] - 1) * m
    rn = r * (0.38 + 0.17 * u[3])
    room = (r - rn) * 0.35
    ny = cy + (2 * u[4] - 1) * room
    nx = cx + (2 * u[5] - 1) * room
    valid = (i >= 0) & (j >= 0) & (i < lat.rows) & (j < lat.cols)
    label = np.where(valid, i.astype(np.int64) * lat.cols + j + 1, 0)
    return {"cy": cy, "cx": cx, "r2": r * r, "ny": ny, "nx": nx, "rn2": rn * rn,
            "cyto": 0.85 + 0.3 * u[6], "nuc": 0.75 + 0.5 * u[7], "label": label, "valid": valid}


_KEYS = ("cy", "cx", "r2", "ny", "nx", "rn2", "cyto", "nuc")


def _sample(lat: Lattice, ys: np.ndarray, xs: np.ndarray):
    """Per sample point (ys (n,), xs (m,) level-0 coordinates): label (0 outside any cell),
    in-nucleus flag and the cell's colour factors, each (n, m).

    The parameters of the few lattice cells under the window are computed once and
    gathered per pixel in one fancy-index of a (cells, 8) float32 table."""
    p = lat.pitch
    iy = np.floor((ys + 0.5) / p).astype(np.int64)
    jx = np.floor((xs + 0.5) / p).astype(np.int64)
    i0, j0 = int(iy.min()), int(jx.min())
    ni, nj = int(iy.max()) - i0 + 1, int(jx.max()) - j0 + 1
    ii, jj = np.meshgrid(np.arange(i0, i0 + ni), np.arange(j0, j0 + nj), indexing="ij")
    prm = cell_params(lat, ii, jj)
    # coordinates relative to the lattice origin of the window, so float32 stays exact enough
    oy, ox = np.float32(i0 * p), np.float32(j0 * p)
    table = np.stack([prm[k].astype(np.float64).ravel() for k in _KEYS], axis=1)
    table[:, [0, 3]] -= i0 * p
    table[:, [1, 4]] -= j0 * p
    table = table.astype(np.float32)
    labels = prm["label"].ravel()
    flat = ((iy - i0)[:, None] * nj + (jx - j0)[None, :]).astype(np.intp)
    g = table[flat]  # (n, m, 8)
    yr = (ys - oy).astype(np.float32)[:, None]
    xr = (xs - ox).astype(np.float32)[None, :]
    dy, dx = yr - g[..., 0], xr - g[..., 1]
    inside = dy * dy + dx * dx <= g[..., 2]
    label = np.where(inside, labels[flat], 0)
    ndy, ndx = yr - g[..., 3], xr - g[..., 4]
    nucleus = (ndy * ndy + ndx * ndx <= g[..., 5]) & (label > 0)
    return label, nucleus, g[..., 6], g[..., 7]


def _coords(start: int, n: int, scale: int) -> np.ndarray:
    """Level-0 coordinates of the centres of n level pixels from `start` at `scale`."""
    return ((np.arange(start, start + n, dtype=np.float64) + 0.5) * scale - 0.5).astype(np.float32)


def render_labels(lat: Lattice, y0: int, x0: int, h: int = TILE, w: int = TILE) -> np.ndarray:
    """(h, w) uint32 labels of the level-0 window from (y0, x0); 0 outside the image."""
    ys = np.arange(y0, y0 + h, dtype=np.float32)
    xs = np.arange(x0, x0 + w, dtype=np.float32)
    label, *_ = _sample(lat, ys, xs)
    return label.astype(np.uint32)


class _Noise:
    def __init__(self, seed: int, side: int = 2 * TILE):
        rng = np.random.default_rng(seed + 7919)
        self.side = side
        self.field = rng.normal(0.0, 1.0, size=(side, side)).astype(np.float32)

    def tile(self, ty: int, tx: int, h: int, w: int) -> np.ndarray:
        oy, ox = (ty * 131 + tx * 17) % (self.side - h + 1), (tx * 89 + ty * 29) % (self.side - w + 1)
        return self.field[oy:oy + h, ox:ox + w]


def render_rgb(lat: Lattice, y0: int, x0: int, h: int, w: int, scale: int = 1, noise: _Noise | None = None) -> np.ndarray:
    """(h, w, 3) uint8 H&E-like pixels of the window from (y0, x0) of the level at ``scale``
    (level-0 px per level px). Levels above 0 are point-sampled at their pixel centres
    (cheap, and any tile of any level renders alone; thumbnails alias a little)."""
    ys, xs = _coords(y0, h, scale), _coords(x0, w, scale)
    label, nucleus, cyto, nuc = _sample(lat, ys, xs)
    cell = (label > 0)
    # class factors: background 1, cytoplasm `cyto`, nucleus `nuc`; one colour per class
    rgb = np.empty((h, w, 3), np.float32)
    rgb[:] = _BACKGROUND
    rgb[cell] = _CYTOPLASM * cyto[cell][:, None]
    rgb[nucleus] = _NUCLEUS * nuc[nucleus][:, None]
    if noise is not None:
        rgb += 6.0 * noise.tile(y0 // max(h, 1), x0 // max(w, 1), h, w)[..., None]
    rows_out = np.arange(y0, y0 + h) * scale >= lat.shape[0]
    cols_out = np.arange(x0, x0 + w) * scale >= lat.shape[1]
    rgb[rows_out] = 255.0
    rgb[:, cols_out] = 255.0
    np.clip(rgb, 0, 255, out=rgb)
    return rgb.astype(np.uint8)


# ---------------------------------------------------------------- writing


def _tiles(render, shape, tile: int, workers: int):
    """Row-major tiles of a level, rendered `workers` at a time with a bounded look-ahead."""
    h, w = shape
    origins = [(y, x) for y in range(0, h, tile) for x in range(0, w, tile)]
    if workers <= 1:
        for y, x in origins:
            yield render(y, x)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        it = iter(origins)
        for y, x in it:
            pending.append(pool.submit(render, y, x))
            if len(pending) >= 2 * workers:
                break
        for y, x in it:
            yield pending.popleft().result()
            pending.append(pool.submit(render, y, x))
        while pending:
            yield pending.popleft().result()


def level_shapes(shape, min_side: int = 1024) -> list[tuple[int, int]]:
    """Level shapes halving from level 0 while the previous level is larger than `min_side`."""
    h, w = shape
    out = [(h, w)]
    while max(out[-1]) > min_side:
        s = 2 ** len(out)
        out.append((-(-h // s), -(-w // s)))
    return out


def write_slide(path, lat: Lattice, um_per_px: float = 0.5, *, tile: int = TILE, quality: int = 85, workers: int = 2) -> Path:
    import tifffile

    path = Path(path)
    noise = _Noise(lat.seed)
    shapes = level_shapes(lat.shape)
    px_per_cm = 1e4 / um_per_px
    opts = dict(tile=(tile, tile), photometric="rgb", compression="jpeg", compressionargs={"level": quality},
                resolutionunit="CENTIMETER", metadata=None, dtype=np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for lev, shp in enumerate(shapes):
            scale = 2**lev

            def render(y, x, scale=scale):
                return render_rgb(lat, y, x, tile, tile, scale=scale, noise=noise)

            extra = {"subifds": len(shapes) - 1} if lev == 0 else {"subfiletype": 1}
            tif.write(_tiles(render, shp, tile, workers), shape=(*shp, 3),
                      resolution=(px_per_cm / scale, px_per_cm / scale), **extra, **opts)
    return path


def write_mask(path, lat: Lattice, um_per_px: float = 0.5, *, tile: int = TILE, workers: int = 2, compression: str = "zstd") -> Path:
    import tifffile

    path = Path(path)
    px_per_cm = 1e4 / um_per_px
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(_tiles(lambda y, x: render_labels(lat, y, x, tile, tile), lat.shape, tile, workers),
                  shape=lat.shape, dtype=np.uint32, tile=(tile, tile), compression=compression,
                  photometric="minisblack", resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", metadata=None)
    return path


def make_wsi(out_dir, size, *, n_cells: int | None = None, pitch: float | None = None, seed: int = 0,
             um_per_px: float = 0.5, slide: bool = True, mask: bool = True, name: str = "",
             quality: int = 85, workers: int = 2) -> dict:
    """Write ``{name}slide.tif`` and/or ``{name}mask.tif`` into ``out_dir``; returns what was written."""
    lat = lattice(size, n_cells=n_cells, pitch=pitch, seed=seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"shape": list(lat.shape), "pitch_px": round(lat.pitch, 4), "n_cells": lat.n_cells, "um_per_px": um_per_px, "seed": seed}
    if slide:
        t = time.perf_counter()
        info["slide"] = str(write_slide(out / f"{name}slide.tif", lat, um_per_px, quality=quality, workers=workers))
        info["slide_seconds"] = round(time.perf_counter() - t, 2)
        info["slide_bytes"] = Path(info["slide"]).stat().st_size
    if mask:
        t = time.perf_counter()
        info["mask"] = str(write_mask(out / f"{name}mask.tif", lat, um_per_px, workers=workers))
        info["mask_seconds"] = round(time.perf_counter() - t, 2)
        info["mask_bytes"] = Path(info["mask"]).stat().st_size
    return info


def check(info: dict, count_cells: bool = True) -> dict:
    """Open what :func:`make_wsi` wrote with the package's readers; count the cells."""
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.slides import open_slide

    shape = tuple(info["shape"])
    res: dict = {}
    if "slide" in info:
        with open_slide(info["slide"]) as s:
            res["slide_shape_ok"] = tuple(s.shape) == shape
            res["levels"] = [list(lv.shape[:2]) for lv in s.levels]
            res["um_per_px"] = round(s.um_per_px, 6)
            res["um_per_px_ok"] = abs(s.um_per_px - info["um_per_px"]) < 1e-6
    if "mask" in info and count_cells:
        from napari_deepspot2cell.geometry.cells import cell_table

        m = open_cells(info["mask"], shape, info["um_per_px"])
        try:
            n = len(cell_table(m.labels))
        finally:
            m.close()
        res["cells_found"] = n
        res["cells_ok"] = n == info["n_cells"]
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir")
    p.add_argument("--size", type=int, default=4096, help="side in px (square slide)")
    p.add_argument("--height", type=int, default=None, help="rows, if not square")
    p.add_argument("--cells", type=int, default=None, help="about this many cells (sets the pitch)")
    p.add_argument("--pitch", type=float, default=None, help="lattice pitch in px (default: from --cells, else 40)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--um-per-px", type=float, default=0.5)
    p.add_argument("--quality", type=int, default=85, help="JPEG quality")
    p.add_argument("--workers", type=int, default=2, help="tiles rendered at once")
    p.add_argument("--no-slide", action="store_true")
    p.add_argument("--no-mask", action="store_true")
    p.add_argument("--check", action="store_true", help="open both with the package's readers and count the cells")
    args = p.parse_args(argv)
    size = (args.height or args.size, args.size)
    pitch = args.pitch if (args.pitch or args.cells) else 40.0
    info = make_wsi(args.out_dir, size, n_cells=args.cells, pitch=args.pitch if args.pitch else (None if args.cells else pitch),
                    seed=args.seed, um_per_px=args.um_per_px, slide=not args.no_slide, mask=not args.no_mask,
                    quality=args.quality, workers=args.workers)
    if args.check:
        info["check"] = check(info)
    print(json.dumps(info, indent=1))
    return info


if __name__ == "__main__":
    try:
        import napari_deepspot2cell  # noqa: F401
    except ImportError:  # run from a checkout without installing
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    main()
