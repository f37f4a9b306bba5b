"""Run every CPU benchmark, print each figure beside its target with PASS/FAIL.

Each benchmark runs as its own subprocess and prints one JSON object; this
collects them into ``benchmarks/results-quick.json`` / ``results-full.json``
with the machine they ran on, and (``--full`` or ``--plot``) draws the cost
against size in ``benchmarks/scaling.png``.

    python benchmarks/run_all.py --quick          # a few minutes on 2 cores
    python benchmarks/run_all.py --full           # tens of minutes on 2 cores
    python benchmarks/run_all.py --full --only cell_table,predict --predict-sides 15000 30000
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

BENCHES = ["cell_table", "assign", "embed", "predict", "gene_switch", "gpu_smoke"]


def machine() -> dict:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch

        tv, cuda = torch.__version__, (torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except Exception:  # noqa: BLE001 - report what is there
        tv, cuda = None, None
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": ram, "python": platform.python_version(),
            "torch": tv, "cuda_device": cuda, "os": platform.platform()}


def command(name: str, quick: bool, args) -> list[str]:
    py = sys.executable
    q = ["--quick"] if quick else []
    if name == "cell_table":
        return [py, str(HERE / "bench_cell_table.py"), *q]
    if name == "assign":
        return [py, str(HERE / "bench_assign.py"), *q]
    if name == "embed":
        return [py, str(HERE / "bench_embed.py"), *q]
    if name == "predict":
        sides = ["--sides", *map(str, args.predict_sides)] if args.predict_sides else []
        return [py, str(HERE / "bench_predict.py"), *q, *sides]
    if name == "gene_switch":
        return [py, str(HERE / "bench_gene_switch.py"), *q]
    if name == "gpu_smoke":
        return [py, str(HERE / "gpu.py"), "--smoke"]
    raise KeyError(name)


def _row(figure, value, target, ok, note=""):
    verdict = "INFO" if ok is None else ("PASS" if ok else "FAIL")
    return {"figure": figure, "value": value, "target": target, "verdict": verdict, "note": note}


def figures(name: str, r: dict) -> list[dict]:
    """The headline figures of one benchmark's JSON, with their targets."""
    rows = []
    if name == "cell_table":
        key = next(k for k in r if k.startswith("time_ratio_"))
        f = r[key]
        rows.append(_row(f"cell table: time ratio, 4x pixels ({key[11:]})", f["value"], f["target"], f["ok"]))
        m = r["peak_rss_gb_largest"]
        note = "" if m["side"] >= 40000 else f"measured at {m['side']}^2 ({m['cells']} cells); the target is at 40k^2"
        rows.append(_row(f"cell table: peak RSS GB at {m['side']}^2, {m['cells']} cells", m["value"], "<= 3", m["ok"], note))
        rows.append(_row("cell table: counts match the generator", r["counts_ok"], "true", r["counts_ok"]))
    elif name == "assign":
        key = next(k for k in r if k.startswith("ratio_"))
        f = r[key]
        rows.append(_row(f"assign: time ratio, 2x cells ({key[6:]})", f["value"], f["target"], f["ok"]))
        s = r["speedup_vs_all_pairs"]
        rows.append(_row("assign: speed-up vs all pairs", s["value"], s["target"], s["ok"]))
    elif name == "embed":
        s = r["speedup"]
        rows.append(_row(f"embed: whole path vs per-tile, offline encoder ({r['cells']} cells)", s["value"], s["target"], s["ok"]))
        rows.append(_row("embed: whole path cells/s (CPU, offline encoder)", r["whole_path"]["cells_per_s"], "-", None))
        if "vit_l16_cpu" in r:
            rows.append(_row("embed: ViT-L/16 random weights tiles/s (CPU)", r["vit_l16_cpu"]["tiles_per_s"], "none on a CPU", None))
    elif name == "predict":
        key = next(k for k in r if k.startswith("time_ratio_"))
        f = r[key]
        note = r.get("target_sizes_note") or ""
        rows.append(_row(f"predict: time ratio, {f['work_ratio']}x cells ({key[11:]})", f["value"], f["target"], f["ok"], note))
        m = r["peak_rss_gb_largest"]
        rows.append(_row(f"predict: peak RSS GB at {m['side']}^2, {m['cells']} cells", m["value"], m["target"], m["ok"], note))
        rows.append(_row("predict: cells/s (CPU, offline encoder)", r["cells_per_s_largest"], "-", None))
    elif name == "gene_switch":
        big = r["results"][-1]
        rows.append(_row(f"gene switch: speed-up vs DirectLabelColormap at {big['cells']} cells", big["speedup"],
                         r["targets"]["speedup_at_1M"], r["met"]["speedup_at_1M"]))
        rows.append(_row(f"gene switch: paint seconds at {big['cells']} cells", big["paint_s"], r["targets"]["paint_s"],
                         r["met"]["paint_s_at_1M"]))
    elif name == "gpu_smoke":
        rows.append(_row("gpu.py smoke run completes", r["mode"], "runs in < 2 min", r["total_seconds"] < 120,
                         f"{r['total_seconds']} s; GPU figures: not measured here"))
    return rows


