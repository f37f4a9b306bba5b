"""A small untrained DeepSpot2Cell checkpoint for the offline encoder, saved by the project's own code."""

from pathlib import Path


def save_untrained_checkpoint(path: Path, genes: list[str], *, um_per_px: float) -> Path:
    from napari_deepspot2cell.encoders import get_encoder
    from napari_deepspot2cell.model import DeepSpot2Cell
    from napari_deepspot2cell.model.checkpoint import save_checkpoint

    enc = get_encoder("offline")
    model = DeepSpot2Cell(enc.dim, len(genes), n_ensemble=3, phi2rho_size=32, seed=0)
    save_checkpoint(
        path, model, genes=genes, encoder={"id": enc.id, "dim": enc.dim, "weights_hash": enc.weights_hash},
        geometry={"cell_tile": "max_side", "spot_kind": "grid", "patch_um": 47.6, "spot_tile_um": 47.6,
                  "neighbours": "grid8", "um_per_px": um_per_px},
        target={"normalisation": "log1p_cp10k", "scale": 1e4},
    )
    return path
