"""Cells per second through the whole embedding path against the per-tile path.

Whole path: ``iter_embed`` with the offline encoder: windows of the tiled JPEG
TIFF read once each by the reader thread, every cell tile cut and resized with
one ``grid_sample`` per batch, batches encoded. Per-tile path (the naive way),
on the same encoder and the same cells: for each cell read its box with
``slide.read_region``, resize it with PIL to the encoder's input size, make a
tensor and encode it alone. Target: >= 5x.

Also the CPU throughput of a ViT-L/16 of UNI's architecture with random weights
(``registry.build_encoder("uni")``), batches of 8 (no target on a CPU).

    python benchmarks/bench_embed.py            # 4k x 4k slide (~10k cells), 3 timed ViT-L batches of 16
    python benchmarks/bench_embed.py --quick    # 2k x 2k slide (~2.6k cells), 1 timed ViT-L batch of 8
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import napari_deepspot2cell  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent / "src"))

TARGET_SPEEDUP = 5.0
PITCH = 40.0


def per_tile_embed(slide, boxes: np.ndarray, encoder) -> np.ndarray:
    """The naive path: one read_region, one PIL resize and one encoder call per cell."""
    import torch
    from PIL import Image

    size = int(encoder.input_size)
    out = np.empty((len(boxes), int(encoder.dim)), np.float32)
    with torch.inference_mode():
        for k, (cx, cy, side) in enumerate(boxes):
            half = side / 2
            y0, x0 = int(np.floor(cy - half + 0.5)), int(np.floor(cx - half + 0.5))
            s = max(1, int(round(side)))
            region = slide.read_region(y0, x0, y0 + s, x0 + s)
            im = Image.fromarray(region).resize((size, size), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(im)).permute(2, 0, 1).float().div_(255.0).unsqueeze(0)
            out[k] = encoder(t)[0].float().numpy()
    return out


def whole_path_embed(slide, boxes: np.ndarray, encoder) -> np.ndarray:
    from napari_deepspot2cell.encoders.embed import iter_embed
    from napari_deepspot2cell.progress import run

    return run(iter_embed(slide, boxes, encoder, device="cpu"))


def feature_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Median over features of the Pearson correlation across cells (the two paths resize differently)."""
    a, b = a - a.mean(0), b - b.mean(0)
    den = np.sqrt((a * a).sum(0) * (b * b).sum(0))
    ok = den > 1e-12
    return float(np.median((a * b).sum(0)[ok] / den[ok]))


def vit_tiles_per_s(batch: int, batches: int) -> dict:
    import torch

    from napari_deepspot2cell.encoders.registry import build_encoder

    t0 = time.perf_counter()
    enc = build_encoder("uni").eval()
    build_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 224, 224, generator=gen)
    with torch.inference_mode():
        t0 = time.perf_counter()
        enc(x)  # warm-up batch (allocator, kernels)
        warm = time.perf_counter() - t0
        times = []
        for _ in range(batches):
            t0 = time.perf_counter()
            y = enc(x)
            times.append(time.perf_counter() - t0)
    assert y.shape == (batch, 1024)
    best = min(times)
    return {"arch": "ViT-L/16 (UNI architecture, random weights)", "batch": batch, "timed_batches": batches,
            "tiles_per_s": round(batch / best, 3), "tiles_per_s_median": round(batch / float(np.median(times)), 3),
            "warmup_batch_s": round(warm, 2), "build_s": round(build_s, 2), "threads": torch.get_num_threads(),
            "target": "none on a CPU"}


def main(argv=None) -> dict:
    import make_wsi

    from napari_deepspot2cell.encoders.offline import OfflineEncoder
    from napari_deepspot2cell.geometry.cells import cell_table
    from napari_deepspot2cell.geometry.tiles import cell_tile_boxes
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.slides import open_slide

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2k x 2k slide, one timed ViT-L batch of 8")
    p.add_argument("--side", type=int, default=None, help="slide side in px")
    p.add_argument("--repeat", type=int, default=None, help="timed runs of each path; the best counts")
    p.add_argument("--no-vit", action="store_true", help="skip the ViT-L/16 figure")
    p.add_argument("--tmp", default=None)
    args = p.parse_args(argv)
    side = args.side or (2048 if args.quick else 4096)
    repeat = args.repeat or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench_embed_", dir=args.tmp))
    out: dict = {"benchmark": "cell-tile embedding: iter_embed (whole path) vs per-tile read/resize/encode",
                 "quick": bool(args.quick)}
    try:
        info = make_wsi.make_wsi(tmp, side, pitch=PITCH)
        slide = open_slide(info["slide"])
        mask = open_cells(info["mask"], slide.shape, slide.um_per_px)
        cells = cell_table(mask.labels)
        mask.close()
        boxes = cell_tile_boxes(cells)
        enc = OfflineEncoder().eval()
        whole_s = tile_s = float("inf")
        for _ in range(repeat):  # alternate the two paths: the machine may be shared
            t0 = time.perf_counter()
            e_whole = whole_path_embed(slide, boxes, enc)
            whole_s = min(whole_s, time.perf_counter() - t0)
            t0 = time.perf_counter()
            e_tile = per_tile_embed(slide, boxes, enc)
            tile_s = min(tile_s, time.perf_counter() - t0)
        slide.close()
        n = len(boxes)
        speedup = tile_s / whole_s
        out.update({
            "slide_px": [side, side], "cells": n, "encoder": enc.id, "encoder_input_px": int(enc.input_size),
            "median_tile_side_px": float(np.median(boxes[:, 2])),
            "whole_path": {"seconds": round(whole_s, 3), "cells_per_s": round(n / whole_s, 1)},
            "per_tile_path": {"seconds": round(tile_s, 3), "cells_per_s": round(n / tile_s, 1)},
            "feature_agreement_median_r": round(feature_agreement(e_whole, e_tile), 4),
            "speedup": {"value": round(speedup, 2), "target": f">= {TARGET_SPEEDUP:g}", "ok": speedup >= TARGET_SPEEDUP},
        })
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not args.no_vit:
        out["vit_l16_cpu"] = vit_tiles_per_s(8 if args.quick else 16, 1 if args.quick else 3)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
