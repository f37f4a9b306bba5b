"""Cell table at whole-slide scale: ``iter_cell_table`` over ``open_cells(mask).labels``.

A tiled uint32 label TIFF (zstd, 512 tiles; ``make_wsi``) of constant cell
density (a lattice of 40 px: 1M cells at 40k x 40k) is written per size; each
size is measured in a fresh subprocess that reads its own peak RSS
(``ru_maxrss``). Targets: peak RSS <= 3 GB at 40k x 40k / 1M cells, and a 4x
larger mask costs <= 4.5x the time (20k^2 -> 40k^2; --quick: 5k^2 -> 10k^2).

    python benchmarks/bench_cell_table.py            # 10k, 20k, 40k px
    python benchmarks/bench_cell_table.py --quick    # 2.5k, 5k, 10k px, < 1 minute
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import napari_deepspot2cell  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent / "src"))

PITCH = 40.0  # px: 1M cells on 40k x 40k
TARGET_RSS_GB = 3.0
TARGET_RATIO = 4.5


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def child(mask: str, side: int, expect: int, repeat: int) -> dict:
    """Runs in the fresh subprocess: open the mask, build the table `repeat` times."""
    import numpy as np

    from napari_deepspot2cell.geometry.cells import iter_cell_table
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.progress import run

    base = _rss_gb()
    best = cpu = float("inf")
    n = -1
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        m = open_cells(mask, (side, side), 0.5)
        table = run(iter_cell_table(m.labels, source=mask))
        m.close()
        best, cpu = min(best, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
        n = len(table)
        ok_area = bool((table["area"].to_numpy() > 0).all() and np.isfinite(table["x"].to_numpy()).all())
        del table
    return {"side": side, "pixels": side * side, "cells": n, "cells_expected": expect, "count_ok": n == expect,
            "table_ok": ok_area, "seconds": round(best, 3), "cpu_seconds": round(cpu, 3),
            "peak_rss_gb": round(_rss_gb(), 3), "rss_after_imports_gb": round(base, 3)}


def measure(side: int, folder: Path, repeat: int) -> dict:
    import make_wsi

    t0 = time.perf_counter()
    info = make_wsi.make_wsi(folder, side, pitch=PITCH, slide=False, name=f"{side}_")
    gen = time.perf_counter() - t0
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", info["mask"], "--side", str(side),
           "--expect", str(info["n_cells"]), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    Path(info["mask"]).unlink()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed at {side}: {proc.stderr[-2000:]}")
    res = json.loads(proc.stdout)
    res["mask_bytes"] = info["mask_bytes"]
    res["mask_write_seconds"] = round(gen, 2)
    return res


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="2.5k, 5k, 10k px (under a minute)")
    p.add_argument("--repeat", type=int, default=None, help="timed runs per size; the best counts")
    p.add_argument("--tmp", default=None, help="folder for the generated masks (default: system temp)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--side", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--expect", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.side, args.expect, args.repeat or 1)))
        return {}
    sides = (2500, 5000, 10000) if args.quick else (10000, 20000, 40000)
    repeat = args.repeat or (3 if args.quick else 2)
    tmp = Path(tempfile.mkdtemp(prefix="bench_cells_", dir=args.tmp))
    try:
        runs = [measure(s, tmp, repeat) for s in sides]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    small, big = runs[-2], runs[-1]
    ratio = big["seconds"] / small["seconds"]
    cpu_ratio = big["cpu_seconds"] / small["cpu_seconds"]
    out = {
        "benchmark": "cell table from a tiled label TIFF (iter_cell_table over open_cells(mask).labels)",
        "quick": bool(args.quick),
        "runs": runs,
        "seconds_per_mpx": [round(r["seconds"] / (r["pixels"] / 1e6), 4) for r in runs],
        f"time_ratio_{big['side'] // 1000}k_over_{small['side'] // 1000}k": {
            "value": round(ratio, 3), "cpu": round(cpu_ratio, 3), "pixels_ratio": big["pixels"] / small["pixels"],
            "target": f"<= {TARGET_RATIO}", "ok": ratio <= TARGET_RATIO},
        "peak_rss_gb_largest": {"value": big["peak_rss_gb"], "cells": big["cells"], "side": big["side"],
                                "target": f"<= {TARGET_RSS_GB} (at 40k x 40k, 1M cells)",
                                "ok": big["peak_rss_gb"] <= TARGET_RSS_GB},
        "counts_ok": all(r["count_ok"] and r["table_ok"] for r in runs),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
