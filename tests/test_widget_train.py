"""The "Train DeepSpot2Cell" widget in a real napari viewer, on generated tissue with spots."""

from __future__ import annotations

import numpy as np
import pytest
from helpers_gui import n_notes, notes_since, wait_done

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("no_job_left_running")]


@pytest.fixture(scope="module")
def tissue_files(tmp_path_factory):
    from napari_deepspot2cell.synthetic import make_tissue, write_files

    tissue = make_tissue(5, shape=(768, 768), n_genes=8)
    return tissue, write_files(tissue, tmp_path_factory.mktemp("tissue"))


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def widget(viewer, tissue_files):
    from napari_deepspot2cell.widgets.train import TrainWidget

    tissue, paths = tissue_files
    w = TrainWidget(viewer)
    viewer.window.add_dock_widget(w, name="Train DeepSpot2Cell")
    um = tissue.um_per_px
    image = viewer.add_image(tissue.image, rgb=True, name="slide", scale=(um, um))
    cells = viewer.add_labels(tissue.labels, name="cells", scale=(um, um))
    w.image_combo.set_layer(image)
    w.labels_combo.set_layer(cells)
    w.set_spots(paths["spots"])
    w.device.setCurrentText("cpu")
    w.n_ensemble.setValue(2)
    w.hidden.setValue(32)
    w.lr.setText("1e-3")
    return w


def test_defaults_are_the_reference_ones(widget, tissue_files):
    from napari_deepspot2cell.widgets.train import TrainWidget

    fresh = TrainWidget(widget.viewer)
    assert fresh.aggregate.currentText() == "counts"
    assert fresh.max_epochs.value() == 100 and fresh.val_fraction.value() == pytest.approx(0.2)
    assert fresh.n_ensemble.value() == 10 and float(fresh.lr.text()) == 1e-4 and fresh.seed.value() == 0
    assert fresh.encoder.currentText() == "offline"
    _, paths = tissue_files
    fresh.set_spots(paths["spots"])
    assert fresh.output.text() == str(paths["spots"].with_name("spots.deepspot2cell.ckpt"))
    fresh.output.setText("/elsewhere/mine.ckpt")
    fresh.output.textEdited.emit("/elsewhere/mine.ckpt")  # as typed by the user
    fresh.set_spots(paths["truth"])
    assert fresh.output.text() == "/elsewhere/mine.ckpt"  # a typed output is kept
    fresh.deleteLater()


def test_trains_two_epochs_plots_the_losses_and_hands_over(viewer, widget, tissue_files, qtbot, tmp_path):
    from napari_deepspot2cell.model.checkpoint import load_checkpoint
    from napari_deepspot2cell.widgets.predict import PredictWidget

    tissue, _ = tissue_files
    out = tmp_path / "model.ckpt"
    widget.output.setText(str(out))
    widget.max_epochs.setValue(2)
    running = widget.run()
    assert running.worker is not None
    wait_done(qtbot, running, timeout=120000)
    assert running.status == "ok", widget.status.text()
    # the live plot got one point per epoch, for both losses
    assert widget.plot.epochs == [1, 2]
    assert np.isfinite(widget.plot.train).all() and np.isfinite(widget.plot.val).all()
    xs, ys = widget.plot.train_line.get_data()
    assert list(xs) == [1, 2] and len(ys) == 2
    np.testing.assert_allclose(widget.plot.train, widget.last_result.history["train_loss"])
    # the metrics table
    table = {widget.metrics_table.item(r, 0).text(): widget.metrics_table.item(r, 1).text()
             for r in range(widget.metrics_table.rowCount())}
    assert table["best epoch"].startswith(str(widget.last_result.metrics["best_epoch"])) and "of 2" in table["best epoch"]
    assert "spot Pearson, validation" in table
    # a real checkpoint
    ckpt = load_checkpoint(out)
    assert ckpt.genes == list(tissue.genes) and ckpt.encoder["id"] == "offline-he-v1"
    assert ckpt.hyper_parameters["n_ensemble"] == 2
    # hand it to a Predict widget of this viewer
    predict = PredictWidget(viewer)
    viewer.window.add_dock_widget(predict, name="Predict expression")
    assert widget.use_button.isEnabled()
    widget.use_button.click()
    assert predict.checkpoint.text() == str(out)


def test_use_in_predict_without_a_predict_widget_says_so(widget):
    from pathlib import Path

    widget.last_checkpoint = Path("/x/model.ckpt")
    n = n_notes()
    # other tests' Predict widgets are gone with their viewers
    from napari_deepspot2cell.widgets.predict import open_predict_widgets

    if open_predict_widgets(widget.viewer):
        pytest.skip("a Predict widget from another test is still alive")
    assert widget.use_in_predict() is None
    assert any("Predict expression" in m for m in notes_since(n))


def test_cancel_during_training_keeps_the_best_model(widget, qtbot, tmp_path):
    from napari_deepspot2cell.model.checkpoint import load_checkpoint

    out = tmp_path / "cancelled.ckpt"
    widget.output.setText(str(out))
    widget.max_epochs.setValue(5000)
    widget.patience.setValue(5000)
    running = widget.run()
    qtbot.waitUntil(lambda: len(widget.plot.epochs) >= 2, timeout=120000)
    widget.cancel_button.click()
    wait_done(qtbot, running, timeout=120000)
    assert running.status == "cancelled"
    assert out.is_file() and widget.last_checkpoint == out and widget.use_button.isEnabled()
    assert "best model so far" in widget.status.text()
    training = load_checkpoint(out).training
    assert training["stopped"] == "cancelled" and training["epochs_run"] < 5000


def test_bad_spot_data_is_one_notification(widget, qtbot, tmp_path):
    bad = tmp_path / "spots.h5ad"
    bad.write_bytes(b"not an h5ad")
    widget.set_spots(bad)
    widget.output.setText(str(tmp_path / "m.ckpt"))
    n = n_notes()
    running = widget.run()
    wait_done(qtbot, running, timeout=120000)
    assert running.status == "error"
    notes = notes_since(n)
    assert len(notes) == 1 and "spots.h5ad" in notes[0] and "\n" not in notes[0]
    assert not (tmp_path / "m.ckpt").exists()

    widget.set_spots(tmp_path / "missing.h5ad")
    n = n_notes()
    assert widget.run() is None
    assert [m for m in notes_since(n) if m.endswith("missing.h5ad: no such file or folder")]


def test_metrics_rows_read_the_training_metrics():
    from napari_deepspot2cell.widgets.train import metrics_rows

    m = {"best_epoch": 3, "epochs_run": 8, "stopped": "early stopping",
         "spot": {"validation": {"mean_pearson": 0.51234, "n_rows": 4}, "train": {"mean_pearson": float("nan"), "n_rows": 16}},
         "cell": {"validation": {"inside": {"model": {"mean_pearson": 0.7}, "baseline": {"mean_pearson": 0.2}}}}}
    rows = dict(metrics_rows(m))
    assert rows["best epoch"] == "3 of 8 (early stopping)"
    assert rows["spot Pearson, validation"] == "0.512 (4 spots)"
    assert rows["spot Pearson, train"] == "n/a (16 spots)"
    assert rows["cell Pearson, validation spots, inside"] == "0.700 (nearest spot 0.200)"
