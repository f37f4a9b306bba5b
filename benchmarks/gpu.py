"""GPU throughput of the foundation-model path, in one command (< 5 minutes on an H200).

For UNI's (ViT-L/16) and H-optimus-0's (ViT-g/14) architectures with random
weights under bf16 autocast:

* model alone: random tiles already on the GPU, batch sizes swept (64 .. 1024)
  until out of memory; tiles/s and the fraction of the bf16 dense FLOP bound
  (ViT-L/16 at 224 px ~0.12 TFLOP per tile, ViT-g/14 ~0.61; the peak is looked
  up from the device name or given with --peak-tflops);
* whole tile path: ``iter_embed(..., device="cuda")`` on the cells of a
  generated slide (windows read and uploaded by the reader thread, crop_resize
  on the GPU, encode);
* a full predict (cell table, cell + patch embeddings, model) on a generated
  30k x 30k slide (~300k cells), cache disabled, with the ViT-L/16 encoder.

Target on an H200: >= 3,000 tiles/s for ViT-L/16 end to end and >= 40 % of the bound.

Without CUDA (or with --smoke) it is a CPU smoke run at a tiny size: ViT-L/16
for 2 batches of 2, the whole path on 4 tiles of a 2k x 2k slide, and a predict
of that slide with the offline encoder (a ViT on a CPU would take hours); it
says so in its JSON. Prints one JSON object.

    python benchmarks/gpu.py                    # on a CUDA machine
    python benchmarks/gpu.py --smoke            # tiny, any machine (CI)
    python benchmarks/gpu.py --compile --channels-last --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
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

import torch  # noqa: E402

ARCHS = {  # preset -> (label, TFLOP per 224 px tile, forward)
    "uni": ("ViT-L/16 (UNI)", 0.12),
    "hoptimus0": ("ViT-g/14 (H-optimus-0)", 0.61),
}
PEAK_BF16_TFLOPS = [  # dense bf16 tensor-core peak, first match on the device name wins
    ("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("GH200", 989.0), ("B200", 2250.0),
    ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0), ("A6000", 155.0), ("L4", 121.0), ("A10", 125.0),
    ("4090", 165.0), ("3090", 71.0), ("V100", 125.0), ("T4", 65.0),
]
TARGET_E2E = 3000.0
TARGET_FRACTION = 0.40
PREDICT_PITCH = 30_000 / math.sqrt(300_000)  # ~300k cells on 30k x 30k


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def random_encoder(preset: str, dev: torch.device, *, compile_: bool = False, channels_last: bool = False):
    """The preset's architecture with random weights, built directly on `dev` (no download, no hashing)."""
    from napari_deepspot2cell.encoders.registry import PRESETS, TimmEncoder, build_model

    p = PRESETS[preset]
    model = build_model(p.name, device=dev)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    enc = TimmEncoder(model, id=f"{p.name}-random", dim=p.dim, input_size=p.input_size, mean=p.mean, std=p.std,
                      weights_hash="random").to(dev).eval()
    if compile_:
        enc.model = torch.compile(enc.model, dynamic=False)
    return enc


def _autocast(dev: torch.device):
    from napari_deepspot2cell.encoders.device import autocast

    return autocast(dev)


def _oom(exc: BaseException) -> bool:
    from napari_deepspot2cell.encoders.device import is_out_of_memory

    return is_out_of_memory(exc)


def model_alone(enc, dev: torch.device, batches: list[int], iters: int, warmup: int, channels_last: bool) -> dict:
    out: dict = {}
    s = int(enc.input_size)
    for bs in batches:
        try:
            x = torch.rand(bs, 3, s, s, device=dev)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), _autocast(dev):
                for _ in range(warmup):
                    enc(x)
                _sync(dev)
                t0 = time.perf_counter()
                for _ in range(iters):
                    y = enc(x)
                _sync(dev)
            dt = time.perf_counter() - t0
            assert y.shape == (bs, enc.dim)
            out[str(bs)] = round(bs * iters / dt, 2)
            del x, y
        except Exception as exc:
            if not _oom(exc):
                raise
            out[str(bs)] = "out of memory"
            break
        finally:
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    return out


