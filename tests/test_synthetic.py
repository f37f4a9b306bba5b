"""Generated tissue: determinism, the look of the types, counts into spots, truth, files."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import tifffile
from scipy.spatial import cKDTree
from skimage.color import rgb2hed

from napari_deepspot2cell.geometry.cells import cell_table
from napari_deepspot2cell.synthetic import _hex_spots, make_tissue, simulate_spots_from_cells, write_files

SHAPE = (512, 512)


@pytest.fixture(scope="module")
def tissue():
    return make_tissue(seed=1, shape=SHAPE)


def brute_inside(labels, xy, diameter, threshold=0.6):
    """(N, M) bool: cell i >= threshold of its pixels in disk j, by direct counting."""
    h, w = labels.shape
    n = int(labels.max())
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    rr, cc = np.mgrid[0:h, 0:w]
    out = np.zeros((n, len(xy)), bool)
    for j, (x, y) in enumerate(xy):
        disk = (cc - x) ** 2 + (rr - y) ** 2 <= (diameter / 2) ** 2
        cnt = np.bincount(labels[disk], minlength=n + 1)[1:]
        out[:, j] = cnt >= threshold * area
    return out


def test_deterministic_by_seed():
    a = make_tissue(seed=4, shape=(256, 320), n_genes=10)
    b = make_tissue(seed=4, shape=(256, 320), n_genes=10)
    c = make_tissue(seed=5, shape=(256, 320), n_genes=10)
    np.testing.assert_array_equal(a.image, b.image)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.cell_counts, b.cell_counts)
    np.testing.assert_array_equal(a.spots.X, b.spots.X)
    assert not np.array_equal(a.labels, c.labels)


def test_shapes_and_dtypes(tissue):
    h, w = SHAPE
    n = len(tissue.cells)
    assert tissue.image.shape == (h, w, 3) and tissue.image.dtype == np.uint8
    assert tissue.labels.shape == (h, w) and tissue.labels.dtype == np.int32
    assert tissue.nuclei.shape == (h, w) and tissue.nuclei.dtype == np.int32
    assert tissue.cell_counts.shape == (n, 24) and np.issubdtype(tissue.cell_counts.dtype, np.integer)
    assert (tissue.cell_counts >= 0).all()
    assert tissue.cell_types.shape == (n,) and set(np.unique(tissue.cell_types)) == {0, 1, 2, 3}
    assert tissue.cells_xy.shape == (n, 2)
    assert len(tissue.cell_features) == n
    assert {"type", "nucleus_area", "h_intensity", "eosin", "density", "area"} <= set(tissue.cell_features.columns)
    assert len(tissue.genes) == 24 and all(g.startswith("SIM_") for g in tissue.genes)
    assert {"SIM_TYPE_A_1", "SIM_TYPE_D_1", "SIM_NUCSIZE", "SIM_EOSIN", "SIM_DENSITY"} <= set(tissue.genes)
    assert len(set(tissue.genes)) == 24
    assert 150 < n < 800  # ~ 400 cells on 256 x 256 um
    assert len(tissue.cell_truth) == n and tissue.cell_truth.n_vars == 24
    assert len(tissue.assignment) == n
    # image is H&E-like: pink-purple, not grey, not saturated
    mean = tissue.image.reshape(-1, 3).mean(0)
    assert mean[1] < mean[0] - 20 and mean[1] < mean[2] - 20
    with pytest.raises(ValueError):
        make_tissue(shape=(64, 64), n_genes=6)


def test_every_cell_id_is_in_the_table(tissue):
    ids = np.unique(tissue.labels)
    n = len(tissue.cells)
    np.testing.assert_array_equal(ids, np.arange(0, n + 1))
    np.testing.assert_array_equal(tissue.cells["label"].to_numpy(), np.arange(1, n + 1))
    np.testing.assert_array_equal(tissue.cell_features["label"].to_numpy(), np.arange(1, n + 1))
    ref = cell_table(tissue.labels)
    np.testing.assert_allclose(tissue.cells_xy, ref[["x", "y"]].to_numpy())
    # nuclei lie in their own cell
    nz = tissue.nuclei > 0
    np.testing.assert_array_equal(tissue.nuclei[nz], tissue.labels[nz])
    assert np.count_nonzero(np.bincount(tissue.nuclei.ravel(), minlength=n + 1)[1:]) > 0.95 * n


def test_types_look_different(tissue):
    hed = rgb2hed(tissue.image)
    nuc = tissue.nuclei.ravel()
    cell = tissue.labels.ravel()
    types = np.concatenate([[-1], tissue.cell_types])
    h_by_type = [hed[..., 0].ravel()[(nuc > 0) & (types[nuc] == t)].mean() for t in range(4)]
    cyto = (cell > 0) & (nuc == 0)
    e_by_type = [hed[..., 1].ravel()[cyto & (types[cell] == t)].mean() for t in range(4)]
    # lymphocyte-like nuclei darkest, tumour-like (vesicular) palest
    assert h_by_type[0] > h_by_type[2] > h_by_type[1]
    assert h_by_type[0] - h_by_type[1] > 0.3 * abs(h_by_type[0])
    # plasma-like cytoplasm the most eosinophilic
    assert e_by_type[3] == max(e_by_type)
    f = tissue.cell_features
    by = f.groupby("type")
    assert by["nucleus_area"].mean()[1] > 1.5 * by["nucleus_area"].mean()[0]  # tumour nuclei large
    assert by["elongation"].mean()[2] > 2.0  # fibroblast-like elongated
    # continuous variation within a type
    assert (by["nucleus_area"].std() > 0).all() and (by["h_intensity"].std() > 0).all()


def test_types_cluster_in_space(tissue):
    xy, t = tissue.cells_xy, tissue.cell_types
    _, nn = cKDTree(xy).query(xy, k=2)
    same = np.mean(t == t[nn[:, 1]])
    p = np.bincount(t, minlength=4) / len(t)
    assert same > (p**2).sum() + 0.15


def test_counts_follow_type_and_look(tissue):
    c = pd.DataFrame(tissue.cell_counts, columns=tissue.genes)
    t = tissue.cell_types
    for k, letter in enumerate("ABCD"):
        own = c.loc[t == k, f"SIM_TYPE_{letter}_1"].mean()
        other = c.loc[t != k, f"SIM_TYPE_{letter}_1"].mean()
        assert own > 3 * other
    f = tissue.cell_features
    within = t == 0
    r_nuc = np.corrcoef(np.log1p(c["SIM_NUCSIZE"][within]), np.log(f["nucleus_area"][within]))[0, 1]
    assert r_nuc > 0.2
    assert np.corrcoef(np.log1p(c["SIM_EOSIN"]), f["eosin"])[0, 1] > 0.3
    assert np.corrcoef(np.log1p(c["SIM_DENSITY"]), f["density"])[0, 1] > 0.2
    totals = c.to_numpy().sum(1)
    assert 0.1 < totals.std() / totals.mean() < 1.0  # library sizes vary, mildly


def test_spot_counts_are_sums_of_inside_cells(tissue):
    s = tissue.spots
    meta = s.uns["deepspot2cell_spots"]
    assert meta["kind"] == "visium" and meta["source"] == "synthetic"
    assert meta["diameter_px"] == pytest.approx(110.0) and meta["diameter_um"] == 55.0
    assert s.uns["spatial"]["synthetic"]["scalefactors"]["spot_diameter_fullres"] == pytest.approx(110.0)
    rc = s.obs[["array_row", "array_col"]].to_numpy()
    assert ((rc[:, 0] - rc[:, 1]) % 2 == 0).all()  # Visium parity
    xy = s.obsm["spatial"]
    inside = brute_inside(tissue.labels, xy, meta["diameter_px"])
    assert (inside.sum(1) <= 1).all()
    ref = inside.T.astype(np.int64) @ tissue.cell_counts
    np.testing.assert_array_equal(s.X, ref)
    np.testing.assert_array_equal(s.obs["n_cells"].to_numpy(), inside.sum(0))
    assert (inside.sum(0) > 0).all()
    np.testing.assert_array_equal(tissue.assignment.inside, inside.any(1))
    # the dropped hex positions hold no inside cell; the kept ones are exactly those that do
    all_rc, all_xy = _hex_spots(SHAPE, 200.0)
    full = brute_inside(tissue.labels, all_xy, 110.0)
    keep = full.any(0)
    np.testing.assert_allclose(all_xy[keep], xy)
    # hex neighbours from array coordinates, at one pitch
    lay = tissue.spot_layout
    i, k = np.nonzero(lay.neighbours >= 0)
    d = np.hypot(*(lay.xy[i] - lay.xy[lay.neighbours[i, k]]).T)
    assert len(d) and np.allclose(d, 200.0)


def test_truth_formula(tissue):
    truth = tissue.cell_truth
    a = tissue.assignment
    totals = tissue.spots.X.sum(1)
    ctx = a.spot
    assert (ctx >= 0).sum() > 0.8 * len(ctx)
    want = np.full(truth.shape, np.nan)
    has = ctx >= 0
    want[has] = np.log1p(1e4 * tissue.cell_counts[has] / totals[ctx[has], None])
    np.testing.assert_allclose(truth.X, want, rtol=1e-6, equal_nan=True)
    np.testing.assert_array_equal(truth.layers["counts"], tissue.cell_counts)
    assert truth.obs["inside"].any() and (~truth.obs["inside"]).any()
    assert list(truth.obs_names[:3]) == ["1", "2", "3"]
    np.testing.assert_array_equal(truth.obs["spot"][has], np.asarray(tissue.spots.obs_names)[ctx[has]])
    # outside cells take the nearest spot centre within one pitch
    out = ~a.inside & has
    d, j = cKDTree(tissue.spots.obsm["spatial"]).query(tissue.cells_xy[out])
    np.testing.assert_array_equal(ctx[out], j)
    assert (d <= 200.0 + 1e-9).all()


def test_write_files_round_trip(tissue, tmp_path):
    paths = write_files(tissue, tmp_path / "out")
    assert set(paths) == {"slide", "labels", "spots", "truth"}
    with tifffile.TiffFile(paths["slide"]) as tif:
        page = tif.pages[0]
        assert page.is_tiled
        np.testing.assert_array_equal(page.asarray(), tissue.image)
        num, den = page.tags["XResolution"].value
        assert page.tags["ResolutionUnit"].value == tifffile.RESUNIT.CENTIMETER
        assert 1e4 / (num / den) == pytest.approx(tissue.um_per_px, rel=1e-6)
    np.testing.assert_array_equal(tifffile.imread(paths["labels"]), tissue.labels)
    spots = ad.read_h5ad(paths["spots"])
    np.testing.assert_array_equal(spots.X, tissue.spots.X)
    np.testing.assert_allclose(spots.obsm["spatial"], tissue.spots.obsm["spatial"])
    assert spots.uns["deepspot2cell_spots"]["kind"] == "visium"
    truth = ad.read_h5ad(paths["truth"])
    np.testing.assert_array_equal(truth.layers["counts"], tissue.cell_counts)
    assert {"label", "x", "y", "inside", "spot"} <= set(truth.obs.columns)
    assert not any(p.name.startswith(".") for p in (tmp_path / "out").iterdir())  # no temporaries left


def test_simulate_spots_from_cells_by_hand():
    # 0.5 um/px, 20 um patches -> 40 px, 15 um disk -> 30 px (radius 15) centred in each patch
    labels = np.zeros((80, 120), np.int32)
    labels[18:22, 18:22] = 1  # centre of patch (0, 0), centre (19.5, 19.5): inside
    labels[0:4, 40:44] = 2  # corner of patch (0, 1): outside its disk
    labels[56:64, 57:63] = 3  # patch (1, 1) around (59.5, 59.5): inside
    labels[45:49, 80:84] = 4  # patch (1, 2) (centre (99.5, 59.5)), 4x4 at rows 45..48 cols 80..83
    cells = cell_table(labels)
    counts = np.array([[1, 2], [10, 20], [3, 4], [7, 9]])
    genes = ["G1", "G2"]
    adata, grid, asg = simulate_spots_from_cells(labels, cells, counts, genes, um_per_px=0.5, patch_um=20.0, spot_diameter_um=15.0)
    assert grid.kind == "grid" and grid.patch_px == 40.0 and grid.diameter_px == 30.0
    # cell 4 at (81.5, 46.5): (81.5 - 99.5)^2 + (46.5 - 59.5)^2 = 493 > 225 -> outside
    assert asg.inside.tolist() == [True, False, True, False]
    assert [grid.ids[s] for s in asg.spot] == ["r0_c0", "r0_c1", "r1_c1", "r1_c2"]
    assert list(adata.obs_names) == ["r0_c0", "r1_c1"]
    np.testing.assert_array_equal(adata.X, [[1, 2], [3, 4]])
    assert list(adata.var_names) == genes
    np.testing.assert_allclose(adata.obsm["spatial"], [[19.5, 19.5], [59.5, 59.5]])
    meta = adata.uns["deepspot2cell_spots"]
    assert meta["kind"] == "grid" and meta["patch_px"] == 40.0 and meta["diameter_px"] == 30.0
    assert set(adata.obs_names) <= set(grid.ids)
    assert adata.obs[["grid_row", "grid_col"]].to_numpy().tolist() == [[0, 0], [1, 1]]
    with pytest.raises(ValueError):
        simulate_spots_from_cells(labels, cells, counts[:3], genes, um_per_px=0.5)


def test_simulate_spots_defaults_follow_the_reference():
    # at 0.2125 um/px the defaults are the reference's 224 px patches and 160 px disks
    labels = np.zeros((448, 448), np.int32)
    labels[100:124, 100:124] = 1
    labels[330:340, 330:340] = 2
    cells = cell_table(labels)
    adata, grid, asg = simulate_spots_from_cells(labels, cells, np.array([[5], [6]]), ["G"], um_per_px=0.2125)
    assert grid.patch_px == pytest.approx(224.0) and grid.diameter_px == pytest.approx(160.0)
    assert asg.inside.tolist() == [True, True]
    np.testing.assert_array_equal(adata.X.ravel(), [5, 6])


def test_simulated_grid_on_generated_tissue_matches_brute_force(tissue):
    adata, grid, asg = simulate_spots_from_cells(
        tissue.labels, tissue.cells, tissue.cell_counts, tissue.genes, um_per_px=tissue.um_per_px
    )
    inside = brute_inside(tissue.labels, grid.xy, grid.diameter_px)
    own = inside[np.arange(len(asg)), asg.spot]
    np.testing.assert_array_equal(asg.inside, own)
    ref = (inside & (np.arange(len(grid))[None, :] == asg.spot[:, None])).T.astype(np.int64) @ tissue.cell_counts
    kept = np.bincount(asg.spot[own], minlength=len(grid)) > 0  # patches with an inside cell of their own
    assert 0 < kept.sum() < len(grid)
    np.testing.assert_array_equal(adata.X, ref[kept])
    np.testing.assert_array_equal(adata.obs_names, grid.ids[kept])
    np.testing.assert_array_equal(adata.obs["n_cells"].to_numpy(), asg.cells_per_spot[kept])
