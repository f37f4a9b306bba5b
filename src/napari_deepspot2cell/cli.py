"""`deepspot2cell`: the command line over the same jobs the widgets run.

User errors end with exit status 2 and one line on stderr naming the file and
the problem; Ctrl-C stops within a batch (exit 130) and keeps finished cache
chunks; outputs appear at --out only when complete.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import Cancelled, InputError

EXIT_USAGE = 2
EXIT_CANCELLED = 130


class ProgressPrinter:
    """One tqdm bar per stage, on stderr."""

    def __init__(self, quiet: bool = False):
        self.quiet, self.bar, self.stage = quiet, None, None

    def __call__(self, event) -> None:
        if self.quiet:
            return
        from tqdm import tqdm

        if event.stage != self.stage:
            self.close()
            self.stage = event.stage
            self.bar = tqdm(total=event.total, desc=event.stage, unit="", dynamic_ncols=True, file=sys.stderr, leave=True)
        if self.bar.total != event.total:
            self.bar.total = event.total
        self.bar.n = event.done
        post = {k: v for k, v in event.info.items() if k in ("tiles_per_s", "train_loss", "val_loss", "batch_size")}
        if post:
            self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in post.items()}, refresh=False)
        if "device" in event.info and not getattr(self, "_said_device", False):
            self.bar.write(f"device: {event.info['device']}")
            self._said_device = True
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _drive(job, quiet: bool):
    from .progress import run

    printer = ProgressPrinter(quiet)
    try:
        return run(job, printer)
    finally:
        printer.close()


def _existing(path: str, what: str) -> str:
    if not Path(path).exists():
        raise InputError(path, f"{what} not found")
    return path


def _out_path(path: str, suffixes: tuple[str, ...]) -> Path:
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise InputError(path, f"--out must end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise InputError(path, "--out is a folder; give a file name")
    parent = out.parent if str(out.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise InputError(path, f"{parent} is not a folder")
    return out


def _centroid_columns(text: str | None):
    if not text:
        return None
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise InputError(None, f"--centroid-columns wants X_COLUMN,Y_COLUMN (x = image column), got {text!r}")
    return tuple(parts)


def _genes(path: str | None):
    if not path:
        return None
    _existing(path, "gene list")
    genes = [g.strip() for g in Path(path).read_text().splitlines() if g.strip()]
    if not genes:
        raise InputError(path, "the gene list is empty")
    return genes


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="H&E slide: TIFF, OME-TIFF, SVS, or PNG/JPEG")
    p.add_argument("--labels", required=True, help="cell mask: label image (TIFF/PNG/NPY), GeoJSON polygons, or a centroid table (CSV/parquet/h5ad)")
    p.add_argument("--encoder", default=None, help="foundation model: offline (default), uni, hoptimus0, phikonv2, a timm model name, or a weights file/folder")
    p.add_argument("--weights", default=None, help="local weights file or folder for --encoder")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"], help="auto = CUDA, then MPS, then CPU")
    p.add_argument("--batch-size", type=int, default=None, help="tiles per batch (default: from free device memory)")
    p.add_argument("--um-per-px", type=float, default=None, help="pixel size of the slide's level 0, overriding the file")
    p.add_argument("--cell-diameter-um", type=float, default=None, help="nominal cell diameter, for centroid tables")
    p.add_argument("--centroid-columns", default=None, metavar="X,Y", help="columns of a centroid table holding x (image column) and y (row)")
    p.add_argument("--cache-dir", default=None, help="embedding cache folder (default ~/.cache/napari-deepspot2cell/embeddings)")
    p.add_argument("--no-cache", action="store_true", help="do not read or write the embedding cache")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepspot2cell", description="Virtual single-cell expression from H&E with DeepSpot2Cell.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("predict", help="predict every cell's expression with a checkpoint")
    _add_common(p)
    p.add_argument("--checkpoint", required=True, help="DeepSpot2Cell checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output CELLS.h5ad")
    p.add_argument("--spots", default=None, help="optional spot data (h5ad or Space Ranger folder) to use as context instead of the patch grid")
    p.add_argument("--spot-diameter-um", type=float, default=None)
    p.add_argument("--genes", default=None, help="gene list (one per line) for reference checkpoints that lack one")

    from .demo import add_demo_arguments
    from .train import add_train_arguments

    add_train_arguments(sub.add_parser("train", help="train DeepSpot2Cell from spot counts"))
    add_demo_arguments(sub.add_parser("demo", help="run the whole method on the shipped sample data"))
    return parser


def cmd_predict(args) -> int:
    from .predict import iter_predict, write_cells

    out = _out_path(args.out, (".h5ad",))
    for path, what in ((args.image, "slide"), (args.labels, "cell mask"), (args.checkpoint, "checkpoint")):
        _existing(path, what)
    job = iter_predict(
        args.image, args.labels, args.checkpoint, encoder=args.encoder, weights=args.weights, device=args.device,
        batch_size=args.batch_size, um_per_px=args.um_per_px, cache_dir=False if args.no_cache else args.cache_dir,
        spots=args.spots, spot_diameter_um=args.spot_diameter_um, genes=_genes(args.genes),
        cell_diameter_um=args.cell_diameter_um, centroid_columns=_centroid_columns(args.centroid_columns),
    )
    adata = _drive(job, args.quiet)
    write_cells(adata, out)
    print(f"wrote {out} ({adata.n_obs} cells x {adata.n_vars} genes)")
    return 0


def cmd_train(args) -> int:
    from .train import cmd_train as run_train

    return run_train(args)


def cmd_demo(args) -> int:
    from .demo import cmd_demo as run_demo

    return run_demo(args)


COMMANDS = {"predict": cmd_predict, "train": cmd_train, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            return COMMANDS[args.command](args)
    except InputError as exc:
        print(f"deepspot2cell {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, Cancelled):
        print(f"deepspot2cell {args.command}: cancelled; finished embeddings stay in the cache and the next run resumes from them", file=sys.stderr)
        return EXIT_CANCELLED


if __name__ == "__main__":
    sys.exit(main())
