"""The DeepSpot2Cell module and its checkpoint format (no Qt, no napari)."""

from napari_deepspot2cell.model.checkpoint import (
    FORMAT,
    LoadedCheckpoint,
    load_checkpoint,
    save_checkpoint,
)
from napari_deepspot2cell.model.deepspot2cell import (
    AGGREGATES,
    CellOutput,
    DeepSpot2Cell,
    log1p_normalise,
    seed_everything,
)

__all__ = [
    "AGGREGATES",
    "FORMAT",
    "CellOutput",
    "DeepSpot2Cell",
    "LoadedCheckpoint",
    "load_checkpoint",
    "log1p_normalise",
    "save_checkpoint",
    "seed_everything",
]
