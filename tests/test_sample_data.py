"""The shipped sample data: they open with the project's own readers, the mask and the
spots regenerate exactly from their script, and the spot counts are the sums of the
per-cell truth of the cells inside each spot."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from napari_deepspot2cell.sample import FILES, sample_folder, sample_paths

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "make_sample_data.py"
UM_PER_PX = 0.499


@pytest.fixture(scope="module")
def paths():
    return sample_paths()


def _dense(x):
    return np.asarray(x.toarray() if hasattr(x, "toarray") else x)


def test_every_file_ships_with_its_licence_and_readme():
    folder = sample_folder()
    for name in FILES.values():
        assert (folder / name).is_file(), name
    licences = (folder / "LICENSES.md").read_text()
    readme = (folder / "README.md").read_text()
    for name in FILES.values():
        assert name in licences and name in readme
    assert "CC0" in licences
    assert "SIMULATED" in readme
    total = sum((folder / n).stat().st_size for n in FILES.values())
    assert total < 8e6, f"sample data are {total / 1e6:.1f} MB"


def test_slide_and_mask_open_with_the_readers(paths):
    from napari_deepspot2cell.geometry.cells import cell_table
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.slides import open_slide

    slide = open_slide(paths["slide"])
    assert abs(slide.um_per_px - UM_PER_PX) < 1e-9
    assert slide.shape == (2967, 2220)
    mask = open_cells(paths["labels"], slide.shape, slide.um_per_px)
    assert tuple(mask.labels.shape) == slide.shape
    assert np.issubdtype(mask.labels.dtype, np.unsignedinteger)
    cells = cell_table(mask.labels)
    assert len(cells) > 1000
    assert list(cells["label"]) == list(range(1, len(cells) + 1))  # labels 1..N, none lost
    # real cells of a 20x slide: median area of a 6-16 um wide cell body
    median_um2 = float(np.median(cells["area"])) * UM_PER_PX**2
    assert 30 < median_um2 < 200
    # cells lie on tissue: at most centroids the slide is darker than glass
    rgb = slide.read_region(0, 0, *slide.shape)
    ys, xs = np.rint(cells["y"]).astype(int), np.rint(cells["x"]).astype(int)
    assert (rgb[ys, xs].mean(1) < 215).mean() > 0.9
    mask.close()
    slide.close()


def test_spots_read_with_read_spots(paths):
    from napari_deepspot2cell.geometry.assign import spot_pitch
    from napari_deepspot2cell.geometry.spots import spots_from_anndata
    from napari_deepspot2cell.io.spots import check_spots_on_slide, read_spots

    spots = read_spots(paths["spots"], um_per_px=UM_PER_PX)
    meta = spots.uns["deepspot2cell_spots"]
    assert abs(meta["diameter_um"] - 55.0) < 1e-6
    check_spots_on_slide(spots, (2967, 2220))
    layout = spots_from_anndata(spots)
    assert abs(spot_pitch(layout) * UM_PER_PX - 100.0) < 0.5  # Visium pitch
    # hexagonal array coordinates: (row + col) even; most spots have several of their 6 neighbours
    rc = spots.obs[["array_row", "array_col"]].to_numpy()
    assert np.all((rc.sum(1) % 2) == 0)
    assert np.median((layout.neighbours >= 0).sum(1)) >= 3
    assert spots.n_obs >= 40 and spots.n_vars >= 12
    assert "SIM_NOISE" in spots.var_names
    assert all(g.startswith("SIM_") for g in spots.var_names)
    assert np.all(np.asarray(spots.X.sum(1)).ravel() > 0)


def test_checkpoint_loads_and_matches_the_spots(paths):
    from napari_deepspot2cell.io.spots import read_spots
    from napari_deepspot2cell.model.checkpoint import load_checkpoint

    ckpt = load_checkpoint(paths["checkpoint"])
    spots = read_spots(paths["spots"], um_per_px=UM_PER_PX)
    assert ckpt.genes == [str(g) for g in spots.var_names]
    assert ckpt.encoder["id"] == "offline-he-v1"
    assert ckpt.aggregate == "counts"
    assert paths["checkpoint"].stat().st_size < 3e6
    assert ckpt.geometry["spot_kind"] == "visium"
    assert abs(ckpt.geometry["um_per_px"] - UM_PER_PX) < 1e-9


def test_spot_counts_are_sums_of_their_inside_cells(paths):
    import anndata as ad

    from napari_deepspot2cell.geometry.assign import assign_cells
    from napari_deepspot2cell.geometry.cells import cell_table
    from napari_deepspot2cell.geometry.spots import spots_from_anndata
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.spots import read_spots

    spots = read_spots(paths["spots"], um_per_px=UM_PER_PX)
    truth = ad.read_h5ad(paths["cell_truth"])
    assert list(truth.var_names) == list(spots.var_names)
    counts = _dense(truth.X)
    assert np.all(counts == np.round(counts)) and counts.min() >= 0
    inside = truth.obs["inside"].to_numpy(bool)
    assert 0 < inside.sum() < len(inside)
    sums = {s: np.zeros(truth.n_vars) for s in spots.obs_names}
    for s, row in zip(truth.obs["spot"][inside], counts[inside]):
        sums[s] += row
    np.testing.assert_array_equal(np.stack([sums[s] for s in spots.obs_names]), _dense(spots.X))

    # the inside flags are the project's own 60 % rule on the shipped mask and spots
    mask = open_cells(paths["labels"], (2967, 2220), UM_PER_PX)
    cells = cell_table(mask.labels)
    a = assign_cells(mask.labels, cells, spots_from_anndata(spots))
    pos = cells.index.get_indexer(truth.obs["label"].to_numpy())
    assert (pos >= 0).all()
    np.testing.assert_array_equal(a.inside[pos], inside)
    ids = np.asarray(spots.obs_names)
    np.testing.assert_array_equal(ids[a.spot[pos][inside]], truth.obs["spot"].to_numpy()[inside])
    mask.close()


def test_the_simulation_follows_the_measured_morphology(paths):
    """Each single-feature program's rates rise with its measured feature; the noise gene's do not."""
    import anndata as ad

    truth = ad.read_h5ad(paths["cell_truth"])
    rates = np.log(truth.layers["rates"])
    genes = list(truth.var_names)
    for gene, feature in (("SIM_NUCLEAR_SIZE_PROGRAM", "nuclear_size"), ("SIM_EOSIN_PROGRAM", "cytoplasm_e"),
                          ("SIM_DENSITY_PROGRAM", "density"), ("SIM_ELONGATION_PROGRAM", "elongation")):
        r = np.corrcoef(rates[:, genes.index(gene)], truth.obs[f"measured_{feature}"])[0, 1]
        assert r > 0.6, (gene, r)
    for feature in ("nuclear_size", "cytoplasm_e", "density"):
        r = np.corrcoef(rates[:, genes.index("SIM_NOISE")], truth.obs[f"measured_{feature}"])[0, 1]
        assert abs(r) < 0.15


@pytest.mark.skipif(not SCRIPT.is_file(), reason="scripts/make_sample_data.py is not in this checkout")
def test_mask_and_spots_regenerate_identically(paths, tmp_path):
    import anndata as ad
    import tifffile

    spec = importlib.util.spec_from_file_location("make_sample_data", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.make(tmp_path, paths["slide"], copy_slide=False, log=lambda *a: None)
    out = result["paths"]

    np.testing.assert_array_equal(tifffile.imread(out["mask"]), tifffile.imread(paths["labels"]))
    for key in ("spots", "cell_truth"):
        new, old = ad.read_h5ad(out[key]), ad.read_h5ad(paths[key])
        assert list(new.obs_names) == list(old.obs_names) and list(new.var_names) == list(old.var_names)
        np.testing.assert_array_equal(_dense(new.X), _dense(old.X))
        np.testing.assert_array_equal(new.obsm["spatial"], old.obsm["spatial"])
        for col in old.obs.columns:
            np.testing.assert_array_equal(new.obs[col].to_numpy(), old.obs[col].to_numpy())
