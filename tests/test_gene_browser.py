"""The Gene browser widget in a real napari viewer."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
from helpers_gui import grid_cells
from qtpy.QtCore import QPoint, Qt

pytestmark = pytest.mark.gui

GENES = ["CD3E", "CD4", "MS4A1", "EPCAM", "KRT19", "PTPRC", "COL1A1", "ACTA2"]


def _predictions(labels_ids, genes=GENES, seed=0):
    rng = np.random.default_rng(seed)
    n = len(labels_ids)
    X = (rng.random((n, len(genes))) * 4).astype(np.float32)
    obs = pd.DataFrame(
        {"label": np.asarray(labels_ids), "x": rng.random(n) * 100, "y": rng.random(n) * 100},
        index=[str(i) for i in labels_ids],
    )
    adata = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=list(genes)))
    adata.layers["uncertainty"] = (X / 10 + 0.01).astype(np.float32)
    return adata


@pytest.fixture
def setup(make_napari_viewer, qtbot):
    from napari_deepspot2cell.widgets.genes import GeneBrowser
    from napari_deepspot2cell.widgets.layers import add_prediction_layers

    viewer = make_napari_viewer(show=True)
    labels, centres = grid_cells(id_step=3)  # ids not 1..n: rows are found by label
    adata = _predictions(sorted(centres))
    image, cells = add_prediction_layers(viewer, adata, labels, scale=0.5)
    widget = GeneBrowser(viewer)
    viewer.window.add_dock_widget(widget, name="Gene browser")
    return viewer, widget, adata, image, cells, centres


def _value_at(image, centres, label, um=0.5):
    y, x = centres[label]
    return image.get_value((y * um, x * um), world=True)


def test_finds_the_predictions_and_lists_all_genes(setup):
    viewer, widget, adata, image, cells, centres = setup
    assert widget.layer_combo.count() == 1 and widget.cells_layer is cells
    assert widget.visible_genes() == GENES
    assert widget.gene == GENES[0]


def test_search_filters_the_list(setup):
    _, widget, *_ = setup
    widget.search.setText("cd")
    assert widget.visible_genes() == ["CD3E", "CD4"]
    widget.search.setText("krt")
    assert widget.visible_genes() == ["KRT19"]
    widget.search.setText("")
    assert len(widget.visible_genes()) == len(GENES)


def test_filter_stays_correct_on_20000_genes(make_napari_viewer):
    from napari_deepspot2cell.widgets.genes import GeneBrowser
    from napari_deepspot2cell.widgets.layers import add_prediction_layers

    viewer = make_napari_viewer()
    labels, centres = grid_cells(2, 2, id_step=3)
    genes = [f"G{i:05d}" for i in range(20_000)]
    adata = _predictions(sorted(centres), genes=genes)
    add_prediction_layers(viewer, adata, labels)
    widget = GeneBrowser(viewer)
    assert widget.proxy.rowCount() == 20_000
    widget.search.setText("G1999")
    assert widget.visible_genes() == [f"G1999{i}" for i in range(10)]


def test_selecting_a_gene_repaints(setup):
    _, widget, adata, image, cells, centres = setup
    label = 12
    row = sorted(centres).index(label)
    j = GENES.index("EPCAM")
    widget.gene_list.setCurrentIndex(widget.proxy.index(j, 0))
    assert image.name == "DeepSpot2Cell: EPCAM"
    assert _value_at(image, centres, label) == pytest.approx(adata.X[row, j])
    assert "EPCAM" in cells.features.columns


def test_keyboard_down_steps_to_the_next_gene(setup, qtbot):
    _, widget, adata, image, cells, centres = setup
    widget.select_gene("CD4")
    widget.gene_list.setFocus()
    qtbot.keyClick(widget.gene_list, Qt.Key.Key_Down)
    assert widget.gene == "MS4A1" and image.name == "DeepSpot2Cell: MS4A1"
    row = sorted(centres).index(3)
    assert _value_at(image, centres, 3) == pytest.approx(adata.X[row, GENES.index("MS4A1")])
    qtbot.keyClick(widget.search, Qt.Key.Key_Down)  # also from the search box
    assert widget.gene == "EPCAM"
    qtbot.keyClick(widget.search, Qt.Key.Key_Up)
    assert widget.gene == "MS4A1"


def test_histogram_redraws_with_the_gene(setup):
    _, widget, adata, *_ = setup
    before = widget.hist_draws
    widget.select_gene("KRT19")
    assert widget.hist_draws > before
    assert widget.hist_ax.get_title() == "KRT19"
    heights = [p.get_height() for p in widget.hist_ax.patches]
    assert sum(heights) == adata.n_obs
    lo = min(p.get_x() for p in widget.hist_ax.patches)
    assert lo == pytest.approx(adata[:, "KRT19"].X.min(), rel=1e-5)


def test_uncertainty_toggle_adds_updates_and_removes_a_layer(setup):
    viewer, widget, adata, image, cells, centres = setup
    n = len(viewer.layers)
    widget.uncertainty.setChecked(True)
    assert len(viewer.layers) == n + 1
    unc = widget.uncertainty_layer
    assert unc is not None and unc.name == "DeepSpot2Cell uncertainty: CD3E"
    row = sorted(centres).index(6)
    assert _value_at(unc, centres, 6) == pytest.approx(adata.layers["uncertainty"][row, 0])
    widget.select_gene("PTPRC")
    assert unc.name == "DeepSpot2Cell uncertainty: PTPRC"
    assert _value_at(unc, centres, 6) == pytest.approx(adata.layers["uncertainty"][row, GENES.index("PTPRC")])
    assert list(viewer.layers).index(unc) < list(viewer.layers).index(cells)  # outlines stay on top
    widget.uncertainty.setChecked(False)
    assert widget.uncertainty_layer is None and len(viewer.layers) == n


def test_only_the_top_visible_painted_layer_shows_its_colorbar(setup):
    # napari puts every colorbar side by side, unlabelled: one bar, for what is on top
    from napari_deepspot2cell.widgets.layers import add_prediction_layers

    viewer, widget, adata, image, cells, centres = setup
    assert image.colorbar.visible
    widget.uncertainty.setChecked(True)
    unc = widget.uncertainty_layer
    assert unc.colorbar.visible and not image.colorbar.visible
    unc.visible = False
    assert image.colorbar.visible and not unc.colorbar.visible
    unc.visible = True
    assert unc.colorbar.visible and not image.colorbar.visible
    viewer.layers.move(list(viewer.layers).index(unc), 0)  # below the expression now
    assert image.colorbar.visible and not unc.colorbar.visible
    labels, _ = grid_cells(id_step=3)
    second, _ = add_prediction_layers(viewer, _predictions(sorted(centres), seed=1), labels, scale=0.5)
    assert second.colorbar.visible and not image.colorbar.visible and not unc.colorbar.visible
    viewer.layers.remove(second)
    assert image.colorbar.visible and not unc.colorbar.visible
    widget.uncertainty.setChecked(False)
    assert image.colorbar.visible


def test_spots_points_are_coloured_by_the_measured_gene(setup):
    viewer, widget, *_ = setup
    measured = pd.DataFrame({"CD4": [0.0, 1.0, 5.0], "KRT19": [5.0, 1.0, 0.0]})
    spots = viewer.add_points(
        np.array([[20.0, 20.0], [60.0, 60.0], [100.0, 100.0]]),
        features=measured,
        size=3,
        scale=(0.5, 0.5),
        metadata={"deepspot2cell": {"kind": "spots", "spot_diameter": 110.0}},
    )
    widget.select_gene("CD4")
    assert spots.face_color_mode == "colormap"
    brightness = spots.face_color[:, :3].sum(axis=1)
    assert brightness[0] < brightness[1] < brightness[2]  # magma: low values dark
    np.testing.assert_allclose(spots.size, 110.0)
    widget.select_gene("KRT19")
    brightness = spots.face_color[:, :3].sum(axis=1)
    assert brightness[0] > brightness[1] > brightness[2]


def test_clicking_a_cell_lists_its_top_genes(setup, qtbot):
    viewer, widget, adata, image, cells, centres = setup
    label = 15
    y, x = centres[label]
    viewer.camera.center = (y * 0.5, x * 0.5)
    viewer.camera.zoom = 4
    canvas = viewer.window._qt_viewer.canvas.native
    qtbot.mouseClick(canvas, Qt.MouseButton.LeftButton, pos=QPoint(canvas.width() // 2, canvas.height() // 2))
    qtbot.waitUntil(lambda: widget.cell_table.rowCount() > 0, timeout=3000)
    row = sorted(centres).index(label)
    expected = [GENES[j] for j in np.argsort(-adata.X[row])]
    shown = [widget.cell_table.item(r, 0).text() for r in range(widget.cell_table.rowCount())]
    assert shown == expected[: min(10, len(GENES))]
    assert str(label) in widget.cell_title.text()
    top = widget.show_cell(label)
    assert top[0] == (expected[0], pytest.approx(float(adata.X[row].max())))
    assert widget.show_cell(999) == [] and widget.cell_table.rowCount() == 0


def test_layer_combo_follows_the_viewer(setup):
    from napari_deepspot2cell.widgets.layers import add_prediction_layers

    viewer, widget, adata, image, cells, centres = setup
    labels2, centres2 = grid_cells(2, 3, id_step=3)
    adata2 = _predictions(sorted(centres2), genes=["X1", "X2"])
    image2, cells2 = add_prediction_layers(viewer, adata2, labels2)
    assert widget.layer_combo.count() == 2
    widget.layer_combo.setCurrentIndex(1)
    assert widget.cells_layer is cells2 and widget.visible_genes() == ["X1", "X2"]
    widget.select_gene("X2")
    assert image2.name == "DeepSpot2Cell: X2" and image.name.startswith("DeepSpot2Cell: CD3E")
    viewer.layers.remove(cells2)
    assert widget.layer_combo.count() == 1 and widget.cells_layer is cells
    assert widget.visible_genes() == GENES