def whole_path(enc, slide, boxes: np.ndarray, dev: torch.device, batch: int, warm_boxes: int) -> dict:
    from napari_deepspot2cell.encoders.embed import iter_embed
    from napari_deepspot2cell.progress import run

    chunk = max(256, batch)
    if warm_boxes:
        run(iter_embed(slide, boxes[:warm_boxes], enc, device=dev, batch_size=batch, chunk=chunk))  # warm-up
    _sync(dev)
    t0 = time.perf_counter()
    emb = run(iter_embed(slide, boxes, enc, device=dev, batch_size=batch, chunk=chunk))
    _sync(dev)
    dt = time.perf_counter() - t0
    assert emb.shape == (len(boxes), enc.dim) and np.isfinite(emb).all()
    return {"tiles": int(len(boxes)), "batch": int(batch), "seconds": round(dt, 3), "tiles_per_s": round(len(boxes) / dt, 2)}


def _write(kwargs: dict, result: str) -> None:
    import make_wsi

    info = make_wsi.make_wsi(**kwargs)
    Path(result).write_text(json.dumps(info))


def start_slide(folder: Path, side: int, pitch: float, name: str, workers: int):
    """Write a slide + mask in another process (it overlaps the model sweeps); join with `.join()`."""
    result = folder / f"{name}info.json"
    kwargs = {"out_dir": str(folder), "size": side, "pitch": pitch, "name": name, "workers": workers}
    proc = mp.get_context("spawn").Process(target=_write, args=(kwargs, str(result)))
    proc.start()
    return proc, result


def join_slide(proc, result: Path) -> dict:
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"writing the slide failed (exit {proc.exitcode})")
    return json.loads(result.read_text())


