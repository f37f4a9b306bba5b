"""The real inputs train end to end for a few epochs on the offline encoder:
a Space Ranger folder (its own lowres image as the slide) and Xenium-like
cells (NCBI858) as simulated spots."""

import json
import math

import numpy as np
import pytest
import tifffile

from napari_deepspot2cell.cli import main

FAST = ["--max-epochs", "3", "--n-ensemble", "2", "--phi2rho-size", "32", "--device", "cpu", "--quiet"]


def test_space_ranger_folder_trains_on_its_lowres_image(shared_data, tmp_path):
    from skimage.io import imread

    folder = shared_data / "visium_spaceranger_v1"
    image = folder / "spatial" / "tissue_lowres_image.png"
    factors = json.loads((folder / "spatial" / "scalefactors_json.json").read_text())
    # Visium spots are 55 um wide: the pixel size of the lowres image follows
    um_per_px = 55.0 / (factors["spot_diameter_fullres"] * factors["tissue_lowres_scalef"])
    from napari_deepspot2cell.io.spots import read_spots

    rgb = imread(image)[..., :3]
    spots = read_spots(folder, um_per_px=um_per_px, image=image)
    # at ~14 um/px a cell is a pixel or two: 2 x 2 px cells on the tissue within a
    # spot pitch of the spots that have counts (the test matrix holds ~100 spots)
    yy, xx = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    from scipy.spatial import cKDTree

    near = cKDTree(spots.obsm["spatial"]).query(np.stack([xx.ravel(), yy.ravel()], 1))[0].reshape(yy.shape) < 7
    tissue = (rgb.mean(axis=2) < 200) & near
    block = (yy // 2) * (rgb.shape[1] // 2 + 1) + xx // 2 + 1
    labels = np.where(tissue, block, 0).astype(np.int32)
    mask = tmp_path / "cells.tif"
    tifffile.imwrite(mask, labels)
    out = tmp_path / "model.ckpt"
    rc = main(["train", str(image), "--labels", str(mask), "--spots", str(folder), "--um-per-px", f"{um_per_px:.6f}",
               "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--n-top-genes", "50", "--val-fraction", "0.3", *FAST])
    assert rc == 0 and out.exists()
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert metrics["epochs_run"] == 3 and len(metrics["genes"]) == 50
    assert metrics["spot"]["train"]["n_rows"] + metrics["spot"]["validation"]["n_rows"] >= 20
    # the model predicts every cell of that slide with the spots as context
    cells = tmp_path / "cells.h5ad"
    assert main(["predict", str(image), "--labels", str(mask), "--checkpoint", str(out), "--spots", str(folder),
                 "--um-per-px", f"{um_per_px:.6f}", "--out", str(cells), "--cache-dir", str(tmp_path / "cache"),
                 "--device", "cpu", "--quiet"]) == 0
    import anndata as ad

    a = ad.read_h5ad(cells)
    assert a.n_obs == len(np.unique(labels[labels > 0])) and a.obs["inside_spot"].any() and np.isfinite(a.X).all()


def test_xenium_cells_train_as_simulated_spots(shared_data, tmp_path):
    d = shared_data / "xenium_lung_NCBI858"
    out = tmp_path / "model.ckpt"
    with pytest.warns(UserWarning, match="x_pixel as the row"):
        rc = main(["train", str(d / "NCBI858.jpg"), "--labels", str(d / "NCBI858.h5ad"), "--simulate-spots",
                   "--cell-diameter-um", "20", "--um-per-px", "1.0", "--out", str(out),
                   "--cache-dir", str(tmp_path / "cache"), *FAST])
    assert rc == 0
    metrics = json.loads(out.with_suffix(".metrics.json").read_text())
    assert len(metrics["genes"]) == 338 and metrics["epochs_run"] == 3
    # the cells' own counts are known here, so cell-level metrics are reported
    inside = metrics["cell"]["all"]["inside"]
    assert inside["model"]["n_rows"] > 20 and math.isfinite(inside["baseline"]["mean_pearson"])
