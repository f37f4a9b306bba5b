"""Cell masks: label images, GeoJSON polygons, centroid tables (real HEST sample and written files)."""

from __future__ import annotations

import json
import warnings

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import tifffile
from helpers_io import NCBI858_H5AD, NCBI858_JPG, need
from PIL import Image
from scipy.spatial import cKDTree
from skimage.draw import polygon as draw_polygon

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.io.masks import open_cells
from napari_deepspot2cell.io.slides import open_slide

SHAPE = (1500, 1300)  # bigger than one 1024 px chunk, so chunk borders are crossed


def _labels(h=SHAPE[0], w=SHAPE[1], seed=0):
    rng = np.random.default_rng(seed)
    out = np.zeros((h, w), np.uint32)
    for i in range(1, 60):
        y, x = rng.integers(0, h - 40), rng.integers(0, w - 40)
        out[y:y + 30, x:x + 25] = i * 1000  # ids beyond 8 bits, kept as they are
    return out


# ---------------------------------------------------------------- the real HEST/DeepSpot sample


def _ncbi858(**kwargs):
    slide = open_slide(need(NCBI858_JPG), um_per_px=1.0)
    return slide, open_cells(need(NCBI858_H5AD), slide.shape, 1.0, cell_diameter_um=8, **kwargs)


def test_ncbi858_detects_x_pixel_as_row():
    slide = open_slide(need(NCBI858_JPG), um_per_px=1.0)
    with pytest.warns(UserWarning, match=r"read x_pixel as the row and y_pixel as the column.*centroid_columns"):
        cells = open_cells(need(NCBI858_H5AD), slide.shape, 1.0, cell_diameter_um=8, slide=slide)
    assert cells.source_kind == "centroids"
    assert cells.labels.shape == slide.shape == (1249, 1431)
    assert isinstance(cells.labels, da.Array) and np.issubdtype(cells.labels.dtype, np.integer)
    table = cells.centroids
    assert len(table) == 200 and list(table.columns[:4]) == ["label", "x", "y", "cell_id"]
    assert table["cell_id"].iloc[0] == "aaaaaomh-1"
    assert table["x"].iloc[0] == pytest.approx(999.445214) and table["y"].iloc[0] == pytest.approx(536.366438)
    image = slide.levels[0].compute().mean(axis=2)
    rows, cols = np.rint(table["y"]).astype(int), np.rint(table["x"]).astype(int)
    assert (image[rows, cols] < 215).mean() >= 0.9  # on tissue
    labels = cells.labels.compute()
    assert (labels[rows, cols] == table["label"].to_numpy()).mean() > 0.95  # each centroid sits in its own cell
    assert set(np.unique(labels)) - {0} == set(table["label"])


def test_ncbi858_bounds_decide_without_slide():
    with pytest.warns(UserWarning, match="x_pixel as the row"):
        _, cells = _ncbi858()
    assert cells.centroids["x"].iloc[0] == pytest.approx(999.445214)


def test_ncbi858_explicit_columns_both_ways():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # explicit columns: nothing to warn about
        _, hest = _ncbi858(centroid_columns=("y_pixel", "x_pixel"))
    assert hest.centroids["x"].iloc[0] == pytest.approx(999.445214) and len(hest.centroids) == 200
    with pytest.warns(UserWarning, match="outside the slide and were dropped"):
        _, literal = _ncbi858(centroid_columns=("x_pixel", "y_pixel"))
    assert literal.centroids["x"].iloc[0] == pytest.approx(536.366438)
    assert literal.centroids["y"].max() < 1249 and len(literal.centroids) < 200


def test_ambiguous_x_pixel_y_pixel_refused(tmp_path):
    path = tmp_path / "cells.csv"
    rng = np.random.default_rng(1)
    pd.DataFrame({"x_pixel": rng.uniform(100, 400, 50), "y_pixel": rng.uniform(100, 400, 50)}).to_csv(path)
    with pytest.raises(InputError, match="centroid_columns"):
        open_cells(path, (500, 500), 0.5, cell_diameter_um=5)


