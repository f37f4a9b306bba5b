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
