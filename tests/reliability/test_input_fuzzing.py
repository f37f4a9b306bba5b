"""Input fuzzing: random label images, spot layouts, malformed GeoJSON and odd or damaged
TIFFs. Every case either works (and gives what a brute-force reference gives) or raises
InputError, the one-line error of the contract: never another exception, never a hang.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.geometry.assign import assign_cells
from napari_deepspot2cell.geometry.cells import cell_table
from napari_deepspot2cell.geometry.spots import Spots
from napari_deepspot2cell.io.masks import open_cells
from napari_deepspot2cell.io.slides import open_slide

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

DTYPES = {"uint8": 2**8 - 1, "uint16": 2**16 - 1, "int32": 2**31 - 1, "uint32": 2**32 - 1, "int64": 2**63 - 1,
          "uint64": 2**63 - 1}


@st.composite
def label_images(draw, max_side=20):
    dtype = draw(st.sampled_from(sorted(DTYPES)))
    top = DTYPES[dtype]
    h, w = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    # ids with gaps, the largest of the type (2**31 - 1 for int32, 2**63 - 1 for int64), and small ones
    pool = draw(st.lists(st.one_of(st.integers(1, 5), st.integers(1, top), st.just(top), st.just(min(top, 2**31 - 1))),
                         min_size=1, max_size=6, unique=True))
    kind = draw(st.sampled_from(["random", "empty", "one pixel", "blocks", "border"]))
    arr = np.zeros((h, w), dtype=dtype)
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "random":
        ids = np.array([0, *pool], dtype=dtype)
        arr = ids[rng.integers(0, len(ids), size=(h, w))]
    elif kind == "one pixel":
        arr[rng.integers(h), rng.integers(w)] = pool[0]
    elif kind in ("blocks", "border"):
        for v in pool:
            y0, x0 = int(rng.integers(h)), int(rng.integers(w))
            y1, x1 = (h, w) if kind == "border" else (min(h, y0 + int(rng.integers(1, 8))), min(w, x0 + int(rng.integers(1, 8))))
            arr[y0:y1, x0:x1] = v
    return arr


def _brute_table(arr: np.ndarray) -> dict:
    out = {}
    for v in np.unique(arr):
        if v == 0:
            continue
        rr, cc = np.nonzero(arr == v)
        out[int(v)] = (cc.mean(), rr.mean(), rr.size, rr.min(), cc.min(), rr.max() + 1, cc.max() + 1)
    return out


@FUZZ
@given(arr=label_images(), block=st.integers(1, 9))
def test_cell_table_equals_brute_force_on_random_label_images(arr, block):
    try:
        table = cell_table(arr, block=block)
    except InputError:
        assert arr.dtype == np.uint64 and int(arr.max()) > 2**63 - 1
        return
    ref = _brute_table(arr)
    assert table["label"].tolist() == sorted(ref)  # every id exact, even above 2**53
    for lab, row in zip(table["label"].tolist(), table.itertuples()):
        x, y, area, y0, x0, y1, x1 = ref[lab]
        assert (row.area, row.y0, row.x0, row.y1, row.x1) == (area, y0, x0, y1, x1)
        assert row.x == pytest.approx(x) and row.y == pytest.approx(y)


@FUZZ
@given(arr=label_images(max_side=24), data=st.data())
def test_assign_cells_equals_brute_force_on_random_spot_layouts(arr, data):
    arr = (arr % 7).astype(np.int32)  # a handful of cells: the reference loops over cells x spots
    cells = cell_table(arr)
    h, w = arr.shape
    m = data.draw(st.integers(1, 5))
    xy = np.array([[data.draw(st.floats(-5, w + 5)), data.draw(st.floats(-5, h + 5))] for _ in range(m)])
    diameter = data.draw(st.floats(1.0, 2.5 * max(h, w)))
    spots = Spots(ids=np.array([f"s{i}" for i in range(m)], dtype=object), xy=xy, tile_px=diameter, kind="visium",
                  neighbours=np.full((m, 6), -1, np.int64), diameter_px=diameter)
    try:
        asg = assign_cells(arr, cells, spots, block=data.draw(st.integers(2, 16)))
    except InputError as exc:
        assert "smaller than cells" in str(exc) or "no cell lies" in str(exc) or len(cells) == 0
        if len(cells) == 0:
            return
        if "smaller than cells" in str(exc):
            assert np.pi * (diameter / 2) ** 2 < np.median(cells["area"])
            return
        inside_any = False
    else:
        inside_any = True
    rr, cc = np.mgrid[0:h, 0:w]
    frac = np.zeros((len(cells), m))
    for i, lab in enumerate(cells["label"]):
        px = arr == lab
        for s in range(m):
            disk = (cc - xy[s, 0]) ** 2 + (rr - xy[s, 1]) ** 2 <= (diameter / 2) ** 2
            frac[i, s] = (px & disk).sum() / px.sum()
    best = frac.argmax(1)  # ties: the lowest spot index, as documented
    inside = frac[np.arange(len(cells)), best] >= 0.6
    assert inside_any == bool(inside.any())
    event("cells inside" if inside_any else "no cell inside")
    if not inside_any:
        return
    np.testing.assert_array_equal(asg.inside, inside)
    np.testing.assert_array_equal(asg.spot[inside], best[inside])
    np.testing.assert_allclose(asg.inside_fraction[inside], frac[inside, best[inside]])
    assert asg.cells_per_spot.sum() == inside.sum()


# ---------------------------------------------------------------- GeoJSON

_KEYS = ["type", "features", "geometry", "coordinates", "geometries", "properties", "objectType"]
_VALUES = ["FeatureCollection", "Feature", "Polygon", "MultiPolygon", "GeometryCollection", "Point", "cell",
           "annotation", "detection"]
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-50, 50), st.floats(allow_nan=True, allow_infinity=True),
              st.sampled_from(_VALUES)),
    lambda inner: st.one_of(st.lists(inner, max_size=5), st.dictionaries(st.sampled_from(_KEYS), inner, max_size=4)),
    max_leaves=25,
)
_ring = st.lists(st.lists(st.floats(-10, 40, allow_nan=False), min_size=2, max_size=3), min_size=0, max_size=6)
_polygon = st.fixed_dictionaries({"type": st.sampled_from(["Polygon", "MultiPolygon"]),
                                  "coordinates": st.one_of(st.lists(_ring, max_size=2), st.lists(st.lists(_ring, max_size=2), max_size=2))})
_feature = st.fixed_dictionaries({"type": st.just("Feature"), "geometry": st.one_of(_polygon, _json),
                                  "properties": st.one_of(st.none(), st.fixed_dictionaries({"objectType": st.sampled_from(_VALUES)}))})
_doc = st.one_of(_json, st.fixed_dictionaries({"type": st.just("FeatureCollection"), "features": st.lists(_feature, max_size=4)}),
                 st.lists(_feature, max_size=3))


@FUZZ
@given(doc=_doc, mangle=st.sampled_from(["json", "truncated", "bytes"]))
def test_malformed_geojson_opens_or_is_an_input_error(doc, mangle, tmp_path_factory):
    path = tmp_path_factory.mktemp("geo") / "cells.geojson"
    text = json.dumps(doc, allow_nan=True)
    if mangle == "truncated":
        text = text[: max(0, len(text) // 2)]
    path.write_bytes(text.encode() if mangle != "bytes" else b"\xff\xfe" + text.encode("utf-16-le"))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask = open_cells(path, (32, 32), 0.5)
            labels = np.asarray(mask.labels)
    except InputError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)
        event("refused")
        return
    event("opened")
    assert labels.shape == (32, 32) and labels.min() >= 0 and labels.max() <= mask.n_cells


# ---------------------------------------------------------------- TIFF slides


@st.composite
def tiff_cases(draw):
    return dict(
        h=draw(st.integers(1, 70)), w=draw(st.integers(1, 70)),
        layout=draw(st.sampled_from(["tile16", "tile48", "tile32", "strips", "one strip"])),
        rows_per_strip=draw(st.integers(1, 9)),
        dtype=draw(st.sampled_from(["uint8", "uint16", "float32"])),
        channels=draw(st.sampled_from([3, 3, 4, 1])),
        planar=draw(st.booleans()),
        compression=draw(st.sampled_from([None, "zlib"])),
        cut=draw(st.one_of(st.none(), st.none(), st.none(), st.floats(0.05, 0.999))),
        seed=draw(st.integers(0, 1000)),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=tiff_cases())
def test_odd_and_damaged_tiffs_read_or_are_an_input_error(case, tmp_path_factory):
    rng = np.random.default_rng(case["seed"])
    h, w, c = case["h"], case["w"], case["channels"]
    top = 255 if case["dtype"] == "uint8" else 65535 if case["dtype"] == "uint16" else 1.0
    img = (rng.random((h, w, c)) * top).astype(case["dtype"])
    if c == 1:
        img = img[..., 0]
    planar = case["planar"] and c > 1
    if planar:
        img = np.moveaxis(img, -1, 0)
    kw = dict(photometric="rgb" if c > 1 else "minisblack", compression=case["compression"], metadata=None,
              planarconfig="separate" if planar else "contig")
    if c == 4:
        kw["extrasamples"] = ["unassalpha"]
    if case["layout"].startswith("tile"):
        kw["tile"] = (int(case["layout"][4:]),) * 2
    elif case["layout"] == "strips":
        kw["rowsperstrip"] = case["rows_per_strip"]
    path = tmp_path_factory.mktemp("tif") / "slide.tif"
    tifffile.imwrite(path, img, **kw)
    if case["cut"] is not None:
        data = path.read_bytes()
        path.write_bytes(data[: max(8, int(len(data) * case["cut"]))])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            slide = open_slide(path, um_per_px=0.5)
            with slide:
                assert slide.shape == (h, w)
                for _ in range(3):  # windows inside, across the border, and outside the slide
                    y0, x0 = int(rng.integers(-10, h + 5)), int(rng.integers(-10, w + 5))
                    y1, x1 = y0 + int(rng.integers(0, 40)), x0 + int(rng.integers(0, 40))
                    region = slide.read_region(y0, x0, y1, x1)
                    assert region.shape == (y1 - y0, x1 - x0, 3) and region.dtype == np.uint8
                full = slide.read_region(0, 0, h, w)
    except InputError as exc:
        assert "\n" not in str(exc)
        event("refused: " + exc.problem.split("(")[0][:40])
        return
    event("read" + (" (truncated)" if case["cut"] is not None else ""))
    assert c in (3, 4) and case["dtype"] != "float32"  # what cannot be an H&E slide was refused
    rgb = np.moveaxis(img, 0, -1) if planar else img
    if case["dtype"] == "uint8" and c == 3 and case["cut"] is None:
        np.testing.assert_array_equal(full, rgb)