# ---------------------------------------------------------------- label images


def test_label_tiff_is_lazy_and_round_trips(tmp_path):
    labels = _labels()
    path = tmp_path / "labels.tif"
    tifffile.imwrite(path, labels, tile=(256, 256), compression="zlib")
    cells = open_cells(path, SHAPE, 0.5)
    assert cells.source_kind == "labels" and cells.labels.dtype == np.uint32
    assert all(c % 256 == 0 for c in cells.labels.chunks[0][:-1])
    np.testing.assert_array_equal(cells.labels.compute(), labels)
    cells.close()


def test_label_png_and_npy_round_trip(tmp_path):
    labels = (_labels() // 1000).astype(np.uint16)
    png = tmp_path / "labels.png"
    Image.fromarray(labels).save(png)
    np.testing.assert_array_equal(open_cells(png, SHAPE, 0.5).labels.compute(), labels)
    npy = tmp_path / "labels.npy"
    np.save(npy, labels.astype(np.int32)[..., None])  # a trailing channel of one is fine
    cells = open_cells(npy, SHAPE, 0.5)
    assert cells.labels.shape == SHAPE and cells.labels.dtype == np.int32
    np.testing.assert_array_equal(cells.labels.compute(), labels)


def test_label_shape_mismatch_names_both_shapes(tmp_path):
    path = tmp_path / "small.npy"
    np.save(path, np.zeros((100, 200), np.uint16))
    with pytest.raises(InputError, match=r"mask is 100 x 200 \(rows x cols\) but the slide is 300 x 400") as info:
        open_cells(path, (300, 400), 0.5)
    assert info.value.source == str(path)


def test_bad_label_values_refused(tmp_path):
    cases = {
        "float.npy": (np.ones((30, 40), np.float32), "float32"),
        "negative.npy": (np.full((30, 40), -1, np.int16), "negative"),
        "binary.npy": (np.ones((30, 40), bool), "binary"),
        "rgb.npy": (np.ones((30, 40, 3), np.uint8), "one channel"),
    }
    for name, (arr, message) in cases.items():
        np.save(tmp_path / name, arr)
        with pytest.raises(InputError, match=message):
            open_cells(tmp_path / name, (30, 40), 0.5)
    rgb_png = tmp_path / "rgb.png"
    Image.fromarray(np.ones((30, 40, 3), np.uint8)).save(rgb_png)
    with pytest.raises(InputError, match="one channel"):
        open_cells(rgb_png, (30, 40), 0.5)


def test_negative_labels_in_lazy_tiff_refused_when_read(tmp_path):
    arr = np.zeros((2100, 300), np.int32)
    arr[2050:, 200:] = -5
    path = tmp_path / "signed.tif"
    tifffile.imwrite(path, arr, tile=(64, 64))
    cells = open_cells(path, (2100, 300), 0.5)
    assert cells.labels[:64, :64].compute().max() == 0  # clean chunks read fine
    with pytest.raises(InputError, match="negative"):
        cells.labels.compute()


def test_broken_label_files_refused(tmp_path):
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    garbage = tmp_path / "labels.tif"
    garbage.write_bytes(b"II*\x00" + b"\xff" * 20)
    text = tmp_path / "labels.png"
    text.write_text("no pixels here")
    for path in (pickled, garbage, text, tmp_path / "absent.tif"):
        with pytest.raises(InputError) as info:
            open_cells(path, (10, 10), 0.5)
        assert info.value.source == str(path)


# ---------------------------------------------------------------- GeoJSON polygons


def _square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def _circle(cx, cy, r, n=64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.column_stack([cx + r * np.cos(t), cy + r * np.sin(t)]).tolist()
    return ring + ring[:1]


def _qupath(geometry, kind="cell"):
    return {"type": "Feature", "id": "ignored", "geometry": geometry,
            "properties": {"objectType": kind, "classification": {"name": "Tumor"}}}


def test_geojson_qupath_round_trip(tmp_path):
    features = [
        _qupath({"type": "Polygon", "coordinates": [_square(10, 10, 20, 20)]}),
        _qupath({"type": "Polygon", "coordinates": [_circle(1010.3, 1020.7, 20)]}),  # across chunk borders
        _qupath({"type": "MultiPolygon",
                 "coordinates": [[_square(100, 100, 110, 105)], [_square(120, 100, 125, 105)]]}),
        _qupath({"type": "Polygon", "coordinates": [_square(200, 300, 240, 340), _square(210, 310, 220, 320)]}),
        _qupath({"type": "Polygon", "coordinates": [_square(0, 0, 1300, 1500)]}, kind="annotation"),
    ]
    path = tmp_path / "cells.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    with pytest.warns(UserWarning, match="1 features that are not cell polygons were skipped"):
        cells = open_cells(path, SHAPE, 0.5)
    assert cells.source_kind == "polygons" and cells.n_cells == 4
    labels = cells.labels.compute()
    assert labels.shape == SHAPE
    square = np.zeros(SHAPE, bool)
    square[10:20, 10:20] = True
    np.testing.assert_array_equal(labels == 1, square)  # pixel (c, r) spans [c, c+1): exactly the 10 x 10 pixels
    assert abs((labels == 2).sum() - np.pi * 20**2) / (np.pi * 20**2) < 0.03
    ring = np.asarray(_circle(1010.3, 1020.7, 20))
    rr, cc = draw_polygon(ring[:, 1] - 0.5, ring[:, 0] - 0.5, shape=SHAPE)
    expected = np.zeros(SHAPE, bool)
    expected[rr, cc] = True
    np.testing.assert_array_equal(labels == 2, expected)  # chunked drawing equals drawing at once
    assert (labels == 3).sum() == 50 + 25  # a QuPath MultiPolygon is one object
    assert (labels == 4).sum() == 40 * 40 - 10 * 10  # the hole stays background
    assert labels[315, 215] == 0


def test_geojson_cellvit_multipolygon_is_one_cell_per_part(tmp_path):
    parts = [[_square(10 + 20 * i, 10, 20 + 20 * i, 20)] for i in range(3)]
    doc = [{"type": "Feature", "geometry": {"type": "MultiPolygon", "coordinates": parts},
            "properties": {"classification": {"name": "Neoplastic"}}},
           {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [_square(10, 50, 20, 60)]}}]
    path = tmp_path / "cellvit.geojson"
    path.write_text(json.dumps(doc))
    labels = open_cells(path, (100, 100), 0.5).labels.compute()
    assert [int((labels == k).sum()) for k in range(1, 5)] == [100, 100, 100, 100]
    assert labels[15, 35] == 2 and labels[55, 15] == 4


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ('{"type": "FeatureCollection", "features": []}', "no features"),
    ('{"type": "FeatureCollection"}', "features"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon"}}]', "feature 0 has a Polygon without coordinates"),
    ('[{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}]', "at least 3"),
    ('[{"type": "Feature", "properties": {}}]', "no geometry"),
    ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}]', "no Polygon"),
    ('{"cells": 3}', "not GeoJSON"),
])
def test_malformed_geojson_refused(tmp_path, text, message):
    path = tmp_path / "bad.geojson"
    path.write_text(text)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(InputError, match=message) as info:
            open_cells(path, (50, 50), 0.5)
    assert info.value.source == str(path)


