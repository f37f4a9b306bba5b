"""Spot-supervised training: examples, split, targets, genes, the job, cancel, metrics, bad input, CLI."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from napari_deepspot2cell import dataset as D
from napari_deepspot2cell import metrics as M
from napari_deepspot2cell import synthetic
from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.model import load_checkpoint
from napari_deepspot2cell.train import TrainInput, add_train_arguments, cmd_train, iter_train, train

FAST = dict(n_ensemble=2, phi2rho_size=16, max_epochs=3, batch_spots=8, device="cpu", lr=1e-3)


# ---------------------------------------------------------------- pure pieces


def test_examples_hold_the_inside_cells_of_each_spot_padded_with_a_mask():
    # 7 cells, 4 spots; cell 1 and 5 are outside, cell 3 has no context, spot 3 has no inside cell
    context = np.array([0, 0, 1, -1, 1, 2, 0])
    inside = np.array([True, False, True, False, True, False, True])
    neighbours = np.array([[1, -1], [0, 2], [1, -1], [2, 0]])
    targets = np.arange(8, dtype=np.float32).reshape(4, 2)
    ex = D.build_examples(context, inside, neighbours, targets)
    assert ex.spot.tolist() == [0, 1]
    assert ex.cells_of(0).tolist() == [0, 6]
    assert ex.cells_of(1).tolist() == [2, 4]
    assert ex.neighbours.tolist() == [[1, -1], [0, 2]]
    assert ex.targets.tolist() == [[0, 1], [2, 3]]

    # a third spot with one cell: padding to two slots, masked
    ex = D.build_examples(np.array([0, 0, 1, 2]), np.ones(4, bool), neighbours[:3], targets[:3])
    emb_c = torch.arange(4, dtype=torch.float32)[:, None].repeat(1, 3) + 10  # cell i -> 10 + i
    emb_s = torch.arange(3, dtype=torch.float32)[:, None].repeat(1, 3) + 100
    cells, mask, own, nb, miss, y = D.collate(ex, np.array([2, 0]), emb_c, emb_s)
    assert cells.shape == (2, 2, 3)
    assert mask.tolist() == [[True, False], [True, True]]
    assert cells[0, 0, 0] == 13 and cells[1, 0, 0] == 10 and cells[1, 1, 0] == 11
    assert own[:, 0].tolist() == [102, 100]
    assert miss.tolist() == [[False, True], [False, True]]
    assert nb[0, 0, 0] == 101 and nb[1, 0, 0] == 101
    assert y.tolist() == [[4, 5], [0, 1]]

    sub = ex.subset([2, 1])
    assert sub.cells_of(0).tolist() == [3] and sub.cells_of(1).tolist() == [2]
    pooled = D.SpotExamples.concat([ex, ex.shifted(4, 3)])
    assert pooled.cells_of(4).tolist() == [6] and pooled.spot.tolist() == [0, 1, 2, 3, 4, 5]
    assert pooled.neighbours[3].tolist() == [4, -1]


def test_spatial_split_keeps_blocks_whole_respects_the_fraction_and_the_seed():
    rng = np.random.default_rng(1)
    xy = rng.uniform(0, 2000, size=(600, 2))
    block = 200.0
    val = D.spatial_block_split(xy, block, 0.2, seed=3)
    ids = D.block_ids(xy, block)
    for b in np.unique(ids):
        assert len(set(val[ids == b].tolist())) == 1  # no block on both sides
    largest = np.bincount(ids).max() / len(xy)
    assert abs(val.mean() - 0.2) <= largest
    assert np.array_equal(val, D.spatial_block_split(xy, block, 0.2, seed=3))
    assert not np.array_equal(val, D.spatial_block_split(xy, block, 0.2, seed=4))
    assert not D.spatial_block_split(xy, block, 0.0, seed=3).any()
    # weights: points of weight 0 do not count towards the fraction
    w = (xy[:, 0] < 1000).astype(float)
    vw = D.spatial_block_split(xy, block, 0.3, seed=3, weight=w)
    assert abs(vw[w > 0].mean() - 0.3) <= np.bincount(ids[w > 0]).max() / (w > 0).sum()


def test_targets_use_the_whole_library_then_select_genes():
    counts = np.array([[1.0, 3.0, 6.0], [0.0, 0.0, 0.0], [2.0, 2.0, 0.0]])
    t = D.log1p_cp10k(counts, np.array([0]))
    assert t[:, 0] == pytest.approx([np.log1p(1e3), 0.0, np.log1p(5e3)], rel=1e-6)
    # cell truth: divided by the total of the context spot's inside cells
    cells = np.array([[1.0, 1.0], [3.0, 5.0], [4.0, 0.0], [2.0, 2.0]])
    truth = D.cell_truth_targets(cells, np.array([0, 0, 1, -1]), np.array([True, True, False, False]), np.array([0, 1]))
    assert truth[0] == pytest.approx(np.log1p(1e4 * np.array([1, 1]) / 10), rel=1e-6)
    assert truth[1] == pytest.approx(np.log1p(1e4 * np.array([3, 5]) / 10), rel=1e-6)
    assert np.isnan(truth[2]).all() and np.isnan(truth[3]).all()  # spot 1 has no inside cell; cell 3 no spot


def test_gene_selection_user_list_and_highly_variable_genes():
    rng = np.random.default_rng(0)
    n, g = 400, 60
    mu = np.exp(rng.uniform(-1, 3, g))
    counts = rng.poisson(mu, size=(n, g)).astype(float)
    wild = [5, 17, 42]  # overdispersed: negative binomial at the same mean
    for j in wild:
        counts[:, j] = rng.negative_binomial(0.5, 0.5 / (0.5 + mu[j]), size=n)
    names = [f"g{j}" for j in range(g)]
    top, info = D.select_genes(names, counts, n_top_genes=3)
    assert top == ["g5", "g17", "g42"]
    assert "seurat_v3" in info["method"]
    assert D.select_genes(names, counts)[0] == names  # <= 1000 genes: all of them
    assert D.select_genes(names, counts, genes=["g3", "g1"])[0] == ["g3", "g1"]
    with pytest.raises(InputError, match="NOPE1, NOPE2") as exc:
        D.select_genes(names, counts, genes=["g3", "NOPE1", "NOPE2"], source="spots.h5ad")
    assert str(exc.value).startswith("spots.h5ad:")


def test_pearson_per_gene_gives_nan_for_constant_genes():
    rng = np.random.default_rng(0)
    truth = rng.normal(size=(50, 3))
    pred = np.stack([truth[:, 0] * 2 + 1, -truth[:, 1], np.full(50, 0.7)], axis=1)
    r = M.pearson_per_gene(pred, truth)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(-1.0) and np.isnan(r[2])
    s = M.summarise(r, ["a", "b", "c"], 50)
    assert s["mean_pearson"] == pytest.approx(0.0) and s["n_genes_nan"] == 1 and s["per_gene"]["c"] is None


# ---------------------------------------------------------------- the job on generated tissue


@pytest.fixture(scope="module")
def tissue_files(tmp_path_factory):
    tissue = synthetic.make_tissue(seed=0, shape=(1024, 768), n_genes=12)
    folder = tmp_path_factory.mktemp("tissue")
    return tissue, synthetic.write_files(tissue, folder)


def _input(paths, **kw):
    return TrainInput(paths["slide"], paths["labels"], paths["spots"], cell_truth=paths["truth"], **kw)


@pytest.fixture(scope="module")
def trained(tissue_files, tmp_path_factory):
    _, paths = tissue_files
    folder = tmp_path_factory.mktemp("run")
    cache = folder / "cache"
    res = train([_input(paths)], folder / "model.ckpt", cache_dir=cache, seed=7, **FAST)
    return res, cache, folder


def _counting_caches(monkeypatch):
    import napari_deepspot2cell.predict as P

    made = []
    real = P.embedding_cache

    def counting(*a, **k):
        c = real(*a, **k)
        made.append(c)
        return c

    monkeypatch.setattr(P, "embedding_cache", counting)
    return made


def test_same_seed_same_losses_and_the_second_run_embeds_nothing(trained, tissue_files, tmp_path, monkeypatch):
    res, cache, _ = trained
    _, paths = tissue_files
    made = _counting_caches(monkeypatch)
    again = train([_input(paths)], tmp_path / "again.ckpt", cache_dir=cache, seed=7, **FAST)
    assert len(made) == 2 and sum(c.computed for c in made) == 0 and sum(c.reused for c in made) > 0
    assert again.history["train_loss"] == res.history["train_loss"]
    assert again.history["val_loss"] == res.history["val_loss"]
    other = train([_input(paths)], tmp_path / "other.ckpt", cache_dir=cache, seed=8, **{**FAST, "aggregate": "codes"})
    assert sum(c.computed for c in made) == 0  # other hyper-parameters: still nothing embedded
    assert other.history["train_loss"] != res.history["train_loss"]


def test_checkpoint_metrics_json_and_loss_plot(trained, tissue_files):
    res, _, folder = trained
    tissue, _ = tissue_files
    ck = load_checkpoint(folder / "model.ckpt")
    assert ck.genes == tissue.genes  # 12 genes <= 1000: all, in the file's order
    assert ck.aggregate == "counts"
    assert ck.geometry["spot_kind"] == "visium" and ck.geometry["neighbours"] == "hex6"
    assert ck.geometry["spot_diameter_um"] == pytest.approx(55.0)
    assert ck.geometry["patch_um"] == pytest.approx(55.0) and ck.geometry["um_per_px"] == pytest.approx(0.5)
    assert ck.target["normalisation"] == "log1p_cp10k" and "all genes" in ck.target["library_size"]
    assert ck.training["seed"] == 7 and ck.training["epochs_run"] == len(res.history["epoch"]) == 3
    assert ck.training["best_epoch"] == res.metrics["best_epoch"]
    best = res.metrics["best_epoch"]
    assert res.history["val_loss"][best - 1] == min(res.history["val_loss"])

    data = json.loads((folder / "model.metrics.json").read_text())
    assert data == json.loads(json.dumps(ck.metrics))
    v = data["spot"]["validation"]
    vals = [x for x in v["per_gene"].values() if x is not None]
    assert v["mean_pearson"] == pytest.approx(np.mean(vals)) and v["n_genes_nan"] == len(v["per_gene"]) - len(vals)
    assert v["n_rows"] == ck.training["slides"][0]["n_val"] > 0
    assert "NaN" in data["note"]
    cell = data["cell"]
    for scope in ("validation", "all"):
        for where in ("inside", "outside"):
            for who in ("model", "baseline"):
                assert math.isfinite(cell[scope][where][who]["mean_pearson"])
    n_all = cell["all"]["inside"]["model"]["n_rows"] + cell["all"]["outside"]["model"]["n_rows"]
    assert n_all == len(tissue.cells) - cell["n_cells_without_truth"]
    assert cell["all"]["inside"]["model"]["n_rows"] == int(tissue.assignment.inside.sum())

    # the baseline figure, recomputed here from the files' data
    from napari_deepspot2cell.geometry.assign import nearest_spot_baseline
    from napari_deepspot2cell.geometry.spots import spots_from_anndata

    spots = tissue.spots
    target = np.log1p(1e4 * spots.X / spots.X.sum(1, keepdims=True))
    base = nearest_spot_baseline(tissue.cells_xy, spots_from_anndata(spots), target)
    truth = np.asarray(tissue.cell_truth.X)
    rows = tissue.assignment.inside & np.isfinite(truth).all(1)
    r = M.pearson_per_gene(base[rows], truth[rows])
    assert cell["all"]["inside"]["baseline"]["mean_pearson"] == pytest.approx(np.nanmean(r), abs=1e-6)

    png = (folder / "model.loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000


def test_cancel_keeps_the_best_model_so_far(tissue_files, trained, tmp_path):
    _, paths = tissue_files
    _, cache, _ = trained
    out = tmp_path / "cancelled.ckpt"
    job = iter_train([_input(paths)], out, cache_dir=cache, seed=7, **{**FAST, "max_epochs": 50})
    seen = None
    for event in job:
        if event.stage == "training" and event.done == 2:
            seen = event.info
            break
    job.close()
    assert out.exists() and (tmp_path / "cancelled.metrics.json").exists()
    ck = load_checkpoint(out)
    assert ck.training["stopped"] == "cancelled" and ck.training["epochs_run"] == 2
    assert ck.training["best_epoch"] == seen["best_epoch"]
    # the same seed run to the best epoch and no further has the same weights
    ref = train([_input(paths)], tmp_path / "ref.ckpt", cache_dir=cache, seed=7, **{**FAST, "max_epochs": seen["best_epoch"]})
    ref_ck = load_checkpoint(ref.checkpoint)
    for k, v in ref_ck.model.state_dict().items():
        assert torch.equal(v, ck.model.state_dict()[k]), k


def test_cancel_before_any_epoch_writes_nothing(tissue_files, trained, tmp_path):
    _, paths = tissue_files
    _, cache, _ = trained
    out = tmp_path / "never.ckpt"
    job = iter_train([_input(paths)], out, cache_dir=cache, **FAST)
    next(job)
    job.close()
    assert not out.exists() and not list(tmp_path.iterdir())


def test_two_slides_in_one_run(tissue_files, trained, tmp_path):
    _, paths = tissue_files
    _, cache, _ = trained
    t2 = synthetic.make_tissue(seed=3, shape=(768, 1024), n_genes=12)
    p2 = synthetic.write_files(t2, tmp_path / "second")
    res = train([_input(paths, name="one"), _input(p2, name="two")], tmp_path / "two.ckpt", cache_dir=cache, **FAST)
    ck = load_checkpoint(res.checkpoint)
    slides = ck.training["slides"]
    assert [s["name"] for s in slides] == ["one", "two"]
    assert all(s["n_val"] > 0 and s["n_examples"] - s["n_val"] >= 4 for s in slides)
    n_cells = sum(len(t.cells) for t in (tissue_files[0], t2))
    rows = res.metrics["cell"]["all"]["inside"]["model"]["n_rows"] + res.metrics["cell"]["all"]["outside"]["model"]["n_rows"]
    assert rows == n_cells - res.metrics["cell"]["n_cells_without_truth"]


def test_simulated_grid_spots(tissue_files, tmp_path):
    from napari_deepspot2cell.io.slides import open_slide

    tissue, paths = tissue_files
    spots, grid, _ = synthetic.simulate_spots_from_cells(
        tissue.labels, tissue.cells, tissue.cell_counts, tissue.genes, um_per_px=tissue.um_per_px, patch_um=60.0, spot_diameter_um=50.0
    )
    # from a file: the grid is known from the file's own metadata
    path = tmp_path / "grid.h5ad"
    spots.write_h5ad(path)
    res = train([TrainInput(paths["slide"], paths["labels"], path, spot_diameter_um=50.0)], tmp_path / "grid.ckpt",
                cache_dir=tmp_path / "cache", **{**FAST, "max_epochs": 1})
    ck = load_checkpoint(res.checkpoint)
    assert ck.geometry["spot_kind"] == "grid" and ck.geometry["neighbours"] == "grid8"
    assert ck.geometry["patch_um"] == pytest.approx(60.0)
    assert ck.training["slides"][0]["n_spots"] == len(grid)  # the whole grid gives context
    assert ck.training["slides"][0]["n_examples"] == spots.n_obs
    # already open objects
    res2 = train([TrainInput(open_slide(paths["slide"]), tissue.labels, spots)], tmp_path / "grid2.ckpt",
                 cache_dir=tmp_path / "cache", **{**FAST, "max_epochs": 1})
    assert res2.history["train_loss"] == res.history["train_loss"]


# ---------------------------------------------------------------- bad input


def _spots_copy(tissue, tmp_path, edit):
    adata = tissue.spots.copy()
    adata = edit(adata)
    path = tmp_path / "edited.h5ad"
    adata.write_h5ad(path)
    return path


def test_bad_inputs_are_one_line_input_errors(tissue_files, tmp_path):
    tissue, paths = tissue_files
    kw = dict(cache_dir=tmp_path / "cache", **FAST)

    with pytest.raises(InputError, match=r"\.ckpt"):
        train([_input(paths)], tmp_path / "model.pt", **kw)
    with pytest.raises(InputError, match="NOT_A_GENE") as e:
        train([_input(paths)], tmp_path / "m.ckpt", genes=["SIM_EOSIN", "NOT_A_GENE"], **kw)
    assert e.value.source == str(paths["spots"])

    def away(a):
        a.obsm["spatial"] = a.obsm["spatial"] + 5000.0
        return a

    far = _spots_copy(tissue, tmp_path, away)
    with pytest.raises(InputError, match="outside the slide") as e:
        train([TrainInput(paths["slide"], paths["labels"], far)], tmp_path / "m.ckpt", **kw)
    assert e.value.source == str(far)

    with pytest.raises(InputError, match="smaller than cells") as e:
        train([TrainInput(paths["slide"], paths["labels"], paths["spots"], spot_diameter_um=3.0)], tmp_path / "m.ckpt", **kw)
    assert e.value.source == str(paths["spots"])

    import tifffile

    lonely = np.zeros_like(tissue.labels)
    # one cell in the gap between spots: inside none of them
    sx, sy = tissue.spots.obsm["spatial"][0]
    d = 55.0 / tissue.um_per_px
    cx, cy = int(sx + d / 2 + 10), int(sy)
    lonely[cy - 5 : cy + 5, cx - 5 : cx + 5] = 1
    lab = tmp_path / "lonely.tif"
    tifffile.imwrite(lab, lonely)
    with pytest.raises(InputError, match="inside any spot"):
        train([TrainInput(paths["slide"], lab, paths["spots"])], tmp_path / "m.ckpt", **kw)

    few = _spots_copy(tissue, tmp_path, lambda a: a[:3].copy())
    with pytest.raises(InputError, match="training spot") as e:
        train([TrainInput(paths["slide"], paths["labels"], few)], tmp_path / "m.ckpt", **{**kw, "val_fraction": 0.0})
    assert e.value.source == str(few)
    assert not list(tmp_path.glob("*.ckpt")) and "\n" not in str(e.value)


# ---------------------------------------------------------------- command line


def _cli(argv):
    from napari_deepspot2cell import cli

    if "train" in getattr(cli, "COMMANDS", {}):
        return cli.main(argv)
    # not registered yet: the same wiring main() does, around this module's functions
    parser = argparse.ArgumentParser(prog="deepspot2cell")
    sub = parser.add_subparsers(dest="command", required=True)
    add_train_arguments(sub.add_parser("train"))
    args = parser.parse_args(argv)
    try:
        return cmd_train(args)
    except InputError as exc:
        import sys

        print(f"deepspot2cell train: error: {exc}", file=sys.stderr)
        return 2


def test_cmd_train(tissue_files, trained, tmp_path, capsys):
    _, paths = tissue_files
    _, cache, _ = trained
    out = tmp_path / "cli.ckpt"
    genes = tmp_path / "genes.txt"
    genes.write_text("SIM_EOSIN\nSIM_NUCSIZE\nSIM_TYPE_A_1\n")
    rc = _cli(["train", str(paths["slide"]), "--labels", str(paths["labels"]), "--spots", str(paths["spots"]), "--out", str(out),
               "--max-epochs", "2", "--n-ensemble", "2", "--phi2rho-size", "16", "--genes", str(genes), "--seed", "1",
               "--cache-dir", str(cache), "--cell-truth", str(paths["truth"]), "--quiet", "--device", "cpu"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "epoch   1: train loss" in text and "epoch   2: train loss" in text
    assert "cell Pearson, all spots, outside cells: model" in text
    ck = load_checkpoint(out)
    assert ck.genes == ["SIM_EOSIN", "SIM_NUCSIZE", "SIM_TYPE_A_1"] and ck.training["seed"] == 1
    assert (tmp_path / "cli.metrics.json").exists() and (tmp_path / "cli.loss.png").exists()

    rc = _cli(["train", str(paths["slide"]), "--labels", str(paths["labels"]), "--spots", str(paths["spots"]), "--out", str(tmp_path / "x.pt")])
    err = capsys.readouterr().err
    assert rc == 2 and "x.pt" in err and len(err.strip().splitlines()) == 1
