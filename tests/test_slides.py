"""Slides: real SVS, written TIFF variants, small formats, pixel size, errors, identity."""

from __future__ import annotations

import json
import os
import tracemalloc
import warnings

import dask.array as da
import numpy as np
import pytest
import tifffile
from helpers_io import CMU1, NCBI858_JPG, need, rgb_picture
from PIL import Image

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.io.slides import open_slide, read_thumbnail

# ---------------------------------------------------------------- the real CMU-1 SVS


def test_svs_opens_as_lazy_two_level_pyramid():
    slide = open_slide(need(CMU1))
    assert slide.shape == (2967, 2220)  # rows x cols: the region is 2220 px wide, 2967 px tall
    assert [lv.shape for lv in slide.levels] == [(2967, 2220, 3), (768, 574, 3)]
    assert all(isinstance(lv, da.Array) and lv.dtype == np.uint8 for lv in slide.levels)
    assert slide.um_per_px == pytest.approx(0.499)
    assert slide.downsamples[0] == 1.0 and slide.downsamples[1] == pytest.approx(3.865, abs=0.01)
    # chunks follow the 240 px JPEG tiles
    assert slide.levels[0].chunks[0][0] % 240 == 0 and slide.levels[0].chunks[1][0] % 240 == 0


def test_svs_open_decodes_no_more_than_a_tile():
    need(CMU1)
    open_slide(CMU1).close()  # imports and codec set-up out of the measurement
    tracemalloc.start()
    try:
        slide = open_slide(CMU1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    level0_bytes = 2967 * 2220 * 3
    assert peak < level0_bytes / 8, f"opening allocated {peak} bytes; level 0 is {level0_bytes}"
    slide.close()


def test_svs_read_region_matches_file_and_pads():
    slide = open_slide(need(CMU1))
    reference = tifffile.imread(CMU1, key=0)  # independent full decode by tifffile
    window = slide.read_region(1000, 700, 1224, 924)
    np.testing.assert_array_equal(window, reference[1000:1224, 700:924])
    np.testing.assert_array_equal(window, slide.levels[0][1000:1224, 700:924].compute())
    border = slide.read_region(2900, -50, 3000, 100, fill=7)  # across the bottom-left corner
    assert border.shape == (100, 150, 3)
    np.testing.assert_array_equal(border[:67, 50:], reference[2900:, :100])
    assert (border[67:] == 7).all() and (border[:, :50] == 7).all()
    outside = slide.read_region(-500, -500, -400, -300)
    assert outside.shape == (100, 200, 3) and (outside == 255).all()
    low = slide.read_region(700, 500, 800, 600, level=1)
    np.testing.assert_array_equal(low[:68, :74], tifffile.imread(CMU1, key=1)[700:, 500:])
    assert (low[68:] == 255).all()


def test_svs_identity_and_thumbnail():
    slide = open_slide(need(CMU1))
    ident = slide.identity()
    assert ident["path"] == str(CMU1.resolve())
    assert ident["size"] == CMU1.stat().st_size and ident["mtime_ns"] == CMU1.stat().st_mtime_ns
    assert ident["shape"] == [2967, 2220]
    assert len(ident["pixel_sha256"]) == 64
    assert open_slide(CMU1).identity() == ident  # deterministic
    thumb = read_thumbnail(slide, max_side=500)
    assert thumb.dtype == np.uint8 and max(thumb.shape[:2]) <= 500 and max(thumb.shape[:2]) > 250
    assert 150 < thumb.mean() < 250  # mostly glass and pink tissue, not black
    small = read_thumbnail(slide, max_side=4000)  # no level is bigger: level 0 as is
    assert small.shape == (2967, 2220, 3)


def test_um_per_px_argument_overrides_file():
    assert open_slide(need(CMU1), um_per_px=0.25).um_per_px == 0.25


@pytest.mark.parametrize("bad", [0, -1, float("nan"), "abc"])
def test_bad_um_per_px_refused(bad):
    with pytest.raises(InputError, match="um-per-px"):
        open_slide(need(CMU1), um_per_px=bad)


# ---------------------------------------------------------------- written TIFF variants


def test_ome_tiff_physical_size(tmp_path):
    img = rgb_picture(300, 200)
    path = tmp_path / "a.ome.tif"
    tifffile.imwrite(path, img, ome=True, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.2527, "PhysicalSizeXUnit": "µm"})
    slide = open_slide(path)
    assert slide.um_per_px == pytest.approx(0.2527)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    nm = tmp_path / "nm.ome.tif"
    tifffile.imwrite(nm, img, ome=True, photometric="rgb",
                     metadata={"axes": "YXS", "PhysicalSizeX": 500, "PhysicalSizeXUnit": "nm"})
    assert open_slide(nm).um_per_px == pytest.approx(0.5)