# ---------------------------------------------------------------- centroid tables


def _reference_disks(x, y, ids, shape, radius):
    rr, cc = np.mgrid[0:shape[0], 0:shape[1]]
    dist, idx = cKDTree(np.column_stack([y, x])).query(np.column_stack([rr.ravel(), cc.ravel()]),
                                                      distance_upper_bound=radius + 1e-9)
    hit = np.isfinite(dist)
    out = np.zeros(rr.size, np.int64)
    out[hit] = np.asarray(ids)[idx[hit]]
    return out.reshape(shape)


def test_csv_centroids_are_voronoi_limited_disks(tmp_path):
    rng = np.random.default_rng(3)
    x, y = rng.uniform(0, SHAPE[1], 300), rng.uniform(0, SHAPE[0], 300)
    x[:2], y[:2] = [1020.0, 1030.0], [1019.0, 1021.0]  # an overlapping pair on a chunk corner
    path = tmp_path / "cells.csv"
    pd.DataFrame({"x": x, "y": y, "area": 1.0}).to_csv(path, index=False)
    cells = open_cells(path, SHAPE, 0.5, cell_diameter_um=10)  # 20 px across
    labels = cells.labels.compute()
    np.testing.assert_array_equal(labels, _reference_disks(x, y, np.arange(1, 301), SHAPE, 10.0))
    isolated = np.bincount(labels.ravel())[1:]
    assert np.median(isolated) == pytest.approx(np.pi * 100, rel=0.05)
    assert (labels[1020, 1015] == 1) and (labels[1020, 1035] == 2)  # the pair splits down the middle
    assert list(cells.centroids["label"][:3]) == [1, 2, 3] and cells.centroids["cell_id"].iloc[0] == "0"


