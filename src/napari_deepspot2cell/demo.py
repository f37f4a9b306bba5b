"""`deepspot2cell demo --out DIR [--train]`: the whole method on the shipped sample data.

The sample (see ``sample_data/README.md``) is a real H&E slide, its cells from a
simple classical segmentation, and SIMULATED Visium-like spot counts whose
per-cell truth is known. The demo

1. optionally retrains the checkpoint from the spot counts alone (``--train``,
   ``DIR/model.ckpt``, with its metrics and loss plot beside it);
2. predicts every cell with the checkpoint (``predict.iter_predict``, the
   sample spots as context) and writes ``DIR/cells.h5ad`` (the output contract);
3. measures, in this run, cell-level Pearson per gene against the simulated
   truth for cells inside and outside spots, next to the nearest-spot painting
   baseline, and writes ``DIR/report.json``;
4. draws ``DIR/overview.png``: the H&E, one predicted gene painted on the
   cells, and the same gene's measured spot values as disks of the true diameter.

Everything is offline (the offline encoder needs no download) and every output
is written atomically.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from .errors import InputError
from .progress import Job, Progress, delegate

#: the settings of the shipped checkpoint;
#: ``scripts/train_sample_model.py`` and ``demo --train`` both train with them
#: (``train.iter_train`` keywords). The sample has only 77 spots: a small model
#: (the checkpoint ships in the wheel), a higher learning rate on small batches, less
#: dropout and a longer patience than the defaults made for whole Visium slides.
SAMPLE_MODEL = {
    "encoder": "offline",
    "aggregate": "counts",
    "n_ensemble": 3,
    "phi2rho_size": 128,
    "dropout": 0.1,
    "lr": 1e-3,
    "batch_spots": 8,
    "max_epochs": 200,
    "patience": 20,
    "val_fraction": 0.1,
    "seed": 0,
}
FIGURE_SIZE_IN = (16.0, 6.4)
FIGURE_DPI = 100
FIGURE_PX = (int(FIGURE_SIZE_IN[0] * FIGURE_DPI), int(FIGURE_SIZE_IN[1] * FIGURE_DPI))  # (width, height)
PAINT_DOWNSAMPLE = 4


def iter_train_sample(paths: dict, out: Path, *, cache_dir=None, device: str = "cpu", **overrides) -> Job:
    """Job: train a checkpoint at ``out`` on the sample spots with :data:`SAMPLE_MODEL`."""
    from .train import TrainInput, iter_train

    settings = {**SAMPLE_MODEL, **overrides}
    inp = TrainInput(image=paths["slide"], labels=paths["labels"], spots=paths["spots"], cell_truth=paths.get("cell_truth"), name="sample")
    return (yield from iter_train(inp, out, cache_dir=cache_dir, device=device, **settings))


def iter_demo(out_dir, *, train: bool = False, cache_dir=None, device: str = "cpu", sample_folder=None) -> Job[dict]:
    """Job: run the demo into ``out_dir``; returns the report (also written as report.json)."""
    from .predict import iter_predict, write_cells
    from .sample import sample_paths

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise InputError(out_dir, "--out must be a folder")
    paths = sample_paths(sample_folder, require=("slide", "labels", "spots", "cell_truth") + (() if train else ("checkpoint",)))
    out_dir.mkdir(parents=True, exist_ok=True)
    if cache_dir is None:
        cache_dir = out_dir / "cache"
    timings: dict[str, float] = {}

    checkpoint = paths["checkpoint"]
    training = None
    if train:
        t = time.perf_counter()
        checkpoint = out_dir / "model.ckpt"
        result = yield from delegate(iter_train_sample(paths, checkpoint, cache_dir=cache_dir, device=device))
        timings["train_s"] = time.perf_counter() - t
        training = {
            "checkpoint": str(checkpoint),
            "best_epoch": result.metrics.get("best_epoch"),
            "epochs_run": result.metrics.get("epochs_run"),
            "stopped": result.metrics.get("stopped"),
            "val_spot_pearson": result.metrics.get("val_spot_pearson"),
            "settings": dict(SAMPLE_MODEL),
        }

    t = time.perf_counter()
    adata = yield from delegate(
        iter_predict(paths["slide"], paths["labels"], checkpoint, device=device, cache_dir=cache_dir, spots=paths["spots"])
    )
    timings["predict_s"] = time.perf_counter() - t
    cells_path = write_cells(adata, out_dir / "cells.h5ad")

    t = time.perf_counter()
    yield Progress("evaluating", 0, 1)
    ev = evaluate(adata, paths)
    yield Progress("evaluating", 1, 1)
    timings["evaluate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    yield Progress("drawing", 0, 1)
    gene = ev["figure_gene"]
    png = draw_overview(out_dir / "overview.png", paths, adata, gene, ev["_spots"])
    yield Progress("drawing", 1, 1)
    timings["figure_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - t0

    report = {
        "what": "DeepSpot2Cell on the shipped sample: real H&E (CMU-1 small region), cells from a classical "
                "segmentation, SIMULATED spot counts and per-cell truth; all numbers measured in this run",
        "checkpoint": str(checkpoint),
        "trained_in_this_run": bool(train),
        "training": training,
        "encoder": adata.uns["deepspot2cell"]["encoder"],
        "n_cells": int(adata.n_obs),
        "n_cells_inside": int(ev["n_inside"]),
        "n_cells_outside": int(ev["n_outside"]),
        "n_spots": int(ev["n_spots"]),
        "n_genes": int(adata.n_vars),
        "truth": "log1p(1e4 * cell counts / total counts of the context spot's inside cells) (DESIGN.md)",
        "baseline": "each cell painted with its nearest spot's measured expression, log1p(1e4 * counts / spot total)",
        "cell_pearson": ev["cell_pearson"],
        "figure_gene": gene,
        "figure_gene_choice": "largest covariance between neighbouring spots (Moran's I x variance of the spot values)",
        "spot_morans_i": ev["morans_i"],
        "spot_spatial_covariance": ev["spatial_covariance"],
        "outputs": {"cells": str(cells_path), "overview": str(png), "report": str(out_dir / "report.json")},
        "device": adata.uns["deepspot2cell"].get("device"),
        "timings_s": timings,
    }
    from .metrics import write_json

    write_json(out_dir / "report.json", report)
    return report


# ---------------------------------------------------------------- evaluation


def evaluate(adata, paths: dict) -> dict:
    """Cell-level Pearson per gene of the prediction and of the nearest-spot baseline
    against the simulated truth, for inside and outside cells."""
    import anndata as ad

    from . import metrics as M
    from .geometry.spots import spots_from_anndata
    from .io.spots import read_spots

    um = float(adata.uns["deepspot2cell"]["um_per_px"])
    spots_ad = read_spots(paths["spots"], um_per_px=um)
    spots = spots_from_anndata(spots_ad)
    truth = ad.read_h5ad(paths["cell_truth"])
    genes = [str(g) for g in adata.var_names]
    result, spot_values = M.cell_level_scores(
        adata, truth.X, truth.obs["label"].to_numpy(np.int64), truth.var_names, spots_ad, spots, source=paths["cell_truth"]
    )
    inside = adata.obs["inside_spot"].to_numpy(bool)
    # the gene with the most spatial structure over the spots: the largest covariance
    # between neighbouring spots (Moran's I x variance; I alone favours flat genes)
    morans = morans_i(spot_values, spots.neighbours)
    structure = morans * spot_values.var(0)
    gene = genes[int(np.nanargmax(structure))]
    return {
        "cell_pearson": result,
        "figure_gene": gene,
        "morans_i": {g: float(v) for g, v in zip(genes, morans)},
        "spatial_covariance": {g: float(v) for g, v in zip(genes, structure)},
        "n_inside": int(inside.sum()),
        "n_outside": int((~inside).sum()),
        "n_spots": len(spots),
        "_spots": (spots, spot_values[:, genes.index(gene)]),
    }


def morans_i(values: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """(G,) Moran's I of each column over the spot graph (binary weights, -1 = no neighbour):
    how much of a gene's spot-to-spot variation is spatial structure rather than noise."""
    x = np.asarray(values, np.float64)
    z = x - x.mean(0)
    nb = np.asarray(neighbours, np.int64)
    i_idx, k_idx = np.nonzero(nb >= 0)
    j_idx = nb[i_idx, k_idx]
    w = len(i_idx)
    num = (z[i_idx] * z[j_idx]).sum(0)
    den = (z * z).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (len(x) / max(w, 1)) * num / den
    return np.where(den > 0, out, np.nan)


