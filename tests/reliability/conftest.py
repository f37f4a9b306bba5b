"""Shared fixtures of the reliability suite: a small generated tissue written to files,
a checkpoint for it, and the files for the command line (helpers: rel_helpers.py)."""

from __future__ import annotations

import pytest

from napari_deepspot2cell import synthetic

GENES_N = 8


@pytest.fixture(scope="session")
def tissue_files(tmp_path_factory):
    """A 768 x 768 px generated tissue (~900 cells, ~20 spots) as slide/labels/spots/truth files."""
    tissue = synthetic.make_tissue(seed=0, shape=(768, 768), n_genes=GENES_N)
    folder = tmp_path_factory.mktemp("tissue")
    return tissue, synthetic.write_files(tissue, folder)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """An untrained (seeded) model for the offline encoder, saved in our checkpoint format."""
    from napari_deepspot2cell.encoders import get_encoder
    from napari_deepspot2cell.model import DeepSpot2Cell
    from napari_deepspot2cell.model.checkpoint import save_checkpoint

    enc = get_encoder("offline")
    model = DeepSpot2Cell(enc.dim, GENES_N, n_ensemble=2, phi2rho_size=16, seed=0)
    path = tmp_path_factory.mktemp("ckpt") / "model.ckpt"
    save_checkpoint(
        path, model, genes=[f"G{i}" for i in range(GENES_N)],
        encoder={"id": enc.id, "dim": enc.dim, "weights_hash": enc.weights_hash},
        geometry={"cell_tile": "max_side", "spot_kind": "grid", "patch_um": 100.0, "spot_tile_um": 100.0,
                  "neighbours": "grid8", "um_per_px": 0.5},
        target={"normalisation": "log1p_cp10k", "scale": 1e4},
    )
    return path


@pytest.fixture(scope="session")
def reference_prediction(tissue_files, checkpoint):
    """The prediction of the tissue with no cache at all: what every cached run must equal."""
    from napari_deepspot2cell.predict import iter_predict
    from napari_deepspot2cell.progress import run

    _, paths = tissue_files
    return run(iter_predict(paths["slide"], paths["labels"], checkpoint, device="cpu", cache_dir=False))
