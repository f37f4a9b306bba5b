"""Gene switch at 100k and 1M cells: lazy lookup paint vs napari's DirectLabelColormap.

What a gene switch costs before the canvas can draw a 2048 x 2048 view of a
large label image:

* paint (this plugin): take the gene's column, build the lookup table
  (O(cells)), build the lazy painted pyramid, compute the level-0 crop the
  canvas draws (what ``update_gene`` + one napari draw does).
* napari DirectLabelColormap: build the {label: RGBA} dict for every cell from
  the gene's values, construct the colormap, map the crop to texture values
  and build the colour texture, as napari's Labels layer does.

The label image is synthetic (square cells on a grid, lazily generated per
block); the crop's labels are read once up front for the napari path and their
read time is reported separately (the paint path includes it, as it reads
labels block by block). Prints one JSON object.

    python benchmarks/bench_gene_switch.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import dask.array as da
import numpy as np

from napari_deepspot2cell.paint import label_pyramid, lookup_table, paint

VIEW = 2048
TARGET_SPEEDUP_1M = 50.0
TARGET_SECONDS = 0.2


def synthetic_labels(n_cells: int, side: int = 16, gap: int = 2, chunk: int = 1024) -> tuple[da.Array, int]:
    """A lazy label image of ``n_cells`` square cells (``side`` px, ``gap`` px background between)."""
    cols = int(math.ceil(math.sqrt(n_cells)))
    rows = int(math.ceil(n_cells / cols))
    shape = (rows * side, cols * side)

    def block(block_info=None):
        (r0, r1), (c0, c1) = block_info[None]["array-location"]
        r = np.arange(r0, r1)[:, None]
        c = np.arange(c0, c1)[None, :]
        lab = (r // side) * cols + (c // side) + 1
        lab[(r % side < gap) | (c % side < gap)] = 0
        lab[lab > n_cells] = 0
        return lab.astype(np.int32)

    labels = da.map_blocks(block, dtype=np.int32, chunks=da.core.normalize_chunks(chunk, shape), meta=np.empty((0, 0), np.int32))
    return labels, cols


def time_paint(levels, ids, X, gene, crop) -> float:
    t = time.perf_counter()
    lut = lookup_table(ids, X[:, gene])
    painted = paint(levels, lut)
    view = painted[0][crop].compute()
    elapsed = time.perf_counter() - t
    assert view.shape == (VIEW, VIEW) and view.dtype == np.float32
    return elapsed


def time_direct(ids, X, gene, labels_crop) -> dict:
    from napari.utils.colormaps import DirectLabelColormap, ensure_colormap

    steps = {}
    t0 = time.perf_counter()
    values = X[:, gene]
    lo, hi = np.percentile(values, [1, 99])
    rgba = ensure_colormap("magma").map(np.clip((values - lo) / (hi - lo), 0, 1))
    color_dict = dict(zip(ids.tolist(), rgba))
    color_dict[None] = np.zeros(4)
    color_dict[0] = np.zeros(4)
    t1 = time.perf_counter()
    steps["dict"] = t1 - t0
    cmap = DirectLabelColormap(color_dict=color_dict)
    t2 = time.perf_counter()
    steps["colormap"] = t2 - t1
    texture_values = cmap._data_to_texture(labels_crop)  # what napari sends to the GPU for the crop
    t3 = time.perf_counter()
    steps["map_crop"] = t3 - t2
    try:
        from napari._vispy.layers.labels import build_textures_from_dict

        build_textures_from_dict(cmap._label_mapping_and_color_dict[1], max_size=16384)
        steps["texture"] = time.perf_counter() - t3
    except Exception as exc:  # noqa: BLE001 - a private napari helper; report, don't fail
        steps["texture"] = None
        steps["texture_error"] = repr(exc)
    assert texture_values.shape == labels_crop.shape
    steps["total"] = time.perf_counter() - t0
    return steps


def run(n_cells: int, repeats: int, direct_repeats: int) -> dict:
    labels, _ = synthetic_labels(n_cells)
    levels = label_pyramid(labels)
    h, w = labels.shape
    y0, x0 = max(0, h // 2 - VIEW // 2), max(0, w // 2 - VIEW // 2)
    crop = (slice(y0, y0 + VIEW), slice(x0, x0 + VIEW))
    ids = np.arange(1, n_cells + 1, dtype=np.int64)
    X = np.random.default_rng(0).random((n_cells, 4), dtype=np.float32) * 5

    t = time.perf_counter()
    labels_crop = np.asarray(labels[crop].compute())
    label_read = time.perf_counter() - t

    time_paint(levels, ids, X, 0, crop)  # warm-up (imports, allocator)
    paint_times = [time_paint(levels, ids, X, 1 + i % 3, crop) for i in range(repeats)]
    direct = [time_direct(ids, X, 1 + i % 3, labels_crop) for i in range(direct_repeats)]
    paint_s = statistics.median(paint_times)
    direct_s = statistics.median(d["total"] for d in direct)
    return {
        "cells": n_cells,
        "label_image_shape": [int(h), int(w)],
        "view": [VIEW, VIEW],
        "cells_in_view": int(np.unique(labels_crop).size - 1),
        "label_crop_read_s": round(label_read, 4),
        "paint_s": round(paint_s, 4),
        "paint_s_all": [round(v, 4) for v in paint_times],
        "paint_lut_bytes": int((n_cells + 1) * 4),
        "direct_label_colormap_s": round(direct_s, 4),
        "direct_steps_s": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in direct[0].items()},
        "speedup": round(direct_s / paint_s, 1),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (< 2 minutes)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (3 if args.quick else 9)
    direct_repeats = 1 if args.quick else 3
    results = [run(n, repeats, direct_repeats) for n in (100_000, 1_000_000)]
    big = results[-1]
    report = {
        "benchmark": "gene switch: update_gene -> repainted 2048x2048 view",
        "quick": bool(args.quick),
        "results": results,
        "targets": {
            "speedup_at_1M": f">= {TARGET_SPEEDUP_1M:g}x",
            "paint_s": f"< {TARGET_SECONDS:g} s",
        },
        "met": {
            "speedup_at_1M": big["speedup"] >= TARGET_SPEEDUP_1M,
            "paint_s_at_1M": big["paint_s"] < TARGET_SECONDS,
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
