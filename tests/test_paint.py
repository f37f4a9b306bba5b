"""paint: lookup tables over a label pyramid, lazily; the painted layers in a real viewer."""

from __future__ import annotations

import time

import anndata as ad
import dask.array as da
import numpy as np
import pandas as pd
import pytest
from helpers_gui import grid_cells

from napari_deepspot2cell import paint as P


def _random_labels(shape, n_cells, seed=0, background=0.3):
    rng = np.random.default_rng(seed)
    labels = rng.integers(1, n_cells + 1, size=shape).astype(np.int32)
    labels[rng.random(shape) < background] = 0
    return labels


def _reference(labels, ids, values):
    """Pixel-by-pixel truth through a dict: NaN for background and unknown ids."""
    table = dict(zip(ids.tolist(), values.astype(np.float32).tolist()))
    flat = [table.get(int(v), np.nan) if v != 0 else np.nan for v in labels.ravel()]
    return np.asarray(flat, dtype=np.float32).reshape(labels.shape)


# ---------------------------------------------------------------- lookup tables


def test_lookup_table_dense_nan_background_and_unknown():
    lut = P.lookup_table(np.array([1, 3, 7]), np.array([0.5, 1.5, 2.5]))
    assert lut.dtype == np.float32 and lut.shape == (8,)
    assert np.isnan(lut[0]) and np.isnan(lut[2]) and np.isnan(lut[6])
    np.testing.assert_array_equal(lut[[1, 3, 7]], np.float32([0.5, 1.5, 2.5]))


def test_lookup_table_background_id_is_never_painted_and_last_duplicate_wins():
    lut = P.lookup_table(np.array([0, 2, 2]), np.array([9.0, 1.0, 4.0]))
    assert np.isnan(lut[0])
    assert lut[2] == 4.0


def test_lookup_table_rejects_bad_input():
    with pytest.raises(ValueError):
        P.lookup_table(np.array([1, 2]), np.array([1.0]))
    with pytest.raises(ValueError):
        P.lookup_table(np.array([1.5, 2]), np.array([1.0, 2.0]))
    with pytest.raises(ValueError):
        P.lookup_table(np.array([-1, 2]), np.array([1.0, 2.0]))


def test_huge_label_ids_use_sorted_search_and_paint_the_same():
    ids = np.array([5, 2**27 + 11, 2**30, 17], dtype=np.int64)
    values = np.array([1.0, 2.0, 3.0, 4.0], dtype=np.float32)
    lut = P.lookup_table(ids, values)
    assert isinstance(lut, P.SortedLookup)
    assert lut.nbytes < 1024  # O(cells), not 2**30 floats
    labels = np.array([[0, 5, 2**30, 9], [17, 2**27 + 11, 2**27 + 12, 0]], dtype=np.int64)
    painted = P.paint([da.from_array(labels, chunks=(1, 2))], lut)[0].compute()
    np.testing.assert_array_equal(painted, _reference(labels, ids, values))


# ---------------------------------------------------------------- pyramid and paint


def test_label_pyramid_is_strided_and_stops_near_1024():
    labels = _random_labels((3000, 2100), 50)
    levels = P.label_pyramid(labels)
    assert [lv.shape for lv in levels] == [(3000, 2100), (1500, 1050), (750, 525)]
    for k, lv in enumerate(levels):
        np.testing.assert_array_equal(lv.compute(), labels[:: 2**k, :: 2**k])
    assert len(P.label_pyramid(labels, levels=2)) == 2
    assert len(P.label_pyramid(labels[:1000, :1000])) == 1


def test_painted_equals_lut_of_labels_at_every_level_with_nan_background():
    labels = _random_labels((2600, 2300), 400, seed=1)
    rng = np.random.default_rng(2)
    ids = np.arange(1, 401)
    values = rng.random(400).astype(np.float32) * 5
    keep = rng.random(400) < 0.8  # some labels have no prediction: they stay unpainted
    lut = P.lookup_table(ids[keep], values[keep])
    levels = P.label_pyramid(da.from_array(labels, chunks=700))
    painted = P.paint(levels, lut)
    assert len(painted) == 3
    for k, (lv, pt) in enumerate(zip(levels, painted)):
        got = pt.compute()
        assert got.dtype == np.float32 and got.shape == lv.shape
        sub = labels[:: 2**k, :: 2**k]
        np.testing.assert_array_equal(got, _reference(sub, ids[keep], values[keep]))
        assert np.isnan(got[sub == 0]).all()
        assert np.isfinite(got[np.isin(sub, ids[keep])]).all()


def test_labels_beyond_the_table_read_as_background():
    lut = P.lookup_table(np.array([1, 2]), np.array([1.0, 2.0]))
    labels = np.array([[1, 2, 3, 1000]], dtype=np.uint16)
    got = P.paint([labels], lut)[0].compute()
    np.testing.assert_array_equal(got[0, :2], [1.0, 2.0])
    assert np.isnan(got[0, 2:]).all()


