"""Shared helpers for the reader tests: where the real data lives, synthetic H&E-like pictures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CMU1 = DATA / "cmu1_small_region" / "cmu_small_region.svs"
NCBI858_JPG = DATA / "xenium_lung_NCBI858" / "NCBI858.jpg"
NCBI858_H5AD = DATA / "xenium_lung_NCBI858" / "NCBI858.h5ad"


def need(path: Path) -> Path:
    """Skip the test (with the reason) when a real data file is not on this machine."""
    if not path.is_file():
        pytest.skip(f"real test data {path} is absent (the project's ../shared/data folder)")
    return path


def rgb_picture(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth pink-purple picture with noise: compresses like tissue, every pixel distinct enough to compare."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([180 + 40 * np.sin(yy / 37.0), 120 + 60 * np.cos(xx / 23.0), 170 + 30 * np.sin((xx + yy) / 51.0)],
                    axis=-1)
    return np.clip(base + rng.normal(0, 8, base.shape), 0, 255).astype(np.uint8)