def test_parquet_xenium_centroids_in_um_with_integer_ids(tmp_path):
    path = tmp_path / "cells.parquet"
    pd.DataFrame({"cell_id": [7, 3, 12], "x_centroid": [10.0, 50.0, 90.0], "y_centroid": [20.0, 20.0, 40.0]}
                 ).to_parquet(path)
    cells = open_cells(path, (200, 400), 0.25, cell_diameter_um=2.0)  # um -> px: x 4, radius 4 px
    table = cells.centroids
    assert list(table["label"]) == [7, 3, 12] and list(table["x"]) == [40.0, 200.0, 360.0]
    assert list(table.index) == ["7", "3", "12"] and list(table["cell_id"]) == ["7", "3", "12"]
    labels = cells.labels.compute()
    assert labels[80, 40] == 7 and labels[80, 200] == 3 and labels[160, 360] == 12
    assert (labels == 3).sum() == pytest.approx(np.pi * 16, rel=0.1)


def test_explicit_columns_and_units(tmp_path):
    path = tmp_path / "cells.tsv"
    pd.DataFrame({"col_um": [5.0], "row_um": [10.0]}).to_csv(path, sep="\t", index=False)
    cells = open_cells(path, (100, 100), 0.5, cell_diameter_um=3, centroid_columns=("col_um", "row_um"),
                       centroid_units="um")
    assert (cells.centroids["x"].iloc[0], cells.centroids["y"].iloc[0]) == (10.0, 20.0)
    assert cells.labels.compute()[20, 10] == 1


def test_centroid_table_errors(tmp_path):
    path = tmp_path / "cells.csv"
    pd.DataFrame({"a": [1.0], "b": [2.0]}).to_csv(path, index=False)
    with pytest.raises(InputError, match="--cell-diameter-um is needed for centroid tables"):
        open_cells(path, (10, 10), 0.5)
    with pytest.raises(InputError, match=r"no centroid columns found \(it has a, b\)"):
        open_cells(path, (10, 10), 0.5, cell_diameter_um=5)
    with pytest.raises(InputError, match="no column 'q'"):
        open_cells(path, (10, 10), 0.5, cell_diameter_um=5, centroid_columns=("q", "b"))
    with pytest.raises(InputError, match="none of the 1 centroids"):
        open_cells(path, (10, 10), 0.01, cell_diameter_um=5, centroid_columns=("a", "b"), centroid_units="um")
    with pytest.raises(InputError, match="cell-diameter-um must be positive"):
        open_cells(path, (10, 10), 0.5, cell_diameter_um=-2, centroid_columns=("a", "b"))
    broken = tmp_path / "cells.parquet"
    broken.write_bytes(b"PAR1 not really")
    with pytest.raises(InputError, match="cannot read the centroid table"):
        open_cells(broken, (10, 10), 0.5, cell_diameter_um=5)
