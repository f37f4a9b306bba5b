"""npe2 readers and writers: CELLS.h5ad round trip, CSV, the cells-as-points fallback, slides."""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from napari_deepspot2cell import readers, writers

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
GENES = ["CD3E", "EPCAM", "KRT19", "PTPRC"]


def _mask(rows=3, cols=4, side=30, gap=8):
    labels = np.zeros((rows * (side + gap) + gap, cols * (side + gap) + gap), np.int32)
    k = 0
    for i in range(rows):
        for j in range(cols):
            k += 1
            y0, x0 = gap + i * (side + gap), gap + j * (side + gap)
            labels[y0 : y0 + side, x0 : x0 + side] = 10 + k
    return labels


def _cells_h5ad(tmp_path: Path, *, labels_present=True, um=0.5) -> tuple[Path, np.ndarray, ad.AnnData]:
    """A predictions file as DESIGN.md's output contract describes it, plus its label .npy."""
    labels = _mask()
    ids = np.unique(labels[labels > 0])
    ys, xs = [], []
    for i in ids:
        r, c = np.nonzero(labels == i)
        ys.append(r.mean())
        xs.append(c.mean())
    rng = np.random.default_rng(4)
    n = ids.size
    obs = pd.DataFrame(
        {
            "label": ids.astype(np.int64),
            "x": np.asarray(xs),
            "y": np.asarray(ys),
            "area": np.bincount(labels.ravel())[ids].astype(np.int64),
            "spot": pd.Categorical([f"p{i % 3}" for i in range(n)]),
            "inside_spot": np.arange(n) % 2 == 0,
        },
        index=ids.astype(str),
    )
    X = (rng.random((n, len(GENES))) * 3).astype(np.float32)
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=GENES))
    adata.obsm["spatial"] = obs[["x", "y"]].to_numpy(np.float64)
    adata.layers["uncertainty"] = (rng.random((n, len(GENES))) * 0.2).astype(np.float32)
    mask_path = tmp_path / "mask.npy"
    if labels_present:
        np.save(mask_path, labels)
    adata.uns["deepspot2cell"] = {
        "software_version": "0.1.0",
        "encoder": {"id": "test", "dim": 8},
        "um_per_px": um,
        "image_path": str(tmp_path / "no_such_slide.tif"),
        "labels_path": str(mask_path),
    }
    path = tmp_path / "CELLS.h5ad"
    adata.write_h5ad(path)
    return path, labels, adata


def _by_type(layer_data):
    return {t: (d, m) for d, m, t in layer_data}


# ---------------------------------------------------------------- reader claims


def test_prediction_reader_claims_only_this_plugins_h5ad(tmp_path):
    ours, _, _ = _cells_h5ad(tmp_path)
    assert readers.get_prediction_reader(str(ours)) is readers.read_predictions
    other = tmp_path / "other.h5ad"
    ad.AnnData(X=np.ones((2, 2), np.float32)).write_h5ad(other)
    assert readers.get_prediction_reader(str(other)) is None
    broken = tmp_path / "broken.h5ad"
    broken.write_bytes(b"not hdf5 at all")
    assert readers.get_prediction_reader(str(broken)) is None
    assert readers.get_prediction_reader(str(tmp_path / "mask.npy")) is None


def test_claim_check_does_not_read_x(tmp_path, monkeypatch):
    path, _, _ = _cells_h5ad(tmp_path)

    def boom(*a, **k):
        raise AssertionError("the claim check must not load the AnnData")

    monkeypatch.setattr(ad, "read_h5ad", boom)
    assert readers.get_prediction_reader(str(path)) is not None


# ---------------------------------------------------------------- reading predictions


def test_reader_gives_the_painted_layers_back(tmp_path):
    path, labels, adata = _cells_h5ad(tmp_path)
    with pytest.warns(UserWarning, match="slide"):
        layers = readers.read_predictions(str(path))
    kinds = _by_type(layers)
    assert set(kinds) == {"image", "labels"}
    img, img_meta = kinds["image"]
    lab, lab_meta = kinds["labels"]
    lab0 = np.asarray(lab[0] if isinstance(lab, list) else lab)
    np.testing.assert_array_equal(lab0, labels)
    painted = np.asarray(img[0] if isinstance(img, list) else img)
    for i, label in enumerate(adata.obs["label"]):
        np.testing.assert_allclose(np.unique(painted[labels == label]), adata.X[i, 0])
    assert np.isnan(painted[labels == 0]).all()
    assert img_meta["scale"] == (0.5, 0.5) == lab_meta["scale"]
    assert img_meta["name"].startswith("DeepSpot2Cell: CD3E")
    assert img_meta["colormap"] == "magma"
    attached = lab_meta["metadata"]["deepspot2cell"]["adata"]
    np.testing.assert_array_equal(attached.X, adata.X)
    assert list(lab_meta["features"].columns) == ["index", "CD3E"]
    assert "adata" not in img_meta["metadata"]["deepspot2cell"]  # a key, not a second reference