# ---------------------------------------------------------------- figure


def draw_overview(path: Path, paths: dict, adata, gene: str, spots_and_values) -> Path:
    """Three panels: H&E | predicted ``gene`` on the cells | measured ``gene`` on the spots."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.collections import PatchCollection
    from matplotlib.figure import Figure
    from matplotlib.patches import Circle, Rectangle

    from .io.atomic import atomic_path
    from .io.masks import open_cells
    from .io.slides import open_slide, read_thumbnail
    from .paint import lookup_table, paint, robust_limits

    spots, spot_vals = spots_and_values
    slide = open_slide(paths["slide"])
    try:
        f = PAINT_DOWNSAMPLE
        h, w = slide.shape
        thumb = read_thumbnail(slide, max_side=int(np.ceil(max(h, w) / f)))
        mask = open_cells(paths["labels"], slide.shape, slide.um_per_px)
        try:
            small = np.asarray(mask.labels[::f, ::f])
        finally:
            mask.close()
        um = float(slide.um_per_px)
    finally:
        slide.close()
    values = np.asarray(adata[:, gene].X, np.float32).ravel()
    lut = lookup_table(adata.obs["label"].to_numpy(np.int64), values)
    painted = np.asarray(paint([small], lut)[0])
    vmin, vmax = robust_limits(np.concatenate([values, spot_vals.astype(np.float32)]), 1, 99)

    fig = Figure(figsize=FIGURE_SIZE_IN, dpi=FIGURE_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    extent = (-0.5, w - 0.5, h - 0.5, -0.5)  # level-0 pixel coordinates on every panel
    cmap = matplotlib.colormaps["magma"]
    axes[0].imshow(thumb, extent=extent, interpolation="lanczos")
    axes[0].set_title("H&E (real: CMU-1 small region)", fontsize=10)
    axes[1].imshow(thumb, extent=extent, alpha=0.35)
    im = axes[1].imshow(np.ma.masked_invalid(painted), extent=extent, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    axes[1].set_title(f"{gene}\npredicted per cell ({adata.n_obs} cells)", fontsize=10)
    axes[2].imshow(thumb, extent=extent, alpha=0.35)
    radius = float(spots.diameter_px) / 2.0
    disks = PatchCollection([Circle((x, y), radius) for x, y in spots.xy], cmap=cmap, edgecolor="none")
    disks.set_array(np.asarray(spot_vals, np.float64))
    disks.set_clim(vmin, vmax)
    axes[2].add_collection(disks)
    axes[2].set_title(f"{gene}\nmeasured per spot (simulated; {len(spots)} spots of {spots.diameter_px * um:.0f} um)", fontsize=10)
    bar_um = 200.0
    bar_px = bar_um / um
    for ax in axes:
        ax.set_xlim(extent[0], extent[1])
        ax.set_ylim(extent[2], extent[3])
        ax.set_xticks([])
        ax.set_yticks([])
        x0, y0 = w * 0.05, h * 0.96
        ax.add_patch(Rectangle((x0, y0 - h * 0.008), bar_px, h * 0.008, color="black"))
        ax.text(x0 + bar_px / 2, y0 - h * 0.015, f"{bar_um:.0f} um", ha="center", va="bottom", fontsize=9)
    cbar = fig.colorbar(im, ax=list(axes[1:]), fraction=0.03, pad=0.01)
    cbar.set_label("log1p(1e4 x expression / total)")
    fig.suptitle("DeepSpot2Cell demo: cells predicted from spot-level training (offline encoder)")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=FIGURE_DPI)
    return path


# ---------------------------------------------------------------- command line


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``deepspot2cell demo`` options."""
    parser.add_argument("--out", required=True, help="output folder: cells.h5ad, overview.png, report.json (and model.ckpt with --train)")
    parser.add_argument("--train", action="store_true", help="retrain the checkpoint from the sample spots first (DIR/model.ckpt) and predict with it")
    parser.add_argument("--device", default="cpu", choices=["auto", "cpu", "cuda", "mps"], help="cpu by default: the demo is small")
    parser.add_argument("--cache-dir", default=None, help="embedding cache folder (default DIR/cache)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")


