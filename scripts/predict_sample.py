"""Predict every cell of the shipped sample with the shipped checkpoint and save
`sample_data/predictions.h5ad`, which File > Open Sample paints at once.

    python scripts/predict_sample.py

Paths inside the file are relative to `sample_data/`, so it works wherever the
package is installed. Run after `train_sample_model.py`.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from napari_deepspot2cell.predict import iter_predict, write_cells
from napari_deepspot2cell.progress import run
from napari_deepspot2cell.sample import FILES, sample_paths


def main() -> int:
    paths = sample_paths(require=("slide", "labels", "checkpoint"))
    with tempfile.TemporaryDirectory() as cache:
        adata = run(iter_predict(paths["slide"], paths["labels"], paths["checkpoint"], device="cpu", cache_dir=cache))
    meta = adata.uns["deepspot2cell"]
    meta["image_path"], meta["labels_path"], meta["checkpoint"] = FILES["slide"], FILES["labels"], FILES["checkpoint"]
    out = Path(paths["slide"]).parent / FILES["predictions"]
    write_cells(adata, out)
    out.chmod(0o644)
    print(f"wrote {out} ({adata.n_obs} cells x {adata.n_vars} genes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
