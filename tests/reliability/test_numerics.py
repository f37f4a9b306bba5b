"""Numerics: every cell gets a finite prediction. Glass (white) tiles, saturated tiles
(black, pure colours), a patch with one cell, a gene with no counts anywhere give defined
values, never NaN in X; a gene without variance has a NaN Pearson, stored as null with a note.

Constant genes in the metric: tests/test_train.py::test_pearson_per_gene_gives_nan_for_constant_genes.
"""

from __future__ import annotations

import json

import anndata as ad
import numpy as np
import tifffile
import torch

from napari_deepspot2cell import metrics as M
from napari_deepspot2cell.predict import iter_predict
from napari_deepspot2cell.progress import run
from napari_deepspot2cell.train import TrainInput, iter_train

FAST = dict(max_epochs=2, n_ensemble=2, phi2rho_size=16, device="cpu")


def _write(path, image, um_per_px):
    px_per_cm = 1e4 / um_per_px
    tifffile.imwrite(path, image, photometric="rgb" if image.ndim == 3 else "minisblack", tile=(256, 256),
                     resolution=(px_per_cm, px_per_cm), resolutionunit="CENTIMETER", metadata=None)


def _finite(adata):
    assert np.isfinite(np.asarray(adata.X)).all() and adata.X.dtype == np.float32
    assert np.isfinite(adata.layers["uncertainty"]).all()
    if "rates" in adata.layers:
        assert np.isfinite(adata.layers["rates"]).all()


def test_glass_and_saturated_tiles_give_finite_predictions(tissue_files, checkpoint, tmp_path):
    tissue, paths = tissue_files
    img = tissue.image.copy()
    h, w = img.shape[:2]
    colours = [(255, 255, 255), (0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for k, c in enumerate(colours):  # six bands over the cells, each one flat colour
        img[:, k * w // 6:(k + 1) * w // 6] = c
    _write(tmp_path / "flat.tif", img, tissue.um_per_px)
    adata = run(iter_predict(tmp_path / "flat.tif", paths["labels"], checkpoint, device="cpu", cache_dir=False))
    assert adata.n_obs == len(tissue.cells)
    _finite(adata)


def test_a_single_cell_and_a_one_pixel_cell_give_finite_predictions(tissue_files, checkpoint, tmp_path):
    tissue, paths = tissue_files
    for name, labels in (("one", np.where(tissue.labels == tissue.labels[384, 384], 7, 0)), ("pixel", None)):
        if labels is None:
            labels = np.zeros_like(tissue.labels)
            labels[0, 767] = 2**31 - 1  # one pixel in a corner, the largest int32 id
        _write(tmp_path / f"{name}.tif", labels.astype(np.int32), tissue.um_per_px)
        adata = run(iter_predict(paths["slide"], tmp_path / f"{name}.tif", checkpoint, device="cpu", cache_dir=False))
        assert adata.n_obs == 1
        _finite(adata)


def test_a_spot_sum_over_one_cell_is_finite(checkpoint):
    from napari_deepspot2cell.model.checkpoint import load_checkpoint

    model = load_checkpoint(checkpoint).model
    d = model.input_size
    mask = torch.zeros(1, 5, dtype=torch.bool)
    mask[0, 0] = True  # one real cell, four padded slots
    cells = torch.randn(1, 5, d)
    cells[0, 1:] = float("nan")  # padding must not leak
    with torch.no_grad():
        out = model.forward_spot(cells, mask, torch.randn(1, d), torch.randn(1, 6, d), torch.ones(1, 6, dtype=torch.bool))
    assert torch.isfinite(out).all()


def test_training_with_a_gene_of_zero_counts(tissue_files, tmp_path):
    tissue, paths = tissue_files
    spots = ad.read_h5ad(paths["spots"])
    zero = spots.var_names[0]
    x = np.asarray(spots.X.toarray() if hasattr(spots.X, "toarray") else spots.X).copy()
    x[:, 0] = 0
    spots.X = x
    spots_path = tmp_path / "spots_zero.h5ad"
    spots.write_h5ad(spots_path)
    out = tmp_path / "zero.ckpt"
    res = run(iter_train([TrainInput(paths["slide"], paths["labels"], spots_path, cell_truth=paths["truth"])], out,
                         genes=list(spots.var_names), cache_dir=tmp_path / "cache", **FAST))
    m = json.loads(out.with_suffix(".metrics.json").read_text())  # strict JSON: no NaN tokens
    val = m["spot"]["validation"]
    assert val["per_gene"][zero] is None and val["n_genes_nan"] >= 1 and m["note"] == M.NAN_NOTE
    assert val["mean_pearson"] is None or np.isfinite(val["mean_pearson"])
    assert res.metrics["genes"][0] == zero
    adata = run(iter_predict(paths["slide"], paths["labels"], out, device="cpu", cache_dir=tmp_path / "cache"))
    _finite(adata)
    assert np.isfinite(adata[:, zero].X).all()


def test_non_finite_outputs_become_zero_and_are_marked():
    import numpy as np
    import torch

    from napari_deepspot2cell.model import DeepSpot2Cell
    from napari_deepspot2cell.predict import iter_cell_outputs
    from napari_deepspot2cell.progress import run

    model = DeepSpot2Cell(4, 3, n_ensemble=2, phi2rho_size=8, seed=0)
    emb_cells = np.ones((3, 4), np.float32)
    emb_cells[1, 0] = np.nan  # a broken embedding
    emb_spots = np.ones((1, 4), np.float32)
    mean, spread, rates, bad = run(iter_cell_outputs(model, emb_cells, emb_spots, -np.ones((1, 8), np.int64), np.zeros(3, np.int64), torch.device("cpu")))
    assert bad.tolist() == [False, True, False]
    assert np.isfinite(mean).all() and np.isfinite(spread).all() and (mean[1] == 0).all()
