"""File > Open Sample > DeepSpot2Cell demo: slide, cells, spots and painted predictions."""

import numpy as np
import pytest

pytestmark = pytest.mark.gui


def test_open_sample_gives_slide_cells_spots_and_painted_predictions(make_napari_viewer):
    import anndata as ad

    from napari_deepspot2cell.sample import sample_paths

    viewer = make_napari_viewer()
    viewer.open_sample("napari-deepspot2cell", "demo")
    kinds = {type(layer).__name__ for layer in viewer.layers}
    assert {"Image", "Labels", "Points"} <= kinds
    slide = next(layer for layer in viewer.layers if layer.rgb)
    assert np.allclose(slide.scale, 0.499)
    cells = next(layer for layer in viewer.layers if type(layer).__name__ == "Labels")
    spots = next(layer for layer in viewer.layers if type(layer).__name__ == "Points")
    truth = ad.read_h5ad(sample_paths()["spots"])
    assert len(spots.data) == truth.n_obs and set(truth.var_names) <= set(spots.features.columns)
    assert spots.metadata["deepspot2cell"]["kind"] == "spots"
    # the painted layer shows the predicted value of the cell under a pixel
    adata = cells.metadata["deepspot2cell"]["adata"]
    painted = next(layer for layer in viewer.layers if layer.name.startswith("DeepSpot2Cell:"))
    gene = painted.metadata["deepspot2cell"]["gene"]
    lab0 = np.asarray(cells.data[0] if cells.multiscale else cells.data)
    paint0 = painted.data[0] if painted.multiscale else painted.data
    checked = 0
    for label, row in adata.obs.iloc[::97].iterrows():
        y, x = int(round(row["y"])), int(round(row["x"]))
        if lab0[y, x] != int(label):  # a concave cell whose centroid lies outside it
            continue
        assert np.isclose(float(np.asarray(paint0[y, x])), adata[label, gene].X.item(), atol=1e-5)
        checked += 1
    assert checked >= 10