def run_one(name: str, quick: bool, args) -> tuple[dict | None, str, float]:
    cmd = command(name, quick, args)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {args.timeout} s", time.perf_counter() - t0
    sec = time.perf_counter() - t0
    if proc.returncode != 0:
        return None, f"exit {proc.returncode}: {proc.stderr[-1500:]}", sec
    out = proc.stdout
    try:
        return json.loads(out[out.index("{"):]), "", sec
    except (ValueError, json.JSONDecodeError) as exc:
        return None, f"no JSON in output ({exc}): {out[-500:]}", sec


def plot(results: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = []
    raw = results["raw"]
    if raw.get("cell_table"):
        runs = raw["cell_table"]["runs"]
        series.append(("cell table (tiled label TIFF)", "pixels (Mpx)", [r["pixels"] / 1e6 for r in runs], [r["seconds"] for r in runs]))
    if raw.get("assign"):
        a = raw["assign"]
        series.append(("assign (60 % rule, Visium grid)", "cells", a["cells"], a["seconds"]))
    if raw.get("predict"):
        runs = raw["predict"]["runs"]
        series.append(("predict CLI (CPU, offline encoder)", "cells", [r["cells"] for r in runs], [r["seconds"] for r in runs]))
    if not series:
        raise ValueError("nothing to plot")
    fig, axes = plt.subplots(1, len(series), figsize=(4.6 * len(series), 4.0), squeeze=False)
    for ax, (title, xlabel, xs, ys) in zip(axes[0], series):
        ax.loglog(xs, ys, "o-", label="measured")
        ref = [ys[0] * x / xs[0] for x in xs]
        ax.loglog(xs, ref, "--", color="grey", label="linear from the smallest")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"cost against size ({results['mode']}; {results['machine']['cpu']}, {results['machine']['cores']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def replot(base: Path, newer: list[str]) -> Path:
    """Redraw scaling.png from a results file, each NAME=FILE putting a later run of one benchmark in its place."""
    results = json.loads(base.read_text())
    for item in newer:
        name, _, path = item.partition("=")
        if name not in BENCHES or not path:
            raise SystemExit(f"--replot: expected NAME=FILE with NAME one of {', '.join(BENCHES)}, got {item!r}")
        results["raw"][name] = json.loads(Path(path).read_text())
    return plot(results, HERE / "scaling.png")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--full", action="store_true")
    mode.add_argument("--replot", nargs="*", metavar="NAME=FILE",
                      help="only redraw scaling.png from results-full.json, with later runs of some benchmarks")
    p.add_argument("--plot", action="store_true", help="draw benchmarks/scaling.png (always with --full)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(BENCHES)}")
    p.add_argument("--predict-sides", type=int, nargs=2, default=None, help="bench_predict --sides")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per benchmark")
    p.add_argument("--out", default=None, help="results JSON (default benchmarks/results-{quick,full}.json)")
    args = p.parse_args(argv)
    if args.replot is not None:
        path = replot(Path(args.out) if args.out else HERE / "results-full.json", args.replot)
        print(json.dumps({"plot": str(path)}))
        return {"plot": str(path)}
    quick = bool(args.quick)
    names = [n.strip() for n in args.only.split(",")] if args.only else [n for n in BENCHES if quick or n != "gpu_smoke"]
    results = {"mode": "quick" if quick else "full", "date": dt.datetime.now().isoformat(timespec="seconds"),
               "machine": machine(), "figures": [], "raw": {}, "seconds": {}, "errors": {}}
    for name in names:
        print(f"== {name} ...", file=sys.stderr, flush=True)
        r, err, sec = run_one(name, quick, args)
        results["seconds"][name] = round(sec, 1)
        if r is None:
            results["errors"][name] = err
            results["figures"].append(_row(f"{name}: benchmark ran", "error", "runs", False, err[:300]))
            print(f"   {name}: ERROR {err[:300]}", file=sys.stderr)
            continue
        results["raw"][name] = r
        rows = figures(name, r)
        results["figures"].extend(rows)
        for row in rows:
            print(f"   {row['verdict']:4}  {row['figure']}: {row['value']}  (target {row['target']}) {row['note']}", file=sys.stderr, flush=True)
    out = Path(args.out) if args.out else HERE / f"results-{results['mode']}.json"
    out.write_text(json.dumps(results, indent=1))
    if args.full or args.plot:
        try:
            results["plot"] = str(plot(results, HERE / "scaling.png"))
        except ValueError as exc:
            results["plot"] = f"not drawn: {exc}"
        out.write_text(json.dumps(results, indent=1))
    summary = {"mode": results["mode"], "results": str(out), "plot": results.get("plot"),
               "figures": [{k: row[k] for k in ("figure", "value", "target", "verdict")} for row in results["figures"]],
               "seconds": results["seconds"]}
    print(json.dumps(summary, indent=1))
    return results


if __name__ == "__main__":
    main()
