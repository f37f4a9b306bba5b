"""Pathology foundation models and the offline default behind one `Encoder` interface.

``get_encoder(name_or_path, token=None, weights=None)`` returns a frozen
``torch.nn.Module`` with ``id``, ``weights_hash``, ``dim`` and ``input_size``;
``forward(tiles (B, 3, S, S) float in [0, 1]) -> (B, dim) float32``.
"""

from .offline import OfflineEncoder
from .registry import (
    DEFAULT_ENCODER,
    PRESETS,
    Encoder,
    Preset,
    TimmEncoder,
    build_encoder,
    describe_encoders,
    get_encoder,
)

__all__ = [
    "DEFAULT_ENCODER",
    "PRESETS",
    "Encoder",
    "OfflineEncoder",
    "Preset",
    "TimmEncoder",
    "build_encoder",
    "describe_encoders",
    "get_encoder",
]
