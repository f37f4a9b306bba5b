"""Helpers of the reliability suite: the command line run as a real subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TRAIN_FAST = ["--max-epochs", "3", "--n-ensemble", "2", "--phi2rho-size", "16", "--device", "cpu", "--quiet"]


def cli_command(*args) -> list[str]:
    return [sys.executable, "-m", "napari_deepspot2cell.cli", *map(str, args)]


def cli_env(**extra) -> dict:
    """The test's environment (offline hub, private caches: see tests/conftest.py) plus ``extra``."""
    env = dict(os.environ)
    env.update({k: str(v) for k, v in extra.items()})
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_cli(*args, timeout=120, **env) -> subprocess.CompletedProcess:
    return subprocess.run(cli_command(*args), capture_output=True, text=True, timeout=timeout, env=cli_env(**env))


def popen_cli(*args, **env) -> subprocess.Popen:
    return subprocess.Popen(cli_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=cli_env(**env))


def predict_args(paths, ckpt, out, *extra) -> list:
    return ["predict", paths["slide"], "--labels", paths["labels"], "--checkpoint", ckpt, "--out", out, "--device", "cpu",
            "--quiet", *extra]


def train_args(paths, out, *extra) -> list:
    return ["train", paths["slide"], "--labels", paths["labels"], "--spots", paths["spots"], "--out", out, *TRAIN_FAST, *extra]


def part_files(folder: Path) -> list[Path]:
    """Temporaries of io.atomic.atomic_path: hidden ``.NAME.XXXX.part.SUFFIX`` files."""
    return sorted(p for p in Path(folder).rglob("*") if ".part" in p.name)


def counting_caches(monkeypatch) -> list:
    """Every EmbeddingCache the jobs open from now on (their .computed / .reused count chunks)."""
    import napari_deepspot2cell.predict as P

    made = []
    real = P.embedding_cache

    def counting(*a, **k):
        c = real(*a, **k)
        if c is not None:
            made.append(c)
        return c

    monkeypatch.setattr(P, "embedding_cache", counting)
    return made


def cache_folders(root: Path, kind: str) -> list[Path]:
    """The cache folders (under ``root``) of the tiles of ``kind`` ("cells" or "spots")."""
    import json

    return [f.parent for f in Path(root).glob("*/signature.json") if json.loads(f.read_text())["tiles"]["kind"] == kind]


def finished_chunks(folder: Path) -> int:
    return len(list(Path(folder).glob("c*.npy.sha256")))
