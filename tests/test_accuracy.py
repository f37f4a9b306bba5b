"""Accuracy on generated tissue with known per-cell counts (DESIGN.md, Testing).

`deepspot2cell train` sees the spot counts only; `deepspot2cell predict` with the
written checkpoint paints every cell; the cell-level mean per-gene Pearson
against the known truth must beat painting each cell with its nearest spot's
measured expression, inside and outside spots, by a clear margin.
"""

from __future__ import annotations

import math

import anndata as ad
import numpy as np
import pytest

from napari_deepspot2cell import synthetic
from napari_deepspot2cell.geometry.assign import nearest_spot_baseline
from napari_deepspot2cell.geometry.spots import spots_from_anndata
from napari_deepspot2cell.metrics import pearson_per_gene

MARGIN = 0.05
TRAIN_FLAGS = ["--max-epochs", "60", "--n-ensemble", "3", "--phi2rho-size", "128", "--lr", "1e-3",
               "--spot-batch-size", "16", "--patience", "8", "--device", "cpu", "--quiet"]


def _cli(argv):
    from napari_deepspot2cell.cli import main

    return main(argv)


def _scores(pred: ad.AnnData, tissue) -> dict:
    truth = tissue.cell_truth
    pred = pred[truth.obs_names]
    assert list(pred.var_names) == list(truth.var_names)
    t = np.asarray(truth.X, np.float64)
    p = np.asarray(pred.X, np.float64)
    spots = tissue.spots
    measured = np.log1p(1e4 * spots.X / spots.X.sum(1, keepdims=True))
    base = nearest_spot_baseline(truth.obs[["x", "y"]].to_numpy(), spots_from_anndata(spots), measured)
    inside = pred.obs["inside_spot"].to_numpy(bool)
    assert np.array_equal(inside, truth.obs["inside"].to_numpy(bool))
    known = np.isfinite(t).all(1)
    out = {}
    for where, rows in (("inside", inside & known), ("outside", ~inside & known)):
        out[where] = {
            "model": float(np.nanmean(pearson_per_gene(p[rows], t[rows]))),
            "baseline": float(np.nanmean(pearson_per_gene(base[rows], t[rows]))),
            "cells": int(rows.sum()),
        }
    return out


def _train_predict(paths, folder, aggregate: str | None):
    ckpt = folder / f"model_{aggregate or 'default'}.ckpt"
    # summed codes feed rho sums over ~15 cells: the method's lr 1e-4 keeps them stable
    flags = [] if aggregate is None else ["--aggregate", aggregate, "--lr", "1e-4"]
    rc = _cli(["train", str(paths["slide"]), "--labels", str(paths["labels"]), "--spots", str(paths["spots"]),
               "--out", str(ckpt), "--cache-dir", str(folder / "cache"), *TRAIN_FLAGS, *flags])
    assert rc == 0
    cells = folder / f"cells_{aggregate or 'default'}.h5ad"
    from napari_deepspot2cell.cli import main

    rc = main(["predict", str(paths["slide"]), "--labels", str(paths["labels"]), "--checkpoint", str(ckpt),
               "--spots", str(paths["spots"]), "--out", str(cells), "--cache-dir", str(folder / "cache"),
               "--device", "cpu", "--quiet"])
    assert rc == 0
    return ad.read_h5ad(cells)


@pytest.mark.slow
def test_model_beats_nearest_spot_painting_inside_and_outside(tmp_path, capsys, seed=0):
    tissue = synthetic.make_tissue(seed=seed, shape=(1536, 1536))
    paths = synthetic.write_files(tissue, tmp_path / "tissue")

    counts = _scores(_train_predict(paths, tmp_path, None), tissue)
    codes = _scores(_train_predict(paths, tmp_path, "codes"), tissue)
    with capsys.disabled():
        for name, s in (("counts (default)", counts), ("codes", codes)):
            for where in ("inside", "outside"):
                v = s[where]
                print(f"\n[accuracy] {name:>16} {where:>7} cells ({v['cells']}): model {v['model']:.3f}  nearest-spot baseline {v['baseline']:.3f}", end="")
        print()
    for where in ("inside", "outside"):
        assert counts[where]["model"] >= counts[where]["baseline"] + MARGIN, (where, counts[where])
        assert math.isfinite(codes[where]["model"])