def _pyramid(path, img, tile=(256, 256)):
    with tifffile.TiffWriter(path) as tw:
        opts = dict(tile=tile, compression="zlib", photometric="rgb")
        tw.write(img, subifds=2, resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER", **opts)
        tw.write(img[::2, ::2], subfiletype=1, **opts)
        tw.write(img[::4, ::4], subfiletype=1, **opts)


def test_pyramidal_tiled_tiff_with_cm_resolution(tmp_path):
    img = rgb_picture(1500, 1100)
    path = tmp_path / "pyr.tif"
    _pyramid(path, img)
    slide = open_slide(path)
    assert slide.um_per_px == pytest.approx(0.5)
    assert [lv.shape[:2] for lv in slide.levels] == [(1500, 1100), (750, 550), (375, 275)]
    assert slide.downsamples == pytest.approx([1, 2, 4], rel=0.01)
    assert all(c % 256 == 0 for c in slide.levels[0].chunks[0][:-1])
    np.testing.assert_array_equal(slide.read_region(600, 500, 900, 800), img[600:900, 500:800])
    np.testing.assert_array_equal(slide.read_region(100, 100, 200, 200, level=1), img[::2, ::2][100:200, 100:200])
    np.testing.assert_array_equal(slide.levels[2].compute(), img[::4, ::4])


def test_identity_sees_changed_pixels_behind_same_path_size_and_mtime(tmp_path):
    img = rgb_picture(1500, 1100)
    path = tmp_path / "pyr.tif"
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    before = open_slide(path).identity()
    stat = path.stat()
    img[::4, ::4] = 0  # a change every sampled window sees
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    after = open_slide(path).identity()
    assert (after["size"], after["mtime_ns"]) == (before["size"], before["mtime_ns"])
    assert after["pixel_sha256"] != before["pixel_sha256"]


def test_stripped_tiff_with_inch_resolution(tmp_path):
    img = rgb_picture(400, 300)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, img, rowsperstrip=16, photometric="rgb", resolution=(101600, 101600), resolutionunit="INCH")
    assert not tifffile.TiffFile(path).pages[0].is_tiled
    slide = open_slide(path)
    assert slide.um_per_px == pytest.approx(0.25)
    np.testing.assert_array_equal(slide.read_region(-5, 290, 30, 310, fill=0)[5:, :10], img[:30, 290:])
    np.testing.assert_array_equal(slide.levels[0].compute(), img)


