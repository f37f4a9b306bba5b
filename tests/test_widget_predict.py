"""The "Predict expression" widget in a real napari viewer, on generated tissue."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from helpers_gui import n_notes, notes_since, wait_done
from helpers_model import save_untrained_checkpoint

pytestmark = [pytest.mark.gui, pytest.mark.usefixtures("no_job_left_running")]


GENES = ["SIM_A", "SIM_B", "SIM_C", "SIM_D", "SIM_E"]


@pytest.fixture(scope="module")
def tissue():
    from napari_deepspot2cell.synthetic import make_tissue

    return make_tissue(3, shape=(256, 256))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_untrained_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.ckpt", GENES, um_per_px=0.5)


@pytest.fixture
def viewer(make_napari_viewer):
    return make_napari_viewer()


@pytest.fixture
def widget(viewer, checkpoint):
    from napari_deepspot2cell.widgets.predict import PredictWidget

    w = PredictWidget(viewer)
    viewer.window.add_dock_widget(w, name="Predict expression")
    w.checkpoint.setText(str(checkpoint))
    w.device.setCurrentText("cpu")
    return w


def _add_inputs(viewer, tissue, name="slide", translate=(0.0, 0.0), labels=None):
    um = tissue.um_per_px
    image = viewer.add_image(tissue.image, rgb=True, name=name, scale=(um, um), translate=translate)
    cells = viewer.add_labels(tissue.labels if labels is None else labels, name=f"{name} cells", scale=(um, um), translate=translate)
    return image, cells


def _pixel_of(labels, label):
    ys, xs = np.nonzero(labels == label)
    return int(ys[len(ys) // 2]), int(xs[len(xs) // 2])


def test_run_adds_the_painted_and_cells_layers(viewer, widget, tissue, qtbot):
    from napari_deepspot2cell.widgets.layers import CELLS_NAME, IMAGE_PREFIX, find_adata

    image, cells = _add_inputs(viewer, tissue, translate=(10.0, 20.0))
    widget.image_combo.set_layer(image)
    widget.labels_combo.set_layer(cells)
    before = list(viewer.layers)
    running = widget.run()
    assert running.worker is not None  # the real thread
    assert not widget.run_button.isEnabled() and widget.cancel_button.isEnabled()
    wait_done(qtbot, running)
    assert running.status == "ok", widget.status.text()
    assert widget.run_button.isEnabled() and not widget.cancel_button.isEnabled()

    new = [ly for ly in viewer.layers if ly not in before]
    assert [ly.name for ly in new] == [IMAGE_PREFIX + GENES[0], CELLS_NAME]
    painted, out_cells = new
    adata = widget.last_result
    assert find_adata(out_cells) is adata and widget.last_layers == (painted, out_cells)
    ids = np.unique(tissue.labels)
    ids = ids[ids > 0]
    assert adata.n_obs == len(ids) and list(adata.var_names) == GENES
    assert list(adata.obs["label"]) == list(ids)
    for layer in new:
        np.testing.assert_allclose(layer.scale, image.scale)
        np.testing.assert_allclose(layer.translate, image.translate)
    # the painted values are the AnnData's, cell by cell
    for label in (ids[0], ids[len(ids) // 2], ids[-1]):
        y, x = _pixel_of(tissue.labels, label)
        row = int(np.flatnonzero(adata.obs["label"].to_numpy() == label)[0])
        assert float(np.asarray(painted.data[y, x])) == pytest.approx(float(adata.X[row, 0]), rel=1e-6)
        assert int(np.asarray(out_cells.data[y, x])) == label
    assert np.isnan(np.asarray(painted.data[tissue.labels == 0])).all()
    # predictions differ between cells, and the status line says what was done
    assert adata.X[:, 0].std() > 0
    assert f"{adata.n_obs} cells" in widget.status.text()


def test_results_go_to_the_layers_chosen_at_press_time(viewer, widget, tissue, qtbot):
    from napari_deepspot2cell.widgets.layers import CELLS_NAME

    a_img, a_cells = _add_inputs(viewer, tissue, name="A", translate=(0.0, 0.0))
    other = np.where(tissue.labels > 0, tissue.labels + 1000, 0).astype(np.int32)
    b_img, b_cells = _add_inputs(viewer, tissue, name="B", translate=(500.0, 700.0), labels=other)
    widget.image_combo.set_layer(a_img)
    widget.labels_combo.set_layer(a_cells)
    running = widget.run()
    assert not running.done
    # the user switches both inputs while the job runs
    widget.image_combo.set_layer(b_img)
    widget.labels_combo.set_layer(b_cells)
    wait_done(qtbot, running)
    assert running.status == "ok"
    out_cells = next(ly for ly in viewer.layers if ly.name == CELLS_NAME)
    np.testing.assert_allclose(out_cells.translate, a_img.translate)
    np.testing.assert_array_equal(np.asarray(out_cells.data), tissue.labels)
    assert widget.last_result.obs["label"].max() < 1000  # computed from A's labels, not B's
    assert widget.image_layer is b_img  # the widget keeps the user's new choice


def test_cancel_during_a_real_run_leaves_the_layers_as_they_were(viewer, widget, qtbot):
    from napari_deepspot2cell.synthetic import make_tissue

    fresh = make_tissue(11, shape=(512, 512))  # nothing of it in the embedding cache
    image, cells = _add_inputs(viewer, fresh)
    widget.image_combo.set_layer(image)
    widget.labels_combo.set_layer(cells)
    before = [(ly, ly.name) for ly in viewer.layers]
    stages = []

    def on_event(event):
        stages.append(event.stage)
        if event.stage == "cells" and event.done == event.total:
            widget.cancel()

    running = widget.run()
    running._on_event = _chain(running._on_event, on_event)
    wait_done(qtbot, running)
    assert running.status == "cancelled"
    assert "prediction" not in stages  # it stopped early, not at the end
    assert [(ly, ly.name) for ly in viewer.layers] == before
    assert widget.last_result is None and "cancelled" in widget.status.text()
    assert widget.run_button.isEnabled()


def _chain(*fns):
    def call(event):
        for f in fns:
            if f is not None:
                f(event)

    return call


def test_a_file_that_is_not_a_checkpoint_is_one_notification_and_no_layers(viewer, widget, tissue, qtbot, tmp_path):
    bad = tmp_path / "not_a_model.ckpt"
    bad.write_bytes(b"this is not a checkpoint")
    image, cells = _add_inputs(viewer, tissue)
    widget.checkpoint.setText(str(bad))
    widget.image_combo.set_layer(image)
    widget.labels_combo.set_layer(cells)
    n, before = n_notes(), list(viewer.layers)
    running = widget.run()
    wait_done(qtbot, running)
    assert running.status == "error"
    notes = notes_since(n)
    assert len(notes) == 1 and "not_a_model.ckpt" in notes[0] and "\n" not in notes[0]
    assert list(viewer.layers) == before and widget.last_result is None
    assert widget.run_button.isEnabled()


def test_mismatched_mask_is_refused_before_running(viewer, widget, tissue):
    image, _ = _add_inputs(viewer, tissue)
    small = viewer.add_labels(tissue.labels[:100, :100], name="small")
    widget.image_combo.set_layer(image)
    widget.labels_combo.set_layer(small)
    n = n_notes()
    assert widget.run() is None
    notes = notes_since(n)
    assert len(notes) == 1 and notes[0].startswith("small:") and "same level-0 shape" in notes[0]


def test_pressing_run_twice_refuses_the_second_job(viewer, widget, tissue, qtbot):
    from napari_deepspot2cell.widgets import jobs
    from napari_deepspot2cell.widgets.layers import CELLS_NAME

    image, cells = _add_inputs(viewer, tissue)
    widget.image_combo.set_layer(image)
    widget.labels_combo.set_layer(cells)
    n_layers = len(viewer.layers)
    first = widget.run()
    n = n_notes()
    widget.run_button.setEnabled(True)  # even if the button were pressed again
    widget.run_button.click()
    assert jobs.BUSY_MESSAGE in notes_since(n)
    wait_done(qtbot, first)
    assert first.status == "ok"
    assert len(viewer.layers) == n_layers + 2
    assert [ly.name for ly in viewer.layers].count(CELLS_NAME) == 1


def test_token_is_stored_by_login_and_never_leaks(viewer, widget, tissue, qtbot, monkeypatch, caplog):
    from napari_deepspot2cell.widgets import predict as predict_widget

    fake = "hf_FAKEtoken0123456789abcdefSECRET"
    calls = []
    monkeypatch.setattr(predict_widget, "hf_login", lambda token: calls.append(token))
    widget.token.setText(fake)
    assert widget.token.echoMode() == widget.token.EchoMode.Password
    with caplog.at_level(logging.DEBUG):
        widget.login_button.click()
        assert calls == [fake] and widget.token.text() == ""
        assert "logged in" in widget.login_status.text()
        image, cells = _add_inputs(viewer, tissue)
        widget.image_combo.set_layer(image)
        widget.labels_combo.set_layer(cells)
        running = widget.run()
        wait_done(qtbot, running)
    assert running.status == "ok"
    for layer in viewer.layers:
        info = layer.metadata.get("deepspot2cell", {})
        shown = {k: v for k, v in info.items() if k != "adata"}  # the AnnData is checked below
        others = {k: v for k, v in layer.metadata.items() if k != "deepspot2cell"}
        assert fake not in repr(shown) and fake not in repr(others) and fake not in layer.name
    adata = widget.last_result
    assert fake not in repr(dict(adata.uns)) and fake not in repr(adata.obs.columns)
    assert all(fake not in r.getMessage() for r in caplog.records)
    assert fake not in widget.status.text()


def test_failed_login_does_not_echo_the_token(widget, monkeypatch):
    from napari_deepspot2cell.widgets import predict as predict_widget

    fake = "hf_anotherFAKEtoken42"

    def refuse(token):
        raise ValueError(f"Invalid token passed: {token}")

    monkeypatch.setattr(predict_widget, "hf_login", refuse)
    widget.token.setText(fake)
    n = n_notes()
    widget.log_in()
    notes = notes_since(n)
    assert len(notes) == 1 and "login failed" in notes[0] and fake not in notes[0]
    assert widget.token.text() == ""


def test_open_files_then_predict_records_the_paths(viewer, widget, tissue, qtbot, tmp_path):
    from napari_deepspot2cell.synthetic import write_files

    paths = write_files(tissue, tmp_path / "data")
    slide_layer = widget.open_slide_file(paths["slide"])
    assert slide_layer is not None and widget.image_layer is slide_layer and slide_layer.rgb
    np.testing.assert_allclose(slide_layer.scale, (tissue.um_per_px, tissue.um_per_px))
    mask_layer = widget.open_mask_file(paths["labels"])
    assert widget.labels_layer is mask_layer
    np.testing.assert_array_equal(np.asarray(mask_layer.data), tissue.labels)
    running = widget.run()
    wait_done(qtbot, running)
    assert running.status == "ok"
    info = widget.last_result.uns["deepspot2cell"]
    assert info["image_path"].endswith("slide.tif") and info["labels_path"].endswith("labels.tif")
    assert info["um_per_px"] == pytest.approx(tissue.um_per_px)


def test_a_mask_needs_a_slide_first(widget, tmp_path):
    np.save(tmp_path / "m.npy", np.zeros((8, 8), np.int32))
    n = n_notes()
    assert widget.open_mask_file(tmp_path / "m.npy") is None
    assert "slide first" in notes_since(n)[0]


def test_combos_follow_the_viewer_layers(viewer, widget, tissue):
    assert widget.image_combo.count() == 0 and widget.labels_combo.count() == 0
    gray = viewer.add_image(np.zeros((16, 16), np.uint8), name="gray")  # not RGB: not offered
    image, cells = _add_inputs(viewer, tissue, name="one")
    assert widget.image_combo.layers == [image] and widget.labels_combo.layers == [cells]
    image.name = "renamed"
    assert widget.image_combo.itemText(0) == "renamed"
    viewer.layers.remove(cells)
    assert widget.labels_combo.count() == 0 and widget.labels_layer is None
    assert gray not in widget.image_combo.layers


def test_device_label_says_what_will_run(widget):
    import torch

    widget.device.setCurrentText("cpu")
    assert widget.device_label.text() == f"CPU ({torch.get_num_threads()} threads)"
    if not torch.cuda.is_available():
        widget.device.setCurrentText("cuda")
        assert widget.device_label.text().startswith("unavailable")


def test_uncertainty_layer_on_demand(viewer, widget, tissue, qtbot):
    from napari_deepspot2cell.widgets.layers import UNCERTAINTY_PREFIX

    image, cells = _add_inputs(viewer, tissue)
    widget.image_combo.set_layer(image)
    widget.labels_combo.set_layer(cells)
    widget.uncertainty.setChecked(True)
    running = widget.run()
    wait_done(qtbot, running)
    unc = next(ly for ly in viewer.layers if ly.name == UNCERTAINTY_PREFIX + GENES[0])
    adata = widget.last_result
    label = int(adata.obs["label"].iloc[3])
    y, x = _pixel_of(tissue.labels, label)
    assert float(np.asarray(unc.data[y, x])) == pytest.approx(float(adata.layers["uncertainty"][3, 0]), rel=1e-6)
    widget.uncertainty.setChecked(False)
    assert unc not in viewer.layers
    widget.uncertainty.setChecked(True)
    assert any(ly.name == UNCERTAINTY_PREFIX + GENES[0] for ly in viewer.layers)


def test_in_memory_slide_adapter_pads_and_identifies(tissue):
    from napari_deepspot2cell.widgets.predict import ArraySlide

    s = ArraySlide([tissue.image], 0.5, name="x")
    assert s.shape == tissue.image.shape[:2]
    region = s.read_region(-4, -4, 8, 8)
    assert region.shape == (12, 12, 3) and (region[:4] == 255).all()
    np.testing.assert_array_equal(region[4:, 4:], tissue.image[:8, :8])
    other = tissue.image.copy()
    other[100, 100] ^= 1
    assert ArraySlide([other], 0.5).identity()["pixel_sha256"] != s.identity()["pixel_sha256"]
    assert ArraySlide([tissue.image.copy()], 0.5).identity()["pixel_sha256"] == s.identity()["pixel_sha256"]
