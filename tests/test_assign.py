"""The 60 % inside rule, cells to spots: hand-computed cases and a brute-force reference."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import scipy.sparse as sp

from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.geometry.assign import (
    assign_cells,
    iter_assign_cells,
    nearest_spot_baseline,
    spot_pitch,
)
from napari_deepspot2cell.geometry.cells import cell_table
from napari_deepspot2cell.geometry.spots import Spots, patch_grid
from napari_deepspot2cell.progress import Progress


def visium(xy, diameter, ids=None):
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    m = len(xy)
    return Spots(
        ids=np.array(ids if ids is not None else [f"s{i}" for i in range(m)], dtype=object),
        xy=xy,
        tile_px=float(diameter) if diameter else 1.0,
        kind="visium",
        neighbours=np.full((m, 6), -1, np.int64),
        diameter_px=diameter,
    )


def brute_force(labels, cells, spots):
    """(N, M) fraction of each cell's pixels in each disk, by direct counting."""
    r = (spots.diameter_px / 2.0) ** 2
    out = np.zeros((len(cells), len(spots)))
    for i, lab in enumerate(cells["label"].to_numpy()):
        rows, cols = np.nonzero(labels == lab)
        for j, (x, y) in enumerate(spots.xy):
            out[i, j] = np.count_nonzero((cols - x) ** 2 + (rows - y) ** 2 <= r) / rows.size
    return out


def edge_case(cols: tuple[int, int]):
    """A 5-row cell over columns [c0, c1) against a huge disk whose edge passes
    between columns 9 and 10 on rows 8..12 (centre x=100, y=10, radius 90.5)."""
    labels = np.zeros((20, 30), np.int32)
    labels[8:13, cols[0] : cols[1]] = 1
    spots = visium([(100.0, 10.0)], 181.0)
    return labels, cell_table(labels), spots


def test_disk_edge_is_where_the_hand_computation_puts_it():
    # rows 8..12: sqrt(90.5^2 - 2^2) = 90.478 > 90, so column 10 is in and column 9 out.
    labels, cells, spots = edge_case((0, 30))
    frac = brute_force(labels, cells, spots)[0, 0]
    assert frac == pytest.approx(20 / 30)


def test_exactly_half_inside_is_outside():
    labels, cells, spots = edge_case((6, 14))  # cols 6..13: 10..13 in, 4 of 8
    # one outside cell alone raises (no cell inside): add a cell deep in the disk
    labels[0:3, 20:23] = 2
    cells = cell_table(labels)
    a = assign_cells(labels, cells, spots)
    assert a.inside_fraction[0] == pytest.approx(0.5)
    assert not a.inside[0]
    assert a.inside[1] and a.inside_fraction[1] == 1.0
    # outside, but the spot's centre is within one pitch (one spot: the tile size): still its context
    assert a.spot[0] == 0
    assert a.cells_per_spot.tolist() == [1]


@pytest.mark.parametrize("cols, frac, inside", [((7, 17), 0.7, True), ((6, 16), 0.6, True), ((5, 14), 4 / 9, False)])
def test_fraction_threshold(cols, frac, inside):
    labels, cells, spots = edge_case(cols)
    labels[0:2, 25:27] = 2  # an inside cell, so outside cases do not raise
    cells = cell_table(labels)
    a = assign_cells(labels, cells, spots)
    assert a.inside_fraction[0] == pytest.approx(frac)
    assert bool(a.inside[0]) is inside


def test_cell_straddling_blocks():
    labels = np.zeros((16, 16), np.int32)
    labels[6:10, 6:10] = 1  # 4 x 4 cell across the four 8 x 8 blocks
    labels[0, 15] = 2  # single-pixel cells keep the median cell area small
    labels[15, 0] = 3
    labels[15, 15] = 4
    cells = cell_table(labels)
    # disk centre (7, 7), radius 2: cell pixels with dr, dc in -1..2 and dr^2 + dc^2 <= 4 -> 11
    spots = visium([(7.0, 7.0)], 4.0)
    for block in (8, 3, 4096):
        a = assign_cells(labels, cells, spots, block=block)
        assert a.inside_fraction[0] == pytest.approx(11 / 16), block
        assert a.inside.tolist() == [True, False, False, False]
        assert a.cells_per_spot.tolist() == [1]