def test_relative_labels_path_resolves_beside_the_h5ad(tmp_path):
    path, labels, adata = _cells_h5ad(tmp_path)
    a = ad.read_h5ad(path)
    a.uns["deepspot2cell"]["labels_path"] = "mask.npy"
    a.uns["deepspot2cell"]["image_path"] = ""
    a.write_h5ad(path)
    cwd = os.getcwd()
    os.chdir("/")
    try:
        layers = readers.read_predictions(str(path))
    finally:
        os.chdir(cwd)
    assert "labels" in _by_type(layers)


def test_missing_mask_falls_back_to_points_with_a_warning(tmp_path):
    path, _, adata = _cells_h5ad(tmp_path, labels_present=False)
    with pytest.warns(UserWarning, match="points"):
        layers = readers.read_predictions(str(path))
    (data, meta, kind), = [t for t in layers if t[2] != "image"]
    assert kind == "points"
    np.testing.assert_allclose(data, adata.obsm["spatial"][:, ::-1])
    assert meta["face_color"] == "CD3E"
    np.testing.assert_allclose(meta["features"]["CD3E"], adata.X[:, 0])
    assert meta["metadata"]["deepspot2cell"]["adata"].n_obs == adata.n_obs


# ---------------------------------------------------------------- writers


def test_h5ad_round_trip_through_a_viewer(make_napari_viewer, tmp_path):
    from napari.layers import Layer

    path, labels, adata = _cells_h5ad(tmp_path)
    viewer = make_napari_viewer()
    with pytest.warns(UserWarning):
        layer_data = readers.read_predictions(str(path))
    for t in layer_data:
        viewer.add_layer(Layer.create(*t))
    image, cells = viewer.layers
    assert cells.contour >= 1 and image.colorbar.visible  # decorated once napari added them
    saved = [layer.as_layer_data_tuple() for layer in viewer.layers]  # what npe2 hands a writer
    out = tmp_path / "again" / "CELLS_copy.h5ad"
    assert writers.write_predictions_h5ad(str(out), saved) == [str(out)]
    back = ad.read_h5ad(out)
    np.testing.assert_array_equal(back.X, adata.X)
    np.testing.assert_array_equal(back.layers["uncertainty"], adata.layers["uncertainty"])
    pd.testing.assert_frame_equal(back.obs, adata.obs)
    np.testing.assert_array_equal(back.obsm["spatial"], adata.obsm["spatial"])
    assert back.uns["deepspot2cell"]["labels_path"] == str(tmp_path / "mask.npy")
    assert not [p for p in out.parent.iterdir() if p.name != out.name]  # no temporary left over

    with pytest.warns(UserWarning):
        again = readers.read_predictions(str(out))
    first, second = _by_type(layer_data), _by_type(again)
    assert set(first) == set(second)
    for kind in first:
        a, b = first[kind][0], second[kind][0]
        a = a[0] if isinstance(a, list) else a
        b = b[0] if isinstance(b, list) else b
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_csv_has_label_xy_and_one_column_per_gene(tmp_path):
    path, _, adata = _cells_h5ad(tmp_path)
    layer_data = [(None, {"metadata": {"deepspot2cell": {"adata": adata}}}, "labels")]
    out = tmp_path / "cells.csv"
    assert writers.write_predictions_csv(str(out), layer_data) == [str(out)]
    table = pd.read_csv(out)
    assert list(table.columns) == ["label", "x", "y", *GENES]
    np.testing.assert_array_equal(table["label"], adata.obs["label"])
    np.testing.assert_allclose(table[["x", "y"]], adata.obsm["spatial"], rtol=1e-5)
    np.testing.assert_allclose(table[GENES], adata.X, rtol=1e-5)


