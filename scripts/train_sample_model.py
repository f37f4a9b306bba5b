#!/usr/bin/env python
"""Train the shipped sample checkpoint from the shipped spots with the offline encoder.

    python scripts/train_sample_model.py [--data sample_data] [--out sample_data/model.ckpt]

It runs the project's own training job (``train.iter_train``, default
``counts`` aggregation, spatial-block validation split, early stopping) on the
sample slide, its cell mask and its SIMULATED spot counts; the per-cell truth
is passed only so the checkpoint's metrics include cell-level Pearson (it is
never used for fitting). The model is kept small (``SAMPLE_MODEL``) so the
checkpoint ships inside the wheel. ``demo --train`` calls :func:`train_sample`
with the same settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # run from a checkout without installing


def main(argv=None) -> int:
    from napari_deepspot2cell.cli import ProgressPrinter
    from napari_deepspot2cell.demo import SAMPLE_MODEL, iter_train_sample
    from napari_deepspot2cell.progress import run
    from napari_deepspot2cell.sample import sample_paths

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=None, help="folder with the sample slide, mask, spots and truth (default: the package's)")
    p.add_argument("--out", default=str(REPO / "sample_data" / "model.ckpt"))
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: the user cache)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    paths = sample_paths(args.data, require=("slide", "labels", "spots", "cell_truth"))
    printer = ProgressPrinter()
    try:
        result = run(iter_train_sample(paths, Path(args.out), cache_dir=args.cache_dir, device=args.device), printer)
    finally:
        printer.close()
    m = result.metrics
    print(f"settings: {SAMPLE_MODEL}")
    print(f"best epoch {m['best_epoch']} of {m['epochs_run']} ({m['stopped']}); validation spot Pearson {m['val_spot_pearson']:.3f}")
    cell = (m.get("cell") or {}).get("all") or {}
    for where in ("inside", "outside"):
        if where in cell:
            print(f"cells {where}: model {cell[where]['model']['mean_pearson']:.3f}  nearest-spot baseline {cell[where]['baseline']['mean_pearson']:.3f}")
    out = Path(args.out)
    out.chmod(0o644)  # shipped: readable by all (temporary files are created 0600)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")
    # the metrics JSON and the loss plot beside it are not shipped
    for extra in (out.with_suffix(".metrics.json"), out.with_suffix(".loss.png")):
        if extra.exists() and out.parent.resolve() == (REPO / "sample_data").resolve():
            extra.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