def test_cell_touching_the_border_and_disk_leaving_the_image():
    labels = np.zeros((10, 12), np.int32)
    labels[0:4, 0:4] = 7  # corner cell
    labels[6:10, 8:12] = 9  # opposite corner cell
    cells = cell_table(labels)
    # radius 3 around (0, 0): r^2 + c^2 <= 9 on the 4 x 4 corner: 4 + 3 + 3 + 1 = 11 pixels
    # second disk centred outside the image at (x=13, y=11), radius 3
    spots = visium([(0.0, 0.0), (13.0, 11.0)], 6.0)
    a = assign_cells(labels, cells, spots, block=5)
    assert a.label.tolist() == [7, 9]
    assert a.inside_fraction[0] == pytest.approx(11 / 16)
    ref = brute_force(labels, cells, spots)
    assert ref[0, 0] == pytest.approx(11 / 16)
    assert a.inside[0]
    # cell 9 in disk 2: (c - 13)^2 + (r - 11)^2 <= 9 on r 6..9, c 8..11 holds only at (r 9, c 11)
    assert ref[1, 1] == pytest.approx(1 / 16)
    assert not a.inside[1]


def test_label_gaps_and_huge_ids():
    labels = np.zeros((40, 40), np.int64)
    ids = [5, 1000, 2**31 - 1, 2**40 + 3]
    for k, lab in enumerate(ids):
        labels[2 + 9 * k : 7 + 9 * k, 3:8] = lab  # 5 x 5 squares down column 5
    cells = cell_table(labels)
    assert cells["label"].tolist() == ids
    spots = visium([(5.0, 4.0), (5.0, 31.0)], 12.0)  # around the first and the last square
    a = assign_cells(labels, cells, spots, block=16)
    assert a.label.tolist() == ids
    ref = brute_force(labels, cells, spots)
    assert a.inside.tolist() == [True, False, False, True]
    assert a.spot[0] == 0 and a.spot[3] == 1
    np.testing.assert_allclose(a.inside_fraction[[0, 3]], ref[[0, 3], [0, 1]])
    # the dask path gives the same
    b = assign_cells(da.from_array(labels, chunks=(7, 11)), cells, spots, block=16)
    np.testing.assert_array_equal(a.spot, b.spot)
    np.testing.assert_array_equal(a.inside_fraction, b.inside_fraction)


def random_mask(seed, shape=(70, 90), n_seeds=60):
    """Voronoi cells cut to random radii: a label image with gaps in the ids."""
    rng = np.random.default_rng(seed)
    h, w = shape
    seeds = rng.uniform((0, 0), (h, w), size=(n_seeds, 2))
    radius = rng.uniform(2.0, 6.0, n_seeds)
    rr, cc = np.mgrid[0:h, 0:w]
    d = np.hypot(rr[..., None] - seeds[:, 0], cc[..., None] - seeds[:, 1])
    owner = d.argmin(-1)
    keep = d.min(-1) <= radius[owner]
    ids = rng.choice(np.arange(1, 10_000), n_seeds, replace=False)
    return np.where(keep, ids[owner], 0).astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_agrees_with_brute_force(seed):
    labels = random_mask(seed)
    cells = cell_table(labels)
    rng = np.random.default_rng(100 + seed)
    spots = visium(rng.uniform((-5, -5), (95, 75), size=(14, 2)), 18.5)
    ref = brute_force(labels, cells, spots)
    for block in (16, 4096):
        a = assign_cells(labels, cells, spots, block=block)
        best = ref.argmax(1)
        best_frac = ref.max(1)
        want_inside = best_frac >= 0.6
        np.testing.assert_array_equal(a.inside, want_inside)
        np.testing.assert_array_equal(a.spot[want_inside], best[want_inside])
        np.testing.assert_allclose(a.inside_fraction[want_inside], best_frac[want_inside])
        # outside cells: the nearest spot centre within one pitch, and the fraction in it
        pitch = spot_pitch(spots)
        d = np.hypot(cells["x"].to_numpy()[:, None] - spots.xy[:, 0], cells["y"].to_numpy()[:, None] - spots.xy[:, 1])
        near = d.argmin(1)
        far = d.min(1) > pitch
        out = ~want_inside
        np.testing.assert_array_equal(a.spot[out & far], -1)
        np.testing.assert_array_equal(a.spot[out & ~far], near[out & ~far])
        np.testing.assert_allclose(a.inside_fraction[out & ~far], ref[out & ~far, near[out & ~far]])
        assert (a.inside_fraction[out & far] == 0).all()
        np.testing.assert_array_equal(a.cells_per_spot, np.bincount(best[want_inside], minlength=len(spots)))


def test_overlapping_disks_pick_the_larger_fraction():
    labels = np.zeros((20, 20), np.int32)
    labels[8:12, 8:12] = 1
    cells = cell_table(labels)
    # the first disk holds the whole cell, the second 12 of its 16 pixels: both >= 60 %
    spots = visium([(9.5, 9.5), (13.0, 9.5)], 9.0)
    ref = brute_force(labels, cells, spots)[0]
    assert ref[0] == 1.0 and ref[1] == 0.75
    a = assign_cells(labels, cells, spots)
    assert a.spot[0] == 0 and a.inside_fraction[0] == 1.0
    assert a.cells_per_spot.tolist() == [1, 0]


