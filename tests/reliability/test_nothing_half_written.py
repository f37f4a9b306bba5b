"""Nothing half-written: a run killed at any moment (a real SIGKILL or SIGINT to the
`deepspot2cell` process) leaves at --out either a complete, valid file or none, never
destroys an earlier file there, and leaves no temporary behind after Ctrl-C.

Failed (not killed) saves: tests/test_checkpoint.py::test_failed_save_keeps_the_earlier_file_and_leaves_no_temporary,
tests/test_predict_cli.py::test_failed_run_keeps_an_earlier_output.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from rel_helpers import part_files, popen_cli, predict_args, run_cli, train_args

import napari_deepspot2cell

SRC = Path(napari_deepspot2cell.__file__).resolve().parent
HIDDEN_PART = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.part(\.\w+)?$")
# writers of output files: their first argument must be the temporary of io.atomic.atomic_path
WRITERS = {"write_h5ad", "savefig", "to_csv", "imwrite", "to_parquet", "save", "write_text", "write_bytes", "dump"}


def _valid_h5ad(path: Path, n_obs: int) -> None:
    import anndata as ad

    a = ad.read_h5ad(path)
    assert a.n_obs == n_obs and np.isfinite(np.asarray(a.X)).all()


def _valid_ckpt(path: Path) -> None:
    from napari_deepspot2cell.model.checkpoint import load_checkpoint

    load_checkpoint(path)


def _kill_at(args, delay: float, sig: int) -> tuple[int, str, str]:
    proc = popen_cli(*args)
    time.sleep(delay)
    proc.send_signal(sig)
    try:
        out, err = proc.communicate(timeout=60)
    except Exception:
        proc.kill()
        raise
    return proc.returncode, out, err


def _check_folder(folder: Path, sig: int) -> None:
    parts = part_files(folder)
    if sig == signal.SIGINT:
        assert not parts, f"Ctrl-C left temporaries: {parts}"
    for p in parts:  # SIGKILL cannot clean up: then only hidden, recognisable names
        assert HIDDEN_PART.match(p.name), p.name
        p.unlink()


def test_every_output_is_written_through_atomic_path():
    """Static check over the package: each call that writes an output file writes the
    temporary yielded by ``atomic_path`` (a name bound by ``with atomic_path(...) as NAME``)."""
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        if path.name == "atomic.py" or "widgets" in path.parts:  # the widgets write through io/writers.py
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for fn in [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]:
            temps = {item.optional_vars.id for w in ast.walk(fn) if isinstance(w, ast.With) for item in w.items
                     if item.optional_vars is not None and isinstance(item.optional_vars, ast.Name)
                     and "atomic_path" in ast.unparse(item.context_expr)}
            for call in [c for c in ast.walk(fn) if isinstance(c, ast.Call) and isinstance(c.func, ast.Attribute)]:
                name = call.func.attr
                if name not in WRITERS:
                    continue
                owner = ast.unparse(call.func.value)
                if name in ("save", "dump") and owner not in ("torch", "np", "numpy", "json"):
                    continue
                pos = 1 if (name, owner) in (("save", "torch"), ("dump", "json")) else 0
                target = owner if name in ("write_text", "write_bytes") else (
                    ast.unparse(call.args[pos]) if len(call.args) > pos else "")
                if name == "save" and target == "buf":  # np.save into memory (cache chunks), then atomic_write_bytes
                    continue
                if target not in temps:
                    bad.append(f"{path.relative_to(SRC)}:{call.lineno}: {ast.unparse(call)[:90]}")
    # the weights-digest memo in encoders/weights.py writes its own tmp + os.replace (atomic, but
    # its tmp is not removed on failure): listed here so that any other offender fails the test
    known = [b for b in bad if b.startswith("encoders/weights.py") and "tmp.write_text" in b]
    assert len(known) == 1 and [b for b in bad if b not in known] == []


@pytest.mark.parametrize("command", ["predict", "train"])
def test_killed_runs_leave_a_complete_file_or_none_and_keep_the_earlier_one(command, tissue_files, checkpoint, tmp_path):
    tissue, paths = tissue_files
    rng = np.random.default_rng(20240 + (command == "train"))
    if command == "predict":
        out = tmp_path / "cells.h5ad"
        args = predict_args(paths, checkpoint, out, "--no-cache")
        valid = lambda p: _valid_h5ad(p, len(tissue.cells))  # noqa: E731
    else:
        out = tmp_path / "model.ckpt"
        args = train_args(paths, out, "--cache-dir", tmp_path / "cache")  # embeddings cached: kills land in training and writing
        valid = _valid_ckpt
    t0 = time.perf_counter()
    res = run_cli(*args)
    full = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr
    valid(out)
    earlier = tmp_path / "earlier"
    shutil.copy(out, earlier)
    n_kills = 4
    for i in range(n_kills):
        sig = (signal.SIGKILL, signal.SIGINT)[i % 2]
        keep_earlier = i % 4 < 2  # half the kills with an earlier file at --out, half without
        if keep_earlier:
            shutil.copy(earlier, out)
        else:
            out.unlink(missing_ok=True)
        delay = float(rng.uniform(0.3, 1.1 * full))
        rc, stdout, err = _kill_at(args, delay, sig)
        what = f"{command} killed by {signal.Signals(sig).name} after {delay:.2f} s of {full:.2f} s (rc {rc})"
        if keep_earlier:
            assert out.exists(), f"{what}: the earlier file was destroyed"
        if out.exists():
            valid(out)  # complete and valid: the earlier one, or a new one written whole
        if sig == signal.SIGINT and rc == -signal.SIGINT:
            # Python restores the default handler while it shuts down: a Ctrl-C then ends the
            # process, but only after the run has finished and said what it wrote
            assert "wrote" in stdout, what
        elif sig == signal.SIGINT and rc not in (0, 130):
            # Ctrl-C while Python itself starts (before main()) ends in the interpreter's own handler
            assert "KeyboardInterrupt" in err, what
        _check_folder(tmp_path, sig)
        for side in (out.with_suffix(".metrics.json"), out.with_suffix(".loss.png")):
            if command == "train" and side.exists():
                if side.suffix == ".json":
                    json.loads(side.read_text())
                else:
                    assert side.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # after all the kills, the next run still works
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    valid(out)
    assert not part_files(tmp_path)