def test_paint_is_lazy_at_40k_by_40k_and_1m_cells(monkeypatch):
    calls = []
    real = P._apply_lut

    def counting(block, lut):
        calls.append(block.shape)
        return real(block, lut)

    monkeypatch.setattr(P, "_apply_lut", counting)
    labels = da.zeros((40_000, 40_000), dtype=np.int32, chunks=1024)
    lut = P.lookup_table(np.arange(1, 1_000_001), np.linspace(0, 1, 1_000_000))
    start = time.perf_counter()
    painted = P.paint(P.label_pyramid(labels), lut)
    elapsed = time.perf_counter() - start
    assert calls == []  # building computed nothing, not even dask's meta inference
    assert elapsed < 1.0, elapsed
    assert painted[0].shape == (40_000, 40_000) and painted[-1].shape[0] <= 1024
    crop = painted[0][5000:5500, 9000:9500].compute()
    assert np.isnan(crop).all()
    assert 1 <= len(calls) <= 4  # only the blocks under the crop were painted


def test_robust_limits():
    v = np.r_[np.arange(101, dtype=float), np.nan, np.inf]
    lo, hi = P.robust_limits(v)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(99.0)
    lo, hi = P.robust_limits(np.full(10, 3.0))
    assert lo < 3.0 < hi
    assert P.robust_limits(np.full(4, np.nan)) == (0.0, 1.0)
    lo, hi = P.robust_limits(np.r_[np.zeros(99), 7.0])  # percentiles equal, values not
    assert lo < hi


# ---------------------------------------------------------------- in a real viewer


def _predictions(n, genes=("A", "B", "C"), seed=0):
    rng = np.random.default_rng(seed)
    X = rng.random((n, len(genes))).astype(np.float32) * 4
    obs = pd.DataFrame({"label": np.arange(1, n + 1)}, index=[str(i) for i in range(1, n + 1)])
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))


@pytest.mark.gui
def test_update_gene_changes_displayed_values(make_napari_viewer):
    from napari_deepspot2cell.widgets.layers import add_prediction_layers, update_gene

    viewer = make_napari_viewer()
    labels, centres = grid_cells()
    adata = _predictions(len(centres))
    um = 0.5
    image, cells = add_prediction_layers(viewer, adata, labels, gene="A", scale=um)
    assert image.name == "DeepSpot2Cell: A" and image.colormap.name == "magma"
    assert image.colorbar.visible and cells.contour >= 1
    assert tuple(image.scale) == (um, um) == tuple(cells.scale)
    label, (y, x) = 7, centres[7]
    world = (y * um, x * um)
    assert image.get_value(world, world=True) == pytest.approx(adata.X[6, 0])
    assert np.isnan(image.get_value((2 * um, 2 * um), world=True))  # background

    label_index = cells._label_index
    update_gene(image, cells, adata, "C")
    assert cells._label_index is label_index  # the features column changed in place: no per-label rebuild
    assert image.name == "DeepSpot2Cell: C"
    assert image.get_value(world, world=True) == pytest.approx(adata.X[label - 1, 2])
    assert tuple(image.contrast_limits) == pytest.approx(P.robust_limits(adata.X[:, 2]))
    assert list(cells.features.columns) == ["index", "C"]
    np.testing.assert_allclose(cells.features["C"], adata.X[:, 2])
    assert cells._get_properties(world, world=True) == [f"C: {adata.X[label - 1, 2]:.3g}"]


@pytest.mark.gui
def test_screenshot_cells_take_colormap_colours_background_does_not(make_napari_viewer):
    from napari.utils.colormaps import ensure_colormap

    from napari_deepspot2cell.widgets.layers import add_prediction_layers

    viewer = make_napari_viewer(show=True)
    labels, centres = grid_cells()
    # a pure green backdrop under the paint: unpainted (NaN) pixels must let it through
    viewer.add_image(np.ones(labels.shape, np.float32), colormap="green", contrast_limits=(0, 1), name="under")
    adata = _predictions(len(centres), seed=3)
    adata.X[:, 0] = np.linspace(0, 4, len(centres))
    image, cells = add_prediction_layers(viewer, adata, labels, gene="A")
    image.colorbar.visible = False
    cells.visible = False  # the outlines would tint the cells; this checks the paint itself
    viewer.reset_view()
    shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(int)
    h, w = shot.shape[:2]
    cy, cx = viewer.camera.center[-2:]
    zoom = viewer.camera.zoom

    def screen(y, x):  # data (= world, scale 1) pixel centre -> screenshot pixel
        return int(round((y - cy) * zoom + h / 2)), int(round((x - cx) * zoom + w / 2))

    magma = ensure_colormap("magma")
    lo, hi = image.contrast_limits
    bright = 0
    for label, (y, x) in centres.items():
        px = shot[screen(y, x)]
        value = adata.X[label - 1, 0]
        expected = (magma.map(np.array([(value - lo) / (hi - lo)]).clip(0, 1))[0, :3] * 255).astype(int)
        assert np.abs(px - expected).max() <= 40, (label, px, expected)
        bright += px.max() - px.min() > 30  # coloured, not grey
    assert bright >= len(centres) // 2
    for y, x in [(4, 4), (labels.shape[0] - 5, 100), (30, 5 + 50 * 3)]:  # background pixels of the mask
        assert labels[y, x] == 0
        bg = shot[screen(y, x)]
        assert bg[1] >= 240 and bg[0] <= 15 and bg[2] <= 15, (y, x, bg)


def test_core_imports_no_qt_and_no_napari():
    import subprocess
    import sys

    code = (
        "import sys, napari_deepspot2cell.paint; "
        "bad = [m for m in ('napari', 'qtpy', 'PyQt6', 'PyQt5', 'PySide6', 'vispy') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
