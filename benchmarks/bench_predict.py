"""``deepspot2cell predict`` end to end at two slide sizes: time, cells/s, peak RSS.

The real command line runs in a subprocess (``--device cpu --no-cache``, the
offline encoder) on a generated pyramidal JPEG slide and its tiled label mask
(``make_wsi``; constant density: ~300k cells on 30k x 30k), with a checkpoint
saved by ``save_checkpoint`` from an untrained seeded DeepSpot2Cell with 20
genes. The child's peak RSS comes from ``os.wait4``. Targets: peak RSS <= 4 GB,
and a 4x larger workload costs <= 4.5x the time.

    python benchmarks/bench_predict.py --quick                 # 3k^2 vs 6k^2
    python benchmarks/bench_predict.py --sides 15000 30000     # the full target sizes
    python benchmarks/bench_predict.py                         # 10k^2 vs 20k^2 (fits ~20 min on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
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

CELLS_PER_PX2 = 300_000 / 30_000**2
PITCH = 1 / math.sqrt(CELLS_PER_PX2)  # ~54.8 px
GEOMETRY = {"cell_tile": "max_side", "spot_kind": "grid", "patch_um": 47.6, "spot_tile_um": 47.6,
            "neighbours": "grid8", "um_per_px": 0.5}
N_GENES = 20
TARGET_RSS_GB = 4.0
TARGET_RATIO = 4.5


def write_checkpoint(path: Path) -> Path:
    from napari_deepspot2cell.encoders.offline import OfflineEncoder
    from napari_deepspot2cell.model.checkpoint import save_checkpoint
    from napari_deepspot2cell.model.deepspot2cell import DeepSpot2Cell

    enc = OfflineEncoder()
    model = DeepSpot2Cell(int(enc.dim), N_GENES, seed=0)
    save_checkpoint(path, model, genes=[f"GENE{i:02d}" for i in range(N_GENES)],
                    encoder={"id": enc.id, "dim": int(enc.dim), "weights_hash": enc.weights_hash},
                    geometry=GEOMETRY, target={"normalisation": "log1p_cp10k", "scale": 1e4})
    return path


def cli() -> list[str]:
    script = Path(sys.executable).with_name("deepspot2cell")
    return [str(script)] if script.exists() else [sys.executable, "-m", "napari_deepspot2cell.cli"]


def _spawn_rss(cmd: list[str]) -> tuple[int, float, str, str, int]:
    """Run cmd; (returncode, seconds, stdout, stderr, peak RSS KiB) with the child's own rusage."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        fo.seek(0)
        fe.seek(0)
        return proc.returncode, seconds, fo.read(), fe.read(), usage.ru_maxrss


def measure(side: int, folder: Path, ckpt: Path, repeat: int) -> dict:
    import anndata as ad
    import make_wsi

    t0 = time.perf_counter()
    info = make_wsi.make_wsi(folder, side, pitch=PITCH, name=f"{side}_")
    gen = time.perf_counter() - t0
    out = folder / f"{side}_cells.h5ad"
    cmd = [*cli(), "predict", info["slide"], "--labels", info["mask"], "--checkpoint", str(ckpt),
           "--out", str(out), "--device", "cpu", "--no-cache", "--quiet"]
    best, rss = float("inf"), 0
    for _ in range(repeat):
        rc, sec, stdout, stderr, maxrss = _spawn_rss(cmd)
        if rc != 0:
            raise RuntimeError(f"predict failed at {side} (exit {rc}): {stderr[-2000:]}")
        best, rss = min(best, sec), max(rss, maxrss)
    a = ad.read_h5ad(out)
    n_obs, n_vars = a.n_obs, a.n_vars
    del a
    for f in ("slide", "mask"):
        Path(info[f]).unlink()
    out.unlink()
    patch_px = GEOMETRY["patch_um"] / info["um_per_px"]
    return {"side": side, "cells": info["n_cells"], "cells_out": n_obs, "genes_out": n_vars,
            "output_ok": n_obs == info["n_cells"] and n_vars == N_GENES,
            "patches_approx": math.ceil(side / patch_px) ** 2,
            "seconds": round(best, 2), "cells_per_s": round(info["n_cells"] / best, 1),
            "peak_rss_gb": round(rss / 2**20, 3), "slide_bytes": info["slide_bytes"],
            "write_seconds": round(gen, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="3k^2 vs 6k^2 (a few minutes)")
    p.add_argument("--sides", type=int, nargs=2, default=None, help="the two slide sides in px (the second 2x the first)")
    p.add_argument("--repeat", type=int, default=None, help="runs per size; the best counts")
    p.add_argument("--tmp", default=None)
    args = p.parse_args(argv)
    sides = tuple(args.sides) if args.sides else ((3000, 6000) if args.quick else (10000, 20000))
    repeat = args.repeat or (2 if args.quick else 1)
    tmp = Path(tempfile.mkdtemp(prefix="bench_predict_", dir=args.tmp))
    try:
        ckpt = write_checkpoint(tmp / "model.ckpt")
        runs = [measure(s, tmp, ckpt, repeat) for s in sides]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    small, big = runs
    ratio = big["seconds"] / small["seconds"]
    work = big["cells"] / small["cells"]
    out = {
        "benchmark": "deepspot2cell predict (CLI subprocess, --device cpu --no-cache, offline encoder)",
        "quick": bool(args.quick),
        "target_sizes_note": None if sides == (15000, 30000) else
        f"measured at {sides[0]}^2 vs {sides[1]}^2; the target sizes are 15k^2 vs 30k^2 (--sides 15000 30000)",
        "runs": runs,
        f"time_ratio_{big['side'] // 1000}k_over_{small['side'] // 1000}k": {
            "value": round(ratio, 3), "work_ratio": round(work, 3), "target": f"<= {TARGET_RATIO}",
            "ok": ratio <= TARGET_RATIO},
        "peak_rss_gb_largest": {"value": big["peak_rss_gb"], "cells": big["cells"], "side": big["side"],
                                "target": f"<= {TARGET_RSS_GB}", "ok": big["peak_rss_gb"] <= TARGET_RSS_GB},
        "cells_per_s_largest": big["cells_per_s"],
        "outputs_ok": all(r["output_ok"] for r in runs),
    }
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
