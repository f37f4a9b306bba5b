"""`deepspot2cell predict` end to end on the real CMU-1 slide, and the bad inputs of the contract."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers_model import save_untrained_checkpoint

from napari_deepspot2cell.cli import main

GENES = ["SIM_A", "SIM_B", "SIM_C", "SIM_D", "SIM_E"]


def nuclei_mask(rgb: np.ndarray) -> np.ndarray:
    """Cells of a real H&E image: haematoxylin-rich blobs, labelled."""
    from scipy import ndimage as ndi
    from skimage.color import rgb2hed
    from skimage.morphology import remove_small_objects

    h = rgb2hed(rgb)[..., 0]
    fg = remove_small_objects(h > np.percentile(h, 85), 20)
    labels, _ = ndi.label(fg)
    return labels.astype(np.int32)


@pytest.fixture(scope="module")
def cmu1(tmp_path_factory):
    svs = Path(__file__).resolve().parents[2] / "shared" / "data" / "cmu1_small_region" / "cmu_small_region.svs"
    if not svs.exists():
        pytest.skip(f"real slide not found at {svs}")
    from napari_deepspot2cell.io.slides import open_slide

    folder = tmp_path_factory.mktemp("cmu1")
    slide = open_slide(svs)
    labels = nuclei_mask(np.asarray(slide.levels[0]))
    mask = folder / "cells.tif"
    tifffile.imwrite(mask, labels, tile=(256, 256), compression="zlib")
    return svs, mask, labels


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", GENES, um_per_px=0.2125)


def test_predict_writes_the_output_contract(cmu1, checkpoint, tmp_path, capsys):
    import anndata as ad
    import scanpy as sc

    svs, mask, labels = cmu1
    out = tmp_path / "cells.h5ad"
    rc = main(["predict", str(svs), "--labels", str(mask), "--checkpoint", str(checkpoint), "--out", str(out), "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "cache")])
    assert rc == 0
    assert out.exists() and not list(tmp_path.glob(".cells.h5ad.*"))
    a = sc.read_h5ad(out)
    ids = np.unique(labels)
    ids = ids[ids > 0]
    assert a.n_obs == len(ids) and list(a.obs_names) == [str(i) for i in ids]
    assert list(a.var_names) == GENES
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all() and (a.X >= 0).all()
    for col in ("label", "x", "y", "area", "spot"):
        assert col in a.obs
    np.testing.assert_allclose(a.obsm["spatial"], a.obs[["x", "y"]].to_numpy())
    assert a.layers["uncertainty"].shape == a.shape and (a.layers["uncertainty"] >= 0).all()
    meta = a.uns["deepspot2cell"]
    assert meta["encoder"]["id"] == "offline-he-v1" and abs(meta["um_per_px"] - 0.499) < 1e-6
    # centroids agree with the mask
    i = len(ids) // 2
    yy, xx = np.nonzero(labels == ids[i])
    np.testing.assert_allclose(a.obs.iloc[i][["x", "y"]].astype(float), [xx.mean(), yy.mean()])
    assert a.obs["area"].iloc[i] == len(yy)
    # predictions differ between cells: the model sees each cell's own tile
    assert a.X.std(axis=0).min() > 0
    # a second run reuses every embedding from the cache and gives the same numbers
    out2 = tmp_path / "again.h5ad"
    assert main(["predict", str(svs), "--labels", str(mask), "--checkpoint", str(checkpoint), "--out", str(out2), "--device", "cpu", "--quiet", "--cache-dir", str(tmp_path / "cache")]) == 0
    np.testing.assert_array_equal(ad.read_h5ad(out2).X, a.X)


def _run_cli(*args):
    return subprocess.run([sys.executable, "-m", "napari_deepspot2cell.cli", *map(str, args)], capture_output=True, text=True, timeout=300)


def test_bad_inputs_exit_2_with_one_line_and_nothing_written(cmu1, checkpoint, tmp_path):
    svs, mask, labels = cmu1
    out = tmp_path / "cells.h5ad"
    wrong_shape = tmp_path / "small.npy"
    np.save(wrong_shape, labels[:100, :100])
    not_a_ckpt = tmp_path / "model.ckpt"
    not_a_ckpt.write_bytes(b"this is not a checkpoint")
    gray = tmp_path / "gray.tif"
    tifffile.imwrite(gray, np.zeros((64, 64), np.uint8), resolution=(1e4, 1e4), resolutionunit="CENTIMETER")
    cases = [
        ((tmp_path / "missing.svs", "--labels", mask, "--checkpoint", checkpoint), "missing.svs"),
        ((svs, "--labels", wrong_shape, "--checkpoint", checkpoint), "small.npy"),
        ((svs, "--labels", mask, "--checkpoint", not_a_ckpt), "model.ckpt"),
        ((gray, "--labels", mask, "--checkpoint", checkpoint), "gray.tif"),
        ((svs, "--labels", mask, "--checkpoint", checkpoint, "--encoder", "uni"), ""),
    ]
    for args, named in cases:
        r = _run_cli("predict", *args, "--out", out, "--device", "cpu", "--quiet", "--no-cache")
        assert r.returncode == 2, (args, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert named in lines[0]
        assert not out.exists()
    r = _run_cli("predict", svs, "--labels", mask, "--checkpoint", checkpoint, "--out", tmp_path / "cells.csv")
    assert r.returncode == 2 and ".h5ad" in r.stderr


def test_failed_run_keeps_an_earlier_output(cmu1, checkpoint, tmp_path):
    svs, mask, _ = cmu1
    out = tmp_path / "cells.h5ad"
    out.write_bytes(b"an earlier result")
    r = _run_cli("predict", svs, "--labels", tmp_path / "nope.tif", "--checkpoint", checkpoint, "--out", out, "--quiet")
    assert r.returncode == 2
    assert out.read_bytes() == b"an earlier result"
