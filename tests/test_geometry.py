"""Cell table, patch grid, neighbours and tile cutting against hand-computed cases."""

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import torch

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.geometry import cell_table, patch_grid
from napari_deepspot2cell.geometry.spots import hex_neighbours, spots_from_anndata
from napari_deepspot2cell.geometry.tiles import box_extent, cell_tile_boxes, crop_resize, spot_tile_boxes


def _two_cells():
    lab = np.zeros((10, 12), np.int32)
    lab[1:4, 2:6] = 3  # rows 1..3, cols 2..5: 12 px, centroid (x=3.5, y=2)
    lab[5:10, 10:12] = 7  # touches the bottom and right borders
    return lab


@pytest.mark.parametrize("block", [3, 4, 5, 4096])
def test_cell_table_hand_computed_any_block_size(block):
    t = cell_table(_two_cells(), block=block)
    assert list(t.index) == [3, 7]
    row = t.loc[3]
    assert (row.x, row.y, row.area) == (3.5, 2.0, 12)
    assert (row.y0, row.x0, row.y1, row.x1) == (1, 2, 4, 6)
    row = t.loc[7]
    assert (row.x, row.y, row.area) == (10.5, 7.0, 10)
    assert (row.y0, row.x0, row.y1, row.x1) == (5, 10, 10, 12)


def test_cell_table_matches_regionprops_on_random_mask():
    from skimage.measure import regionprops_table

    rng = np.random.default_rng(0)
    lab = rng.integers(0, 40, size=(97, 83)).astype(np.int64) * 1000003  # gaps, big ids
    ref = pd.DataFrame(regionprops_table(lab, properties=("label", "area", "centroid", "bbox"))).set_index("label")
    t = cell_table(da.from_array(lab, chunks=(30, 20)), block=25)
    assert np.array_equal(t.index.to_numpy(), ref.index.to_numpy())
    np.testing.assert_allclose(t["y"], ref["centroid-0"])
    np.testing.assert_allclose(t["x"], ref["centroid-1"])
    np.testing.assert_array_equal(t["area"], ref["area"])
    np.testing.assert_array_equal(t[["y0", "x0", "y1", "x1"]].to_numpy(), ref[["bbox-0", "bbox-1", "bbox-2", "bbox-3"]].to_numpy())


