"""On-disk embedding cache, one `.npy` file per chunk of tiles.

The folder name is the hash of a signature that records the slide's identity
(path, size, mtime, a sample of its pixels), the encoder and its weights hash,
and the tiles themselves (their boxes hashed): any change lands in another
folder, so a stale embedding is never read. Chunks are written atomically, so
an interrupted run leaves only whole chunks and the next run resumes from them.
No pickle: chunks load with `allow_pickle=False`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_path, atomic_write_text

CACHE_VERSION = 1
ENV_VAR = "DEEPSPOT2CELL_CACHE"


def default_cache_root() -> Path:
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "napari-deepspot2cell" / "embeddings"


def boxes_digest(boxes: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(boxes, dtype=np.float64).tobytes()).hexdigest()


class EmbeddingCache:
    def __init__(self, root: str | os.PathLike, signature: dict):
        self.signature = {"cache_version": CACHE_VERSION, **signature}
        text = json.dumps(self.signature, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:24]
        self.folder = Path(root) / self.key
        self.folder.mkdir(parents=True, exist_ok=True)
        sig_file = self.folder / "signature.json"
        if sig_file.exists():
            try:
                stored = json.loads(sig_file.read_text())
            except (OSError, ValueError):
                stored = None
            if stored != json.loads(text):  # a hash collision or a damaged folder: start over
                for f in self.folder.glob("c*.npy"):
                    f.unlink()
                atomic_write_text(sig_file, text)
        else:
            atomic_write_text(sig_file, text)
        self.computed = 0  # chunks computed (not read) in this session: tests count these
        self.reused = 0

    def _path(self, index: int) -> Path:
        return self.folder / f"c{index:07d}.npy"

    def get(self, index: int, n: int, dim: int) -> np.ndarray | None:
        """The chunk's embeddings, or None when absent, truncated or malformed (then it is dropped)."""
        path = self._path(index)
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            path.unlink(missing_ok=True)
            return None
        if arr.shape != (n, dim) or arr.dtype != np.float32 or not np.isfinite(arr).all():
            path.unlink(missing_ok=True)
            return None
        self.reused += 1
        return arr

    def put(self, index: int, arr: np.ndarray) -> None:
        with atomic_path(self._path(index)) as tmp:
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
        self.computed += 1
