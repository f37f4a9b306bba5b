"""On-disk embedding cache, one `.npy` file per chunk of tiles.

The folder name is the hash of a signature that records the slide's identity
(path, size, mtime, a sample of its pixels), the encoder and its weights hash,
and the tiles themselves (their boxes hashed): any change lands in another
folder, so a stale embedding is never read. Chunks are written atomically, so
an interrupted run leaves only whole chunks and the next run resumes from them.
No pickle: chunks load with `allow_pickle=False`. Each chunk has a sidecar
`cNNNNNNN.npy.sha256` with the digest of its bytes, written after the chunk: a
chunk whose bytes were damaged in place (same shape, flipped bits) or that lost
its sidecar is dropped and recomputed, never used.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np

from ..io.atomic import atomic_write_bytes, atomic_write_text

CACHE_VERSION = 2  # 2: chunks carry a sha256 sidecar
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
                for f in [*self.folder.glob("c*.npy"), *self.folder.glob("c*.npy.sha256")]:
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
            data = path.read_bytes()
            # reliability: bytes damaged in place keep a valid header and shape; only the digest tells
            ok = _digest_path(path).read_text().strip() == hashlib.sha256(data).hexdigest()
            arr = np.load(io.BytesIO(data), allow_pickle=False) if ok else None
        except (OSError, ValueError, EOFError, UnicodeDecodeError):
            arr = None
        if arr is None or arr.shape != (n, dim) or arr.dtype != np.float32 or not np.isfinite(arr).all():
            self.drop(index)
            return None
        self.reused += 1
        return arr

    def drop(self, index: int) -> None:
        path = self._path(index)
        path.unlink(missing_ok=True)
        _digest_path(path).unlink(missing_ok=True)

    def put(self, index: int, arr: np.ndarray) -> None:
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=np.float32), allow_pickle=False)
        data = buf.getvalue()
        path = self._path(index)
        _digest_path(path).unlink(missing_ok=True)  # a chunk is valid only once its digest follows it
        atomic_write_bytes(path, data)
        atomic_write_text(_digest_path(path), hashlib.sha256(data).hexdigest() + "\n")
        self.computed += 1


def _digest_path(chunk: Path) -> Path:
    return chunk.with_name(chunk.name + ".sha256")