def predict(info: dict, enc, dev: torch.device, batch: int | None, folder: Path) -> dict:
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.slides import open_slide
    from napari_deepspot2cell.model.checkpoint import load_checkpoint, save_checkpoint
    from napari_deepspot2cell.model.deepspot2cell import DeepSpot2Cell
    from napari_deepspot2cell.predict import iter_predict_cells
    from napari_deepspot2cell.progress import run

    genes = [f"GENE{i:02d}" for i in range(20)]
    ck = folder / "model.ckpt"
    save_checkpoint(ck, DeepSpot2Cell(int(enc.dim), len(genes), seed=0), genes=genes,
                    encoder={"id": enc.id, "dim": int(enc.dim), "weights_hash": enc.weights_hash},
                    geometry={"cell_tile": "max_side", "spot_kind": "grid", "patch_um": 47.6, "spot_tile_um": 47.6,
                              "neighbours": "grid8", "um_per_px": 0.5},
                    target={"normalisation": "log1p_cp10k", "scale": 1e4})
    t0 = time.perf_counter()
    ckpt = load_checkpoint(ck)
    slide = open_slide(info["slide"])
    mask = open_cells(info["mask"], slide.shape, slide.um_per_px)
    adata = run(iter_predict_cells(slide, mask.labels, ckpt, enc, device=dev, batch_size=batch, cache_dir=False))
    _sync(dev)
    dt = time.perf_counter() - t0
    mask.close()
    slide.close()
    ok = adata.n_obs == info["n_cells"]
    return {"slide_px": info["shape"], "cells": int(adata.n_obs), "cells_ok": bool(ok), "encoder": enc.id,
            "seconds": round(dt, 2), "cells_per_s": round(adata.n_obs / dt, 1)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny CPU-sized run (also chosen when CUDA is absent)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"])
    p.add_argument("--archs", default="uni,hoptimus0", help="comma-separated presets")
    p.add_argument("--batches", default="64,128,256,512,1024", help="batch sizes swept (model alone)")
    p.add_argument("--iters", type=int, default=5, help="timed batches per batch size")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 dense peak of the device")
    p.add_argument("--e2e-seconds", type=float, default=10.0, help="about how long each whole-path run lasts")
    p.add_argument("--predict-side", type=int, default=None, help="side of the predict slide (default 30000, smoke 2048; 0: skip)")
    p.add_argument("--e2e-side", type=int, default=None, help="side of the whole-path slide (default 8192, smoke 2048)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone (slow first batch)")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--no-tf32", action="store_true", help="leave TF32 matmuls off")
    p.add_argument("--workers", type=int, default=8, help="threads writing the generated slides")
    p.add_argument("--tmp", default=None)
    args = p.parse_args(argv)
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    smoke = args.smoke or not cuda
    dev = torch.device("cuda" if cuda else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu.py --device cuda: no CUDA device is visible to PyTorch")
    if cuda and not args.no_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(dev) if cuda else "CPU"
    peak = args.peak_tflops or (peak_tflops(name) if cuda else None)
    archs = [a.strip() for a in args.archs.split(",") if a.strip()]
    if smoke and not cuda:
        archs = [a for a in archs if a == "uni"] or ["uni"]  # ViT-g on a CPU: minutes per batch
    batches = [2] if smoke else [int(b) for b in args.batches.split(",")]
    iters, warmup = (2, 1) if smoke else (args.iters, 2)
    report: dict = {
        "benchmark": "foundation-model tile throughput (bf16 autocast on CUDA)",
        "mode": "CPU smoke run (no CUDA: tiny sizes, proves the script works; figures are not GPU figures)"
        if not cuda else ("CUDA smoke run (tiny sizes)" if smoke else "CUDA"),
        "device": name, "torch": torch.__version__, "peak_bf16_tflops": peak,
        "settings": {"tf32": bool(cuda and not args.no_tf32), "compile": args.compile, "channels_last": args.channels_last,
                     "autocast": "bf16" if cuda else "none (fp32 on CPU)"},
        "archs": {},
    }
    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_", dir=args.tmp))
    try:
        side_e2e = args.e2e_side or (2048 if smoke else 8192)
        pred_side = args.predict_side if args.predict_side is not None else (2048 if smoke else 30000)
        gen_pred = start_slide(tmp, pred_side, PREDICT_PITCH, "predict_", args.workers) if pred_side else None
        import make_wsi

        e2e_info = make_wsi.make_wsi(tmp, side_e2e, pitch=40.0, mask=True, name="e2e_", workers=args.workers)
        from napari_deepspot2cell.geometry.cells import cell_table
        from napari_deepspot2cell.geometry.tiles import cell_tile_boxes
        from napari_deepspot2cell.io.masks import open_cells
        from napari_deepspot2cell.io.slides import open_slide

        slide = open_slide(e2e_info["slide"])
        m = open_cells(e2e_info["mask"], slide.shape, slide.um_per_px)
        cells = cell_table(m.labels).sort_values(["y", "x"])  # the top rows of the slide, as a band of windows
        m.close()
        all_boxes = cell_tile_boxes(cells)
        keep_enc = None
        for arch in archs:
            label, tflop = ARCHS[arch]
            t0 = time.perf_counter()
            enc = random_encoder(arch, dev, compile_=args.compile, channels_last=args.channels_last)
            build_s = time.perf_counter() - t0
            alone = model_alone(enc, dev, batches, iters, warmup, args.channels_last)
            rates = {int(k): v for k, v in alone.items() if isinstance(v, float)}
            best_bs = max(rates, key=rates.get) if rates else 1
            best = rates.get(best_bs, 0.0)
            n_e2e = 4 if smoke else int(min(len(all_boxes), max(4 * best_bs, best * args.e2e_seconds)))
            e2e = whole_path(enc, slide, all_boxes[:n_e2e], dev, best_bs, 0 if not cuda else min(n_e2e, 2 * best_bs))
            entry = {"arch": label, "tflop_per_tile": tflop, "build_s": round(build_s, 2),
                     "model_alone_tiles_per_s": alone, "best_batch": best_bs, "best_tiles_per_s": best,
                     "whole_path": e2e}
            if peak:
                entry["fraction_of_bf16_bound_model_alone"] = round(best * tflop / peak, 4)
                entry["fraction_of_bf16_bound_whole_path"] = round(e2e["tiles_per_s"] * tflop / peak, 4)
            report["archs"][arch] = entry
            if arch == "uni":
                keep_enc = (enc, best_bs)
            else:
                del enc
            if cuda:
                torch.cuda.empty_cache()
        slide.close()
        if gen_pred is not None:
            info = join_slide(*gen_pred)
            if smoke and not cuda:
                from napari_deepspot2cell.encoders.offline import OfflineEncoder

                penc, pbs = OfflineEncoder(), None
            elif keep_enc is not None:
                penc, pbs = keep_enc
            else:
                penc, pbs = random_encoder("uni", dev), None
            report["predict"] = predict(info, penc, dev, pbs, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    uni = report["archs"].get("uni")
    on_h200 = cuda and "h200" in name.lower() and not smoke
    if uni:
        e2e = uni["whole_path"]["tiles_per_s"]
        frac = uni.get("fraction_of_bf16_bound_whole_path")
        report["targets"] = {
            "vit_l16_whole_path_tiles_per_s": {"value": e2e, "target": f">= {TARGET_E2E:g} (on an H200)",
                                               "ok": (e2e >= TARGET_E2E) if on_h200 else None},
            "vit_l16_fraction_of_bound": {"value": frac, "target": f">= {TARGET_FRACTION:g} (on an H200)",
                                          "ok": (frac is not None and frac >= TARGET_FRACTION) if on_h200 else None},
        }
        if not on_h200:
            report["targets_note"] = "targets are judged only on a non-smoke run on an H200; ok = null here"
    report["total_seconds"] = round(time.perf_counter() - t_start, 1)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