def cmd_demo(args) -> int:
    """Run the demo from parsed arguments; prints where the outputs are. Returns the exit status."""
    from .cli import ProgressPrinter
    from .progress import run

    printer = ProgressPrinter(getattr(args, "quiet", False))
    try:
        report = run(iter_demo(args.out, train=args.train, cache_dir=args.cache_dir, device=args.device), printer)
    finally:
        printer.close()
    for line in format_report(report):
        print(line)
    return 0


def format_report(report: dict) -> list[str]:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    cp = report["cell_pearson"]
    lines = [f"{report['n_cells']} cells x {report['n_genes']} genes, {report['n_spots']} spots"
             + (" (checkpoint trained in this run)" if report["trained_in_this_run"] else " (shipped checkpoint)")]
    for where in ("inside", "outside"):
        lines.append(f"cell-level mean Pearson vs simulated truth, {where} spots ({cp[where]['n_cells']} cells): "
                     f"model {f(cp[where]['model_mean_pearson'])}, nearest-spot baseline {f(cp[where]['baseline_mean_pearson'])}")
    lines.append(f"finished in {report['timings_s']['total_s']:.1f} s")
    for key in ("cells", "overview", "report"):
        lines.append(f"wrote {report['outputs'][key]}")
    if report["trained_in_this_run"]:
        lines.append(f"wrote {report['checkpoint']}")
    return lines


def main(argv=None) -> int:  # python -m napari_deepspot2cell.demo --out DIR
    parser = argparse.ArgumentParser(prog="deepspot2cell demo", description=__doc__.split("\n\n")[0])
    add_demo_arguments(parser)
    return cmd_demo(parser.parse_args(argv))


if __name__ == "__main__":
    import sys

    sys.exit(main())
