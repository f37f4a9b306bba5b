"""`deepspot2cell demo --out DIR`: the whole prediction on the shipped sample, measured in the run."""

import json

import numpy as np
import pytest

from napari_deepspot2cell import cli
from napari_deepspot2cell.demo import FIGURE_PX, add_demo_arguments, cmd_demo, morans_i


def _run_demo(argv: list[str]) -> int:
    """Through the console script when the lead has registered it, else the demo's own parser."""
    if "demo" in getattr(cli, "COMMANDS", {}):
        return cli.main(["demo", *argv])
    import argparse

    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return cmd_demo(parser.parse_args(argv))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    import contextlib
    import io

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        rc = _run_demo(["--out", str(out), "--quiet"])
    return out, rc, printed.getvalue()


def test_demo_writes_the_three_outputs_and_says_where(demo_run):
    out, rc, printed = demo_run
    assert rc == 0
    for name in ("cells.h5ad", "overview.png", "report.json"):
        assert (out / name).is_file(), name
        assert str(out / name) in printed
    assert not list(out.glob(".*.part*")), "a temporary file was left behind"
    assert not (out / "model.ckpt").exists()  # no training without --train
    assert any((out / "cache").rglob("c*.npy")), "embeddings go to DIR/cache by default"


def test_cells_follow_the_output_contract(demo_run):
    import anndata as ad

    from napari_deepspot2cell.model.checkpoint import load_checkpoint
    from napari_deepspot2cell.sample import sample_paths

    out, _, _ = demo_run
    a = ad.read_h5ad(out / "cells.h5ad")
    truth = ad.read_h5ad(sample_paths()["cell_truth"])
    assert a.n_obs == truth.n_obs
    assert list(a.obs_names) == [str(v) for v in a.obs["label"]]
    assert list(a.var_names) == load_checkpoint(sample_paths()["checkpoint"]).genes
    for col in ("label", "x", "y", "area", "spot", "inside_spot"):
        assert col in a.obs
    np.testing.assert_array_equal(a.obs["inside_spot"].to_numpy(bool), truth.obs.loc[a.obs_names, "inside"].to_numpy(bool))
    assert a.X.dtype == np.float32 and np.isfinite(a.X).all()
    assert a.layers["uncertainty"].shape == a.shape
    assert a.uns["deepspot2cell"]["encoder"]["id"] == "offline-he-v1"


def test_report_shows_the_model_beating_the_baseline(demo_run):
    out, _, _ = demo_run
    report = json.loads((out / "report.json").read_text())
    cp = report["cell_pearson"]
    assert report["n_cells"] == cp["all"]["n_cells"] == report["n_cells_inside"] + report["n_cells_outside"]
    assert report["n_cells_inside"] > 100 and report["n_cells_outside"] > 100
    genes = list(cp["inside"]["per_gene"])
    assert len(genes) == report["n_genes"] >= 12
    for where in ("inside", "outside"):
        per_gene = cp[where]["per_gene"]
        model = [v["model"] for v in per_gene.values() if v["model"] is not None]
        base = [v["baseline"] for v in per_gene.values() if v["baseline"] is not None]
        # the summary is the mean of the per-gene values, not a number from elsewhere
        assert cp[where]["model_mean_pearson"] == pytest.approx(np.mean(model))
        assert cp[where]["baseline_mean_pearson"] == pytest.approx(np.mean(base))
        # the method's claim on these data: cells predicted from spot-level training beat
        # painting each cell with its nearest spot, inside and outside spots
        assert cp[where]["model_mean_pearson"] > cp[where]["baseline_mean_pearson"], where
    # the unpredictable gene stays unpredictable outside spots (no leak of the truth)
    assert abs(cp["outside"]["per_gene"]["SIM_NOISE"]["model"]) < 0.2
    assert report["figure_gene"] in genes
    structure = report["spot_spatial_covariance"]
    assert structure[report["figure_gene"]] == max(structure.values())
    t = report["timings_s"]
    assert 0 < t["predict_s"] <= t["total_s"]


def test_overview_is_a_real_picture(demo_run):
    from PIL import Image

    out, _, _ = demo_run
    with Image.open(out / "overview.png") as im:
        assert im.format == "PNG"
        assert im.size == FIGURE_PX
        rgb = np.asarray(im.convert("RGB")).astype(np.int16)
    assert rgb.std() > 20
    # the painted panels hold many colours of the colormap, not one flat fill
    colours = np.unique(rgb.reshape(-1, 3) // 8, axis=0)
    assert len(colours) > 200
    # H&E panel (left third) is pink-purple: red and blue above green on tissue
    left = rgb[:, : rgb.shape[1] // 3].reshape(-1, 3)
    tissue = left[left.mean(1) < 200]
    assert len(tissue) > 1000
    assert (tissue[:, 0] > tissue[:, 1]).mean() > 0.8 and (tissue[:, 2] > tissue[:, 1]).mean() > 0.8


def test_morans_i_separates_structure_from_noise():
    # a 1-D chain: a smooth ramp is strongly autocorrelated, alternating values anti-correlated
    n = 50
    nb = np.full((n, 2), -1)
    nb[1:, 0] = np.arange(n - 1)
    nb[:-1, 1] = np.arange(1, n)
    values = np.stack([np.arange(n, dtype=float), (-1.0) ** np.arange(n), np.ones(n)], axis=1)
    i = morans_i(values, nb)
    assert i[0] > 0.9 and i[1] < -0.9 and np.isnan(i[2])


def test_demo_refuses_a_file_as_its_folder(tmp_path, capsys):
    f = tmp_path / "not_a_folder"
    f.write_text("x")
    if "demo" in getattr(cli, "COMMANDS", {}):
        assert cli.main(["demo", "--out", str(f), "--quiet"]) == 2
        assert "must be a folder" in capsys.readouterr().err
    else:
        from napari_deepspot2cell.errors import InputError

        with pytest.raises(InputError, match="must be a folder"):
            _run_demo(["--out", str(f), "--quiet"])