def test_default_72_dpi_is_not_a_pixel_size(tmp_path):
    path = tmp_path / "screen.tif"
    tifffile.imwrite(path, rgb_picture(50, 60), photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    with pytest.raises(InputError, match=r"pixel size unknown; pass --um-per-px \(e.g. 0.25 for 40x"):
        open_slide(path)
    assert open_slide(path, um_per_px=0.3).um_per_px == 0.3


def test_planar_tiff_is_transposed(tmp_path):
    img = rgb_picture(200, 150)
    path = tmp_path / "planar.tif"
    tifffile.imwrite(path, np.moveaxis(img, -1, 0), planarconfig="separate", photometric="rgb", tile=(64, 64))
    slide = open_slide(path, um_per_px=1)
    assert slide.levels[0].shape == (200, 150, 3)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    np.testing.assert_array_equal(slide.read_region(50, 60, 120, 170, fill=1)[:, :90], img[50:120, 60:150])


def test_16_bit_tiff_scaled_with_note(tmp_path):
    img = rgb_picture(100, 80)
    full = tmp_path / "u16.tif"
    tifffile.imwrite(full, img.astype(np.uint16) * 257, photometric="rgb")
    with pytest.warns(UserWarning, match="16-bit"):
        slide = open_slide(full, um_per_px=1)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)
    twelve = tmp_path / "u12.tif"  # a 12-bit camera in a 16-bit container
    tifffile.imwrite(twelve, (img.astype(np.uint32) * 4095 // 255).astype(np.uint16), photometric="rgb")
    with pytest.warns(UserWarning, match="16-bit"):
        slide = open_slide(twelve, um_per_px=1)
    assert np.abs(slide.read_region(0, 0, 100, 80).astype(int) - img).max() <= 1


def test_grayscale_refused(tmp_path):
    tif = tmp_path / "gray.tif"
    tifffile.imwrite(tif, rgb_picture(40, 40)[..., 0])
    png = tmp_path / "gray.png"
    Image.fromarray(rgb_picture(40, 40)[..., 0]).save(png)
    for path in (tif, png):
        with pytest.raises(InputError, match="grayscale image .*DeepSpot2Cell needs an RGB H&E slide") as info:
            open_slide(path, um_per_px=1)
        assert info.value.source == str(path)


def test_truncated_tiff_refused(tmp_path):
    path = tmp_path / "cut.tif"
    tifffile.imwrite(path, rgb_picture(600, 500), tile=(128, 128), compression="jpeg", photometric="rgb")
    data = path.read_bytes()
    for keep in (len(data) // 2, len(data) - 200, 100):
        path.write_bytes(data[:keep])
        with pytest.raises(InputError, match="cut.tif"):
            open_slide(path, um_per_px=1)


def test_truncated_jpeg_and_non_images_refused(tmp_path):
    jpg = tmp_path / "cut.jpg"
    Image.fromarray(rgb_picture(300, 300)).save(jpg, quality=90)
    jpg.write_bytes(jpg.read_bytes()[:5000])
    text = tmp_path / "notes.png"
    text.write_text("this is not a picture")
    empty = tmp_path / "empty.tif"
    empty.write_bytes(b"")
    for path in (jpg, text, empty, tmp_path / "missing.svs"):
        with pytest.raises(InputError) as info:
            open_slide(path, um_per_px=1)
        assert info.value.source == str(path)


# ---------------------------------------------------------------- small formats and sidecars


def test_rgba_png_composited_on_white(tmp_path):
    img = rgb_picture(60, 70)
    alpha = np.full((60, 70, 1), 255, np.uint8)
    alpha[:20] = 0
    alpha[20:30] = 128
    path = tmp_path / "rgba.png"
    Image.fromarray(np.concatenate([img, alpha], axis=-1), mode="RGBA").save(path)
    with pytest.warns(UserWarning, match="alpha"):
        slide = open_slide(path, um_per_px=0.5)
    out = slide.levels[0].compute()
    assert out.shape == (60, 70, 3)
    assert (out[:20] == 255).all()
    np.testing.assert_array_equal(out[30:], img[30:])
    expected = np.rint(img[20:30] * (128 / 255) + 255 * (1 - 128 / 255))
    assert np.abs(out[20:30].astype(int) - expected).max() <= 1
    np.testing.assert_array_equal(slide.read_region(0, 0, 60, 70), out)


def test_16_bit_png_is_read_at_full_depth(tmp_path):
    import imagecodecs

    img = rgb_picture(50, 40)
    path = tmp_path / "deep.png"
    path.write_bytes(imagecodecs.png_encode(img.astype(np.uint16) * 257))
    with pytest.warns(UserWarning, match="16-bit"):
        slide = open_slide(path, um_per_px=1)
    np.testing.assert_array_equal(slide.levels[0].compute(), img)


def test_jpeg_single_level_with_json_sidecar(tmp_path):
    img = rgb_picture(120, 90)
    path = tmp_path / "sample.jpg"
    Image.fromarray(img).save(path, quality=95)
    with pytest.raises(InputError, match="pixel size unknown"):
        open_slide(path)
    (tmp_path / "sample.json").write_text(json.dumps({"pixel_size_um_estimated": 0.2634, "cell_diameter": 20}))
    slide = open_slide(path)
    assert slide.um_per_px == pytest.approx(0.2634)
    assert len(slide.levels) == 1 and slide.levels[0].shape == (120, 90, 3)
    with Image.open(path) as im:
        np.testing.assert_array_equal(slide.read_region(0, 0, 120, 90), np.asarray(im))


def test_real_jpeg_needs_pixel_size():
    path = need(NCBI858_JPG)
    with pytest.raises(InputError, match="--um-per-px"):
        open_slide(path)  # its sidecar has no pixel size
    slide = open_slide(path, um_per_px=0.5)
    assert slide.shape == (1249, 1431)  # the jpg is 1431 px wide, 1249 tall
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # plain RGB: no notes
        open_slide(path, um_per_px=0.5)