def test_grid_kind_context_is_the_centroid_patch():
    labels = random_mask(5, shape=(64, 96), n_seeds=50)
    cells = cell_table(labels)
    xy = cells[["x", "y"]].to_numpy()
    grid, cell_patch = patch_grid(labels.shape, 16, xy, spot_diameter_px=12.0)
    a = assign_cells(labels, cells, grid, block=20)
    np.testing.assert_array_equal(a.spot, cell_patch)
    ref = brute_force(labels, cells, grid)
    own = ref[np.arange(len(cells)), cell_patch]
    np.testing.assert_allclose(a.inside_fraction, own)
    np.testing.assert_array_equal(a.inside, own >= 0.6)
    assert a.inside.any() and not a.inside.all()
    np.testing.assert_array_equal(a.cells_per_spot, np.bincount(cell_patch[own >= 0.6], minlength=len(grid)))
    # without a disk (inference grid) nobody is inside, the context stays, nothing raises
    grid0, _ = patch_grid(labels.shape, 16, xy)
    b = assign_cells(labels, cells, grid0)
    np.testing.assert_array_equal(b.spot, cell_patch)
    assert not b.inside.any() and (b.inside_fraction == 0).all()
    assert b.cells_per_spot.sum() == 0


def test_visium_hex_kind_and_far_cells():
    # a hex layout of pitch 20 px with 11 px disks on the left, a cell far to the right
    pitch = 20.0
    xy = [(10 + c * pitch / 2, 10 + r * pitch * np.sqrt(3) / 2) for r in range(3) for c in range(r % 2, 6, 2)]
    spots = visium(xy, 11.0)
    assert spot_pitch(spots) == pytest.approx(pitch)
    labels = np.zeros((60, 200), np.int32)
    x0, y0 = spots.xy[0]
    labels[int(y0) - 1 : int(y0) + 2, int(x0) - 1 : int(x0) + 2] = 1  # inside spot 0
    labels[8:12, 20:22] = 2  # between spots 0 and 1: outside, context nearest
    labels[30:33, 180:183] = 3  # far from every spot
    cells = cell_table(labels)
    a = assign_cells(labels, cells, spots)
    assert a.inside.tolist() == [True, False, False]
    assert a.spot[0] == 0
    d = np.hypot(spots.xy[:, 0] - cells["x"].iloc[1], spots.xy[:, 1] - cells["y"].iloc[1])
    assert a.spot[1] == d.argmin()
    assert a.spot[2] == -1 and a.inside_fraction[2] == 0


def test_progress_events_per_block():
    labels = random_mask(3, shape=(40, 50))
    cells = cell_table(labels)
    spots = visium([(10, 10), (30, 20), (45, 35)], 16.0)
    job = iter_assign_cells(labels, cells, spots, block=16)
    events = []
    while True:
        try:
            events.append(next(job))
        except StopIteration as stop:
            result = stop.value
            break
    assert all(isinstance(e, Progress) and e.stage == "assigning cells" for e in events)
    assert [e.done for e in events] == list(range(1, 3 * 4 + 1))
    assert {e.total for e in events} == {12}
    ref = assign_cells(labels, cells, spots)
    np.testing.assert_array_equal(result.spot, ref.spot)


def test_no_cell_inside_raises():
    labels, cells, spots = edge_case((6, 14))  # 50 %: outside
    with pytest.raises(InputError, match="no cell lies >= 60 % inside any spot"):
        assign_cells(labels, cells, spots)
    far = visium([(500.0, 500.0)], 40.0)
    with pytest.raises(InputError, match="check the pixel size"):
        assign_cells(labels, cells, far)


def test_spots_smaller_than_cells_raises():
    labels = np.zeros((50, 50), np.int32)
    labels[5:25, 5:25] = 1  # 400 px: equivalent diameter 22.6 px
    labels[26:46, 26:46] = 2
    cells = cell_table(labels)
    with pytest.raises(InputError, match=r"spots are smaller than cells: spot diameter 20.0 px against a median cell diameter 22.6 px"):
        assign_cells(labels, cells, visium([(15, 15)], 20.0))
    # a disk of 23 px (415 px^2) is larger than the median cell: no such error
    a = assign_cells(labels, cells, visium([(14.5, 14.5)], 23.0))
    assert a.inside[0]


def test_nearest_spot_baseline():
    spots = visium([(0, 0), (10, 0), (0, 10)], 4.0)
    values = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
    cells_xy = np.array([[1, 1], [9, 2], [2, 7], [100, 90]])
    out = nearest_spot_baseline(cells_xy, spots, values)
    np.testing.assert_array_equal(out, values[[0, 1, 2, 1]])
    np.testing.assert_array_equal(nearest_spot_baseline(cells_xy, spots, sp.csr_matrix(values)), out)
    with pytest.raises(ValueError):
        nearest_spot_baseline(cells_xy, spots, values[:2])
