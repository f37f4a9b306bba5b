"""Accuracy figures of a trained model: Pearson per gene, summaries, the loss plot.

A gene whose values (predicted or true) do not vary over the cells or spots
compared has no Pearson correlation: it gets NaN and is left out of the means;
the summary says how many were left out.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from .io.atomic import atomic_path, atomic_write_text

NAN_NOTE = "genes with zero variance in prediction or truth have NaN Pearson and are excluded from the mean"


def pearson_per_gene(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """(G,) Pearson correlation of each column of ``pred`` with that of ``truth`` over rows;
    NaN where either column is constant or there are fewer than 2 rows."""
    a = np.asarray(pred, np.float64)
    b = np.asarray(truth, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise ValueError("pred and truth must be (rows, genes)")
    if a.shape[0] < 2:
        return np.full(a.shape[1], np.nan)
    a = a - a.mean(0)
    b = b - b.mean(0)
    sa = np.sqrt((a * a).sum(0))
    sb = np.sqrt((b * b).sum(0))
    scale = np.maximum(np.maximum(np.abs(a).max(0, initial=0), np.abs(b).max(0, initial=0)), 1e-300)
    constant = (sa <= 1e-12 * scale * np.sqrt(a.shape[0])) | (sb <= 1e-12 * scale * np.sqrt(a.shape[0])) | (sa == 0) | (sb == 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = (a * b).sum(0) / (sa * sb)
    r = np.clip(r, -1.0, 1.0)
    r[constant] = np.nan
    return r


def summarise(r: np.ndarray, genes: list[str], n_rows: int) -> dict:
    """Mean over genes with a defined Pearson, the count left out, and every gene's value."""
    r = np.asarray(r, np.float64)
    ok = np.isfinite(r)
    return {
        "mean_pearson": float(r[ok].mean()) if ok.any() else None,
        "median_pearson": float(np.median(r[ok])) if ok.any() else None,
        "n_rows": int(n_rows),
        "n_genes": int(len(r)),
        "n_genes_nan": int((~ok).sum()),
        "per_gene": {g: (float(v) if math.isfinite(v) else None) for g, v in zip(genes, r)},
    }


def compare(pred: np.ndarray, truth: np.ndarray, rows: np.ndarray, genes: list[str]) -> dict:
    rows = np.asarray(rows)
    return summarise(pearson_per_gene(pred[rows], truth[rows]), genes, int(rows.sum() if rows.dtype == bool else len(rows)))


def cell_level_scores(pred, truth_counts, truth_labels, truth_genes, spots_ad, spots, *, source=None) -> tuple[dict, np.ndarray]:
    """Cell-level Pearson per gene of a prediction AnnData and of the nearest-spot
    baseline against the known truth, for inside, outside and all cells.

    truth_counts: (n, all genes) counts of the cells `truth_labels`, columns `truth_genes`;
    spots_ad / spots: the measured spots (io.spots.read_spots) and their layout.
    The truth is DESIGN.md's: log1p(1e4 * cell counts / total of the context
    spot's inside cells). Returns the scores and the spots' measured values of
    the prediction's genes.
    """
    import pandas as pd

    from .dataset import cell_truth_targets, log1p_cp10k
    from .errors import InputError
    from .geometry.assign import nearest_spot_baseline

    genes = [str(g) for g in pred.var_names]
    svar = pd.Index([str(g) for g in spots_ad.var_names])
    tvar = pd.Index([str(g) for g in truth_genes])
    missing = [g for g in genes if g not in tvar or g not in svar]
    if missing:
        raise InputError(source, f"the truth or the spots lack the model's genes {', '.join(missing[:5])}")
    pos = pd.Index(np.asarray(truth_labels, np.int64)).get_indexer(pred.obs["label"].to_numpy(np.int64))
    if (pos < 0).any():
        raise InputError(source, f"{int((pos < 0).sum())} predicted cells have no truth")
    spot_index = pd.Index(np.asarray(spots.ids, dtype=str)).get_indexer(pred.obs["spot"].astype(str).to_numpy())
    inside = pred.obs["inside_spot"].to_numpy(bool)
    # the truth's library size is every gene of the input, as for the spot targets
    truth = cell_truth_targets(truth_counts[pos], spot_index, inside, tvar.get_indexer(genes)).astype(np.float64)
    spot_values = log1p_cp10k(spots_ad.X, svar.get_indexer(genes)).astype(np.float64)
    baseline = nearest_spot_baseline(pred.obsm["spatial"], spots, spot_values)
    model = np.asarray(pred.X, np.float64)
    known = np.isfinite(truth).all(axis=1)
    result = {}
    for where, rows in (("inside", inside & known), ("outside", ~inside & known), ("all", known)):
        m = compare(model, truth, rows, genes)
        b = compare(baseline, truth, rows, genes)
        result[where] = {
            "n_cells": int(rows.sum()),
            "model_mean_pearson": m["mean_pearson"],
            "baseline_mean_pearson": b["mean_pearson"],
            "per_gene": {g: {"model": m["per_gene"][g], "baseline": b["per_gene"][g]} for g in genes},
        }
    return result, spot_values


def write_json(path, metrics: dict) -> Path:
    path = Path(path)
    atomic_write_text(path, json.dumps(metrics, indent=2, allow_nan=False, default=_plain) + "\n")
    return path


def _plain(v):
    if hasattr(v, "item"):
        return v.item()
    if hasattr(v, "tolist"):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON data")


def plot_losses(path, train_loss: list[float], val_loss: list[float], best_epoch: int | None) -> Path:
    """A PNG of train and validation loss per epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot(111)
    epochs = np.arange(1, len(train_loss) + 1)
    ax.plot(epochs, train_loss, label="train", marker="o", markersize=3)
    if any(v is not None and math.isfinite(v) for v in val_loss):
        ax.plot(epochs[: len(val_loss)], [np.nan if v is None else v for v in val_loss], label="validation", marker="o", markersize=3)
    if best_epoch is not None:
        ax.axvline(best_epoch, color="grey", linestyle="--", linewidth=1, label=f"best epoch {best_epoch}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("MSE on spot targets")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path