def test_writers_are_atomic_and_need_the_predictions(tmp_path, monkeypatch):
    _, _, adata = _cells_h5ad(tmp_path)
    target = tmp_path / "keep.h5ad"
    target.write_bytes(b"earlier file")
    layer_data = [(None, {"metadata": {"deepspot2cell": {"adata": adata}}}, "labels")]

    def fail(self, filename, **kwargs):
        Path(filename).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", fail)
    with pytest.raises(OSError):
        writers.write_predictions_h5ad(str(target), layer_data)
    assert target.read_bytes() == b"earlier file"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".keep")) == []
    with pytest.raises(ValueError, match="DeepSpot2Cell cells"):
        writers.write_predictions_csv(str(tmp_path / "x.csv"), [(np.zeros((2, 2)), {"metadata": {}}, "image")])
    assert not (tmp_path / "x.csv").exists()


# ---------------------------------------------------------------- slides


def test_slide_reader_leaves_label_tiffs_to_others(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    mask = tmp_path / "mask.tif"
    tifffile.imwrite(mask, _mask().astype(np.uint16))
    assert readers.get_slide_reader(str(mask)) is None
    assert readers.get_slide_reader(str(tmp_path / "cells.h5ad")) is None


def test_slide_reader_small_rgb_tiff(tmp_path):
    tifffile = pytest.importorskip("tifffile")
    rgb = (np.random.default_rng(0).random((64, 80, 3)) * 255).astype(np.uint8)
    path = tmp_path / "he.tif"
    tifffile.imwrite(path, rgb, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25), resolutionunit="CENTIMETER")
    reader = readers.get_slide_reader(str(path))
    assert reader is readers.read_slide
    (data, meta, kind), = reader(str(path))
    assert kind == "image" and meta["rgb"] is True and meta["contrast_limits"] == (0, 255)
    assert meta["scale"] == pytest.approx((0.25, 0.25))
    np.testing.assert_array_equal(np.asarray(data if not meta["multiscale"] else data[0]), rgb)
    assert meta["metadata"]["deepspot2cell"]["path"] == str(path)


def test_slide_reader_real_svs():
    svs = DATA / "cmu1_small_region" / "cmu_small_region.svs"
    if not svs.is_file():
        pytest.skip(f"real data not found at {svs}")
    reader = readers.get_slide_reader(str(svs))
    assert reader is not None
    (data, meta, kind), = reader(str(svs))
    assert kind == "image" and meta["multiscale"] and meta["rgb"]
    assert [tuple(lv.shape) for lv in data][:2] == [(2967, 2220, 3), (768, 574, 3)] or data[0].shape[:2] == (2967, 2220)
    assert meta["scale"] == pytest.approx((0.499, 0.499))
    tile = np.asarray(data[0][1000:1064, 1000:1064])
    assert tile.dtype == np.uint8 and tile.std() > 0


def test_reader_brings_the_slide_back_under_the_paint(tmp_path):
    svs = DATA / "cmu1_small_region" / "cmu_small_region.svs"
    if not svs.is_file():
        pytest.skip(f"real data not found at {svs}")
    labels = np.zeros((2967, 2220), np.int32)
    labels[100:140, 200:260] = 5
    labels[1500:1530, 1000:1040] = 9
    obs = pd.DataFrame({"label": [5, 9], "x": [229.5, 1019.5], "y": [119.5, 1514.5]}, index=["5", "9"])
    adata = ad.AnnData(X=np.float32([[1, 2], [3, 4]]), obs=obs, var=pd.DataFrame(index=["A", "B"]))
    adata.obsm["spatial"] = obs[["x", "y"]].to_numpy()
    np.save(tmp_path / "m.npy", labels)
    adata.uns["deepspot2cell"] = {"um_per_px": 0.499, "image_path": str(svs), "labels_path": str(tmp_path / "m.npy")}
    adata.write_h5ad(tmp_path / "c.h5ad")
    layers = readers.read_predictions(str(tmp_path / "c.h5ad"))
    assert [t[2] for t in layers] == ["image", "image", "labels"]
    slide_meta, paint_data, cells = layers[0][1], layers[1][0], layers[2][0]
    assert slide_meta["rgb"] and slide_meta["metadata"]["deepspot2cell"]["kind"] == "slide"
    assert all(t[1]["scale"] == pytest.approx((0.499, 0.499)) for t in layers)
    np.testing.assert_array_equal(np.asarray(cells[0]), labels)
    assert np.asarray(paint_data[0][1510, 1020]) == pytest.approx(3.0)