@pytest.mark.parametrize("block", [7, 16, 4096])
def test_cell_table_runs_that_wrap_rows_or_split_a_cell(block):
    # the table is taken over runs along rows: a cell on the last column of one row and the
    # first of the next must stay two runs, and a U-shaped cell crosses a row in two runs
    from skimage.measure import regionprops_table

    lab = np.zeros((20, 16), np.uint32)
    lab[:, 15] = 5
    lab[:, 0] = 5  # the same id at both ends of every row
    lab[2:12, 3:12] = 9
    lab[2:9, 6:9] = 0  # U-shape: rows 2..8 cross cell 9 twice
    lab[14:20, 4:14] = np.arange(10, dtype=np.uint32)[None, :] % 3 + 20  # stripes, runs of length 1
    ref = pd.DataFrame(regionprops_table(lab.astype(np.int64), properties=("label", "area", "centroid", "bbox"))).set_index("label")
    t = cell_table(lab, block=block)
    assert np.array_equal(t.index.to_numpy(), ref.index.to_numpy())
    np.testing.assert_array_equal(t["area"], ref["area"])
    np.testing.assert_allclose(t["y"], ref["centroid-0"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(t["x"], ref["centroid-1"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(t[["y0", "x0", "y1", "x1"]].to_numpy(), ref[["bbox-0", "bbox-1", "bbox-2", "bbox-3"]].to_numpy())


def test_cell_table_empty_and_bad_masks():
    assert len(cell_table(np.zeros((5, 5), np.uint16))) == 0
    with pytest.raises(InputError, match="integers"):
        cell_table(np.zeros((5, 5), np.float32))
    with pytest.raises(InputError, match=">= 0"):
        cell_table(-np.ones((5, 5), np.int32))
    with pytest.raises(InputError, match="2-D"):
        cell_table(np.zeros((5, 5, 3), np.int32))


def test_cell_tile_is_square_of_max_side_around_centroid():
    boxes = cell_tile_boxes(cell_table(_two_cells()))
    np.testing.assert_array_equal(boxes, [[3.5, 2.0, 4.0], [10.5, 7.0, 5.0]])


def test_patch_grid_membership_and_eight_neighbours():
    xy = np.array([[0.0, 0.0], [9.0, 9.0], [10.0, 9.0], [25.0, 5.0]])
    grid, cell_patch = patch_grid((50, 30), 10, xy)
    ids = list(grid.ids)
    # pixel 9 is the last of patch 0, pixel 10 the first of patch 1
    assert [ids[i] for i in cell_patch] == ["r0_c0", "r0_c0", "r0_c1", "r0_c2"]
    # only occupied patches and their neighbours: rows 0 and 1 of the 5 x 3 grid
    assert sorted(ids) == sorted(f"r{r}_c{c}" for r in range(2) for c in range(3))
    grid, cell_patch = patch_grid((30, 30), 10, np.concatenate([xy, [[15.0, 15.0]]]))
    ids = list(grid.ids)
    assert len(grid) == 9
    centre = ids.index("r1_c1")
    np.testing.assert_allclose(grid.xy[centre], [14.5, 14.5])  # pixels 10..19
    nb = {ids[j] for j in grid.neighbours[centre] if j >= 0}
    assert nb == {f"r{r}_c{c}" for r in range(3) for c in range(3)} - {"r1_c1"}
    corner = ids.index("r0_c0")
    assert (grid.neighbours[corner] >= 0).sum() == 3
    boxes = spot_tile_boxes(grid)
    assert (boxes[:, 2] == 10).all()


def test_visium_neighbours_from_array_coordinates_and_from_positions():
    import anndata as ad

    rc = np.array([(r, c) for r in range(4) for c in range(r % 2, 8, 2)])
    pitch = 100.0
    xy = np.stack([rc[:, 1] * pitch / 2, rc[:, 0] * pitch * np.sqrt(3) / 2], axis=1)
    a = ad.AnnData(np.zeros((len(rc), 1), np.float32), obs=pd.DataFrame({"array_row": rc[:, 0], "array_col": rc[:, 1]}, index=[f"s{i}" for i in range(len(rc))]))
    a.obsm["spatial"] = xy
    a.uns["deepspot2cell_spots"] = {"diameter_px": 55.0}
    spots = spots_from_anndata(a)
    inner = [i for i, (r, c) in enumerate(rc) if 0 < r < 3 and 1 < c < 6]
    assert all((spots.neighbours[i] >= 0).sum() == 6 for i in inner)
    for i in inner:  # neighbours are exactly one pitch away
        d = np.linalg.norm(xy[spots.neighbours[i]] - xy[i], axis=1)
        np.testing.assert_allclose(d, pitch)
    by_pos = hex_neighbours(xy)
    for i in range(len(rc)):
        assert set(by_pos[i][by_pos[i] >= 0]) == set(spots.neighbours[i][spots.neighbours[i] >= 0])


def test_crop_resize_identity_offset_and_padding():
    img = torch.rand(3, 50, 60, dtype=torch.float64)
    box = np.array([[14.5, 9.5, 10.0]])  # pixels x 10..19, y 5..14
    torch.testing.assert_close(crop_resize(img, (0, 0), box, 10)[0], img[:, 5:15, 10:20])
    torch.testing.assert_close(crop_resize(img[:, 3:, 4:], (3, 4), box, 10)[0], img[:, 5:15, 10:20])
    # a box half off the top-left corner: the outside half is white
    out = crop_resize(img, (0, 0), np.array([[-0.5, 4.5, 10.0]]), 10)[0]
    torch.testing.assert_close(out[:, :, 5:], img[:, 0:10, 0:5])
    torch.testing.assert_close(out[:, :, :5], torch.ones(3, 10, 5, dtype=torch.float64))


def test_crop_resize_batch_equals_single_and_shrinking_is_smoothed():
    img = torch.rand(3, 80, 80)
    boxes = np.array([[20.0, 30.0, 17.0], [60.5, 10.5, 40.0], [40.0, 40.0, 64.0]])
    batch = crop_resize(img, (0, 0), boxes, 16)
    for i in range(3):
        torch.testing.assert_close(batch[i], crop_resize(img, (0, 0), boxes[i : i + 1], 16)[0])
    # a 64 px checkerboard shrunk to 8 px averages out to grey instead of aliasing
    yy, xx = np.mgrid[0:64, 0:64]
    board = torch.from_numpy(((yy + xx) % 2).astype(np.float32)).expand(3, 64, 64)
    small = crop_resize(board, (0, 0), np.array([[31.5, 31.5, 64.0]]), 8)
    assert small.std() < 0.05 and abs(small.mean() - 0.5) < 0.05


def test_box_extent_covers_boxes():
    y0, x0, y1, x1 = box_extent(np.array([[10.0, 20.0, 4.0], [30.0, 5.0, 10.0]]))
    assert y0 <= 0 and x0 <= 8 and y1 >= 22 and x1 >= 35
