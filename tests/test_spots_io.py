"""Spot data readers on the real Space Ranger 1.x output in ../shared/data/."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scanpy as sc
import scipy.sparse as sp

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.io.spots import SPOTS_UNS_KEY, check_spots_on_slide, read_spots

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
VISIUM = DATA / "visium_spaceranger_v1"
pytestmark = pytest.mark.skipif(
    not (VISIUM / "filtered_feature_bc_matrix.h5").is_file(),
    reason=f"real Visium test data not found at {VISIUM} (the project's shared/data folder)",
)

UM_PER_PX = 0.615  # 55 um / ~89.4 px: what this slide's spot diameter implies
COLUMNS = ["barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres"]


def _positions() -> pd.DataFrame:
    return pd.read_csv(VISIUM / "spatial" / "tissue_positions_list.csv", header=None, names=COLUMNS)


def _scalefactors() -> dict:
    return json.loads((VISIUM / "spatial" / "scalefactors_json.json").read_text())


def _matrix() -> ad.AnnData:
    return sc.read_10x_h5(VISIUM / "filtered_feature_bc_matrix.h5")


def _v2_folder(tmp_path: Path, positions: pd.DataFrame | None = None, *, scalefactors=True) -> Path:
    """The real data rewritten in the Space Ranger 2.x layout (tissue_positions.csv, header)."""
    folder = tmp_path / "sr2"
    (folder / "spatial").mkdir(parents=True)
    shutil.copy(VISIUM / "filtered_feature_bc_matrix.h5", folder)
    if scalefactors:
        shutil.copy(VISIUM / "spatial" / "scalefactors_json.json", folder / "spatial")
    (_positions() if positions is None else positions).to_csv(
        folder / "spatial" / "tissue_positions.csv", index=False
    )
    return folder


def _assert_same(a: ad.AnnData, b: ad.AnnData) -> None:
    assert list(a.obs_names) == list(b.obs_names)
    assert list(a.var_names) == list(b.var_names)
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    np.testing.assert_array_equal(_dense(a.X), _dense(b.X))
    for col in ("array_row", "array_col", "in_tissue"):
        np.testing.assert_array_equal(a.obs[col].to_numpy(), b.obs[col].to_numpy())
    assert a.uns[SPOTS_UNS_KEY]["diameter_px"] == pytest.approx(b.uns[SPOTS_UNS_KEY]["diameter_px"])


def _dense(X) -> np.ndarray:
    return X.toarray() if sp.issparse(X) else np.asarray(X)


def _spot_h5ad(n=6, g=4, *, X=None) -> ad.AnnData:
    """A small squidpy-convention spot AnnData written by the tests."""
    rng = np.random.default_rng(0)
    X = rng.poisson(3, size=(n, g)).astype(np.float32) if X is None else X
    adata = ad.AnnData(X=X)
    adata.obs_names = [f"spot{i}" for i in range(n)]
    adata.var_names = [f"gene{j}" for j in range(g)]
    adata.obsm["spatial"] = np.column_stack([np.arange(n) * 100.0 + 50, np.arange(n) * 10.0 + 20])
    adata.uns["spatial"] = {"lib": {"scalefactors": {"spot_diameter_fullres": 90.0}, "images": {}}}
    return adata


# ----------------------------------------------------------------------------- Space Ranger


def test_spaceranger_v1_layout_reads_in_tissue_spots():
    spots = read_spots(VISIUM, um_per_px=UM_PER_PX)
    pos = _positions().set_index("barcode")
    matrix = _matrix()
    expected = [b for b in matrix.obs_names if b in set(pos.index[pos["in_tissue"] == 1])]
    assert list(spots.obs_names) == expected  # matrix order, in-tissue only
    assert spots.n_obs == len(expected) > 0
    assert spots.obs["in_tissue"].dtype == bool and spots.obs["in_tissue"].all()

    # coordinates are the csv's (col, row) = (x, y) in full-resolution px
    sub = pos.loc[spots.obs_names]
    np.testing.assert_array_equal(
        spots.obsm["spatial"], sub[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(float)
    )
    assert spots.obsm["spatial"].dtype == np.float64 and spots.obsm["spatial"].shape == (spots.n_obs, 2)
    for col in ("array_row", "array_col"):
        assert np.issubdtype(spots.obs[col].dtype, np.integer)
        np.testing.assert_array_equal(spots.obs[col].to_numpy(), sub[col].to_numpy())

    info = spots.uns[SPOTS_UNS_KEY]
    assert info["diameter_px"] == pytest.approx(_scalefactors()["spot_diameter_fullres"])
    assert info["diameter_um"] == pytest.approx(info["diameter_px"] * UM_PER_PX)
    assert info["kind"] == "visium" and info["source"] == str(VISIUM)

    # counts: CSR float32, identical to the matrix, gene ids kept, names unique
    assert sp.isspmatrix_csr(spots.X) and spots.X.dtype == np.float32
    np.testing.assert_array_equal(spots.X.toarray(), matrix[expected].X.toarray())
    assert spots.var_names.is_unique
    assert list(spots.var["gene_ids"]) == list(matrix.var["gene_ids"])


def test_h5_path_and_spatial_folder_read_the_same_as_the_folder():
    ref = read_spots(VISIUM, um_per_px=UM_PER_PX)
    _assert_same(read_spots(VISIUM / "filtered_feature_bc_matrix.h5", um_per_px=UM_PER_PX), ref)
    _assert_same(read_spots(VISIUM / "spatial", um_per_px=UM_PER_PX), ref)


def test_spaceranger_v2_layout_reads_identically(tmp_path):
    folder = _v2_folder(tmp_path)
    assert (folder / "spatial" / "tissue_positions.csv").read_text().startswith("barcode,in_tissue,")
    _assert_same(read_spots(folder, um_per_px=UM_PER_PX), read_spots(VISIUM, um_per_px=UM_PER_PX))


def test_spaceranger_parquet_positions_read_identically(tmp_path):
    folder = tmp_path / "sr3"
    (folder / "spatial").mkdir(parents=True)
    shutil.copy(VISIUM / "filtered_feature_bc_matrix.h5", folder)
    shutil.copy(VISIUM / "spatial" / "scalefactors_json.json", folder / "spatial")
    _positions().to_parquet(folder / "spatial" / "tissue_positions.parquet", index=False)
    _assert_same(read_spots(folder, um_per_px=UM_PER_PX), read_spots(VISIUM, um_per_px=UM_PER_PX))


def test_out_of_tissue_and_unpositioned_barcodes_are_dropped(tmp_path):
    pos = _positions()
    barcodes = list(_matrix().obs_names)
    pos.loc[pos["barcode"].isin(barcodes[:7]), "in_tissue"] = 0  # 7 matrix spots now off tissue
    pos = pos[~pos["barcode"].isin(barcodes[7:10])]  # 3 matrix spots without a position
    spots = read_spots(_v2_folder(tmp_path, pos), um_per_px=UM_PER_PX)
    assert list(spots.obs_names) == barcodes[10:]


def test_spot_diameter_flag_overrides_scalefactors():
    spots = read_spots(VISIUM, um_per_px=0.5, spot_diameter_um=55.0)
    assert spots.uns[SPOTS_UNS_KEY]["diameter_um"] == pytest.approx(55.0)
    assert spots.uns[SPOTS_UNS_KEY]["diameter_px"] == pytest.approx(110.0)


def _lowres():
    from PIL import Image

    image = np.asarray(Image.open(VISIUM / "spatial" / "tissue_lowres_image.png").convert("RGB"), float)
    return image.mean(axis=-1), _scalefactors()["tissue_lowres_scalef"]


def _brightness_at(gray, scalef, x, y):
    rows = np.clip(np.round(y * scalef).astype(int), 0, gray.shape[0] - 1)
    cols = np.clip(np.round(x * scalef).astype(int), 0, gray.shape[1] - 1)
    return gray[rows, cols]


def test_spot_centres_lie_on_tissue_in_the_scaled_image():
    """Full-res (x, y) mapped with the image's scale factor land on H&E tissue.

    This data's tissue_hires_image.png is a blank placeholder (all black), so the
    lowres image and tissue_lowres_scalef are used; the mapping is the same.
    """
    from PIL import Image

    hires = np.asarray(Image.open(VISIUM / "spatial" / "tissue_hires_image.png").convert("RGB"))
    assert hires.max() == 0, "hires image now has content: use it with tissue_hires_scalef here"
    gray, scalef = _lowres()
    background = np.median(gray[:40, :40])  # the corner holds glass only
    spots = read_spots(VISIUM, um_per_px=UM_PER_PX)
    x, y = spots.obsm["spatial"].T
    values = _brightness_at(gray, scalef, x, y)
    assert np.mean(values < background - 8) > 0.7
    assert np.median(values) < background - 15


def test_xy_order_separates_tissue_from_glass_spots(tmp_path):
    """All 4992 positions through the h5ad path: in_tissue spots dark, the others light.

    Read the other way round (x = row) the off-tissue spots land on tissue far
    more often, so this test fails if x and y are swapped anywhere.
    """
    pos = _positions()
    adata = ad.AnnData(X=sp.csr_matrix((len(pos), 3), dtype=np.float32))
    adata.obs_names = pos["barcode"].to_numpy()
    for col in COLUMNS[1:]:
        adata.obs[col] = pos[col].to_numpy()
    path = tmp_path / "all_spots.h5ad"
    adata.write_h5ad(path)
    path.with_suffix(".json").write_text(json.dumps({"spot_diameter": 55.0, "inter_spot_dist": 100.0}))
    spots = read_spots(path, um_per_px=UM_PER_PX)
    assert spots.obs["in_tissue"].dtype == bool

    gray, scalef = _lowres()
    background = np.median(gray[:40, :40])
    on = spots.obs["in_tissue"].to_numpy()
    x, y = spots.obsm["spatial"].T
    dark = _brightness_at(gray, scalef, x, y) < background - 8
    dark_swapped = _brightness_at(gray, scalef, y, x) < background - 8
    assert dark[on].mean() > 0.7
    assert dark[~on].mean() < 0.1
    assert dark_swapped[~on].mean() > 0.3  # the check can tell the two orders apart


# ----------------------------------------------------------------------------- h5ad inputs


def test_squidpy_h5ad_matches_the_spaceranger_folder(tmp_path):
    ref = read_spots(VISIUM, um_per_px=UM_PER_PX)
    adata = _matrix()[list(ref.obs_names)].copy()
    pos = _positions().set_index("barcode").loc[adata.obs_names]
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy()
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy()
    adata.obs["array_row"] = pos["array_row"].to_numpy()
    adata.obs["array_col"] = pos["array_col"].to_numpy()
    adata.uns["spatial"] = {"V1_test": {"scalefactors": _scalefactors(), "images": {}}}
    path = tmp_path / "squidpy.h5ad"
    adata.write_h5ad(path)
    spots = read_spots(path, um_per_px=UM_PER_PX)
    _assert_same(spots, ref)
    assert sp.isspmatrix_csr(spots.X) and spots.X.dtype == np.float32
    assert list(spots.var["gene_ids"]) == list(ref.var["gene_ids"])
    assert spots.uns[SPOTS_UNS_KEY]["source"] == str(path)


def test_hest_h5ad_with_pxl_columns_and_metadata_json(tmp_path):
    ref = read_spots(VISIUM, um_per_px=UM_PER_PX)
    adata = _matrix()[list(ref.obs_names)].copy()
    pos = _positions().set_index("barcode").loc[adata.obs_names]
    for col in COLUMNS[1:]:
        adata.obs[col] = pos[col].to_numpy()
    adata.X = adata.X.toarray()  # dense counts are kept dense
    path = tmp_path / "TENX99.h5ad"
    adata.write_h5ad(path)
    (tmp_path / "TENX99.json").write_text(
        json.dumps({"spot_diameter": 55.0, "inter_spot_dist": 100.0, "pixel_size_um_estimated": UM_PER_PX})
    )
    spots = read_spots(path, um_per_px=UM_PER_PX)
    np.testing.assert_array_equal(spots.obsm["spatial"], ref.obsm["spatial"])
    assert isinstance(spots.X, np.ndarray) and spots.X.dtype == np.float32
    np.testing.assert_array_equal(spots.X, ref.X.toarray())
    assert spots.uns[SPOTS_UNS_KEY]["diameter_um"] == pytest.approx(55.0)
    assert spots.uns[SPOTS_UNS_KEY]["diameter_px"] == pytest.approx(55.0 / UM_PER_PX)
    # the flag still wins over the JSON
    spots = read_spots(path, um_per_px=UM_PER_PX, spot_diameter_um=65.0)
    assert spots.uns[SPOTS_UNS_KEY]["diameter_um"] == pytest.approx(65.0)


def test_h5ad_names_made_unique_and_float_integer_counts_accepted(tmp_path):
    adata = _spot_h5ad(g=3, X=np.array([[1.0, 2.0, 0.0]] * 6, dtype=np.float64))
    adata.var_names = ["ACTB", "ACTB", "GAPDH"]
    adata.var["gene_ids"] = ["E1", "E2", "E3"]
    path = tmp_path / "dup_genes.h5ad"
    adata.write_h5ad(path)
    spots = read_spots(path, um_per_px=0.5)
    assert list(spots.var_names) == ["ACTB", "ACTB-1", "GAPDH"]
    assert list(spots.var["gene_ids"]) == ["E1", "E2", "E3"]
    assert spots.X.dtype == np.float32
    assert "in_tissue" not in spots.obs  # unknown stays unknown
    assert spots.uns[SPOTS_UNS_KEY]["diameter_px"] == pytest.approx(90.0)
    assert spots.uns[SPOTS_UNS_KEY]["diameter_um"] == pytest.approx(45.0)


def test_raw_counts_layer_used_when_x_is_normalised(tmp_path):
    adata = _spot_h5ad()
    adata.layers["counts"] = adata.X.copy()
    adata.X = np.log1p(adata.X / adata.X.sum(1, keepdims=True) * 1e4)
    path = tmp_path / "normalised_with_counts.h5ad"
    adata.write_h5ad(path)
    spots = read_spots(path, um_per_px=0.5)
    np.testing.assert_array_equal(spots.X, adata.layers["counts"])


def test_several_libraries_need_a_choice(tmp_path):
    adata = _spot_h5ad(n=6)
    adata.uns["spatial"] = {
        "libA": {"scalefactors": {"spot_diameter_fullres": 80.0}},
        "libB": {"scalefactors": {"spot_diameter_fullres": 120.0}},
    }
    adata.obs["library_id"] = ["libA"] * 4 + ["libB"] * 2
    path = tmp_path / "two_libs.h5ad"
    adata.write_h5ad(path)
    with pytest.raises(InputError, match="libA, libB") as err:
        read_spots(path, um_per_px=0.5)
    assert err.value.source == str(path)
    spots = read_spots(path, um_per_px=0.5, library_id="libB")
    assert spots.uns[SPOTS_UNS_KEY]["diameter_px"] == pytest.approx(120.0)
    assert list(spots.obs_names) == ["spot4", "spot5"]
    with pytest.raises(InputError, match="libC"):
        read_spots(path, um_per_px=0.5, library_id="libC")


# ----------------------------------------------------------------------------- errors


def _raises(path, match, **kwargs):
    with pytest.raises(InputError, match=match) as err:
        read_spots(path, **{"um_per_px": 0.5, **kwargs})
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    return err.value


def test_missing_files_in_a_spaceranger_folder_are_named(tmp_path):
    folder = _v2_folder(tmp_path)
    (folder / "spatial" / "tissue_positions.csv").unlink()
    _raises(folder, "tissue_positions")

    folder = _v2_folder(tmp_path / "b")
    (folder / "filtered_feature_bc_matrix.h5").unlink()
    _raises(folder, "filtered_feature_bc_matrix.h5")

    folder = _v2_folder(tmp_path / "c", scalefactors=False)
    _raises(folder, r"scalefactors_json\.json.*--spot-diameter-um")
    spots = read_spots(folder, um_per_px=0.5, spot_diameter_um=55.0)
    assert spots.uns[SPOTS_UNS_KEY]["diameter_px"] == pytest.approx(110.0)


def test_bad_positions_files(tmp_path):
    pos = _positions()
    pos["pxl_row_in_fullres"] = pos["pxl_row_in_fullres"].astype(float)
    pos.loc[5, "pxl_row_in_fullres"] = np.nan
    folder = _v2_folder(tmp_path / "nan", pos)
    _raises(folder, "non-finite")

    pos = _positions()
    pos = pd.concat([pos, pos.iloc[[3]]])
    folder = _v2_folder(tmp_path / "dup", pos)
    err = _raises(folder, "duplicate barcodes")
    assert err.source.endswith("tissue_positions.csv")

    folder = _v2_folder(tmp_path / "cols", _positions().iloc[:, :4])
    _raises(folder, "expected 6 columns")

    pos = _positions()
    pos["in_tissue"] = 0
    folder = _v2_folder(tmp_path / "none", pos)
    _raises(folder, "zero spots")


def test_h5ad_errors(tmp_path):
    adata = _spot_h5ad()
    del adata.obsm["spatial"]
    path = tmp_path / "nocoords.h5ad"
    adata.write_h5ad(path)
    _raises(path, "no spot coordinates")

    adata = _spot_h5ad()
    adata.obsm["spatial"][2, 0] = np.inf
    path = tmp_path / "inf.h5ad"
    adata.write_h5ad(path)
    _raises(path, r"non-finite spot coordinates .*spot2")

    adata = _spot_h5ad()
    adata.obs_names = ["a", "b", "c", "a", "d", "e"]
    path = tmp_path / "dup.h5ad"
    adata.write_h5ad(path)
    _raises(path, "duplicate barcodes.*'a'")

    adata = _spot_h5ad()
    adata.X[1, 1] = -2
    path = tmp_path / "neg.h5ad"
    adata.write_h5ad(path)
    _raises(path, "negative")

    adata = _spot_h5ad()
    adata.X = sp.csr_matrix(np.log1p(adata.X / adata.X.sum(1, keepdims=True) * 1e4))
    path = tmp_path / "lognorm.h5ad"
    adata.write_h5ad(path)
    _raises(path, "raw counts are needed")

    adata = _spot_h5ad()
    adata.X[0, 0] = np.nan
    path = tmp_path / "nan_counts.h5ad"
    adata.write_h5ad(path)
    _raises(path, "NaN")

    adata = _spot_h5ad()
    del adata.uns["spatial"]
    path = tmp_path / "nodiam.h5ad"
    adata.write_h5ad(path)
    _raises(path, "--spot-diameter-um")

    path = tmp_path / "zero_spots.h5ad"
    _spot_h5ad()[:0].copy().write_h5ad(path)
    _raises(path, "zero spots")

    path = tmp_path / "zero_genes.h5ad"
    _spot_h5ad()[:, :0].copy().write_h5ad(path)
    _raises(path, "zero genes")

    path = tmp_path / "corrupt.h5ad"
    path.write_bytes(b"not hdf5 at all")
    _raises(path, "not a readable AnnData")


def test_path_and_flag_errors(tmp_path):
    _raises(tmp_path / "missing.h5ad", "no such file")
    other = tmp_path / "spots.csv"
    other.write_text("a,b\n")
    _raises(other, "not a spots input")
    _raises(VISIUM, "pixel size", um_per_px=0.0)
    _raises(VISIUM, "spot diameter", spot_diameter_um=-5)
    bad = tmp_path / "bad" / "filtered_feature_bc_matrix.h5"
    bad.parent.mkdir()
    bad.write_bytes(b"junk")
    shutil.copytree(VISIUM / "spatial", bad.parent / "spatial")
    _raises(bad, "not a readable 10x HDF5")


# ----------------------------------------------------------------------------- on the slide


def test_check_spots_on_slide():
    spots = read_spots(VISIUM, um_per_px=UM_PER_PX)
    xy = spots.obsm["spatial"]
    full_shape = (int(xy[:, 1].max()) + 100, int(xy[:, 0].max()) + 100, 3)
    check_spots_on_slide(spots, full_shape)  # on the full-resolution slide: fine

    # the same coordinates against the 2000 x 2000 hires image: almost all outside
    with pytest.raises(InputError) as err:
        check_spots_on_slide(spots, (2000, 2000))
    message = str(err.value)
    outside = np.mean((xy[:, 0] >= 2000) | (xy[:, 1] >= 2000))
    assert outside > 0.5
    assert f"{outside:.0%}" in message
    assert f"x {xy[:, 0].min():.0f}..{xy[:, 0].max():.0f}" in message
    assert "2000 x 2000" in message and "pixel size" in message
    assert err.value.source == str(VISIUM)

    # the rule is "more than half": 4 of 10 outside passes, 6 of 10 fails
    few = ad.AnnData(X=np.ones((10, 1), np.float32))
    for n_out, ok in ((4, True), (5, True), (6, False)):
        few.obsm["spatial"] = np.array([[50.0, 50.0]] * (10 - n_out) + [[50.0, 500.0]] * n_out)
        if ok:
            check_spots_on_slide(few, (100, 100))
        else:
            with pytest.raises(InputError, match="60% of 10 spot centres"):
                check_spots_on_slide(few, (100, 100))
