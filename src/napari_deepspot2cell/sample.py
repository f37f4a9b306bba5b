"""Where the shipped sample data live (inside the installed package).

``sample_paths()`` gives the files of ``sample_data/`` (see its README.md):
a real H&E slide (CMU-1 small region, CC0), its cell mask made by a simple
classical segmentation, SIMULATED Visium-like spot counts and per-cell truth,
and a DeepSpot2Cell checkpoint trained on those spots with the offline encoder.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from .errors import InputError

FILES = {
    "slide": "cmu_small_region.svs",
    "labels": "cmu_small_region_cells.tif",
    "spots": "spots.h5ad",
    "cell_truth": "cell_truth.h5ad",
    "checkpoint": "model.ckpt",
    "predictions": "predictions.h5ad",
}
KEYS = tuple(FILES)


def sample_folder() -> Path:
    """The package's ``sample_data`` folder (a real folder in wheels and in editable installs)."""
    root = resources.files("napari_deepspot2cell") / "sample_data"
    return Path(os.fspath(root))


def sample_paths(folder: str | os.PathLike | None = None, require: Iterable[str] = KEYS) -> dict[str, Path]:
    """Paths of the sample files, keyed slide, labels, spots, cell_truth, checkpoint.

    ``folder`` overrides the package's folder (the generator scripts use it).
    Every key in ``require`` must exist, else an InputError names the missing file.
    """
    base = Path(folder) if folder is not None else sample_folder()
    paths = {key: base / name for key, name in FILES.items()}
    for key in require:
        if key not in paths:
            raise KeyError(f"unknown sample file {key!r}; known: {', '.join(KEYS)}")
        if not paths[key].is_file():
            raise InputError(paths[key], f"sample {key} file missing; regenerate it with scripts/make_sample_data.py"
                                         f"{' and scripts/train_sample_model.py' if key == 'checkpoint' else ''} "
                                         "or reinstall napari-deepspot2cell")
    return paths
