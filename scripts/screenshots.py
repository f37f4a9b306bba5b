"""Screenshots of the plugin in use for the README, taken in a real napari window.

    QT_QPA_PLATFORM=xcb xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py

Opens the shipped sample (File > Open Sample > DeepSpot2Cell demo), docks the
Gene browser on a gene, then the Predict widget and the Train widget, and walks
a new user's path through them: train a small model from the sample spots,
hand it to Predict with "Use in Predict", predict every cell with it (offline
encoder). Each step is saved to docs/images/, and the script fails if a step
gives no result.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import napari
from qtpy.QtWidgets import QApplication

OUT = Path(__file__).resolve().parents[1] / "docs" / "images"
GENE = "SIM_EPITHELIAL_TYPE_PROGRAM"


def settle(viewer, rounds: int = 20) -> None:
    for _ in range(rounds):
        QApplication.processEvents()


def save(viewer, name: str) -> None:
    settle(viewer)
    OUT.mkdir(parents=True, exist_ok=True)
    viewer.screenshot(str(OUT / name), canvas_only=False, flash=False)
    print(f"wrote {OUT / name}")


def main() -> int:
    from napari_deepspot2cell.sample import sample_paths
    from napari_deepspot2cell.widgets import jobs
    from napari_deepspot2cell.widgets.genes import GeneBrowser
    from napari_deepspot2cell.widgets.predict import PredictWidget
    from napari_deepspot2cell.widgets.train import TrainWidget

    jobs.SYNCHRONOUS = True  # a script has no user to wait for: run jobs to the end in turn
    viewer = napari.Viewer(title="napari-deepspot2cell")
    viewer.window._qt_window.resize(1600, 1000)
    viewer.open_sample("napari-deepspot2cell", "demo")
    spots = next(layer for layer in viewer.layers if type(layer).__name__ == "Points")
    spots.visible = False

    browser = GeneBrowser(viewer)
    dock = viewer.window.add_dock_widget(browser, name="Gene browser", area="right")
    browser.select_gene(GENE)
    viewer.reset_view()
    save(viewer, "napari_gene_browser.png")
    spots.visible = True
    save(viewer, "napari_spots_vs_cells.png")
    spots.visible = False
    viewer.window.remove_dock_widget(dock)

    predict = PredictWidget(viewer)
    predict_dock = viewer.window.add_dock_widget(predict, name="Predict expression", area="right")
    predict.set_checkpoint(sample_paths()["checkpoint"])
    save(viewer, "napari_predict_widget.png")
    viewer.window.remove_dock_widget(predict_dock)

    train = TrainWidget(viewer)
    train_dock = viewer.window.add_dock_widget(train, name="Train DeepSpot2Cell", area="right")
    with tempfile.TemporaryDirectory() as tmp:
        train.set_spots(sample_paths()["spots"])
        train.output.setText(str(Path(tmp) / "model.ckpt"))
        train.max_epochs.setValue(15)
        train.n_ensemble.setValue(3)
        train.hidden.setValue(128)
        train.lr.setText("1e-3")
        train.run()
        if train.last_result is None:
            raise SystemExit("training from the widget gave no checkpoint")
        save(viewer, "napari_train_widget.png")

        viewer.window.add_dock_widget(predict, name="Predict expression", area="right")
        train.use_in_predict()
        if Path(predict.checkpoint.text()) != Path(train.last_result.checkpoint):
            raise SystemExit("Use in Predict did not hand over the checkpoint")
        viewer.window.remove_dock_widget(train_dock)
        n_layers = len(viewer.layers)
        predict.run()
        if predict.last_result is None or len(viewer.layers) <= n_layers:
            raise SystemExit("Predict with the new checkpoint added no layers")
        print(f"predicted {predict.last_result.n_obs} cells with the checkpoint trained in the widget")
        save(viewer, "napari_predict_after_training.png")
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
