"""Batched embedding of slide tiles: read a window, cut its tiles on the device, encode.

Tiles are ordered by slide window (serpentine), so each window of the slide is
read once; a reader thread fetches the next windows while the model runs. The
unit of work and of caching is a chunk of at most `chunk` tiles of one window.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import InputError
from ..geometry.tiles import box_extent, crop_resize, prepare_region
from ..progress import Job, Progress
from .cache import EmbeddingCache
from .device import (
    autocast, describe_device, device_failure, is_device_failure, is_out_of_memory, out_of_memory_needs, resolve_device,
)


@dataclass
class Window:
    extent: tuple[int, int, int, int]  # (y0, x0, y1, x1) read from the slide
    chunks: list[int] = field(default_factory=list)  # indices into Plan.chunks


@dataclass
class Plan:
    order: np.ndarray  # tile indices in processing order
    chunks: list[tuple[int, int]]  # [start, end) into order
    windows: list[Window]


def plan_tiles(boxes: np.ndarray, *, window: int = 2048, chunk: int = 256) -> Plan:
    """Group tiles by slide window; tiles wider than half a window are read alone."""
    n = len(boxes)
    big = boxes[:, 2] > window / 2
    wy = np.floor(boxes[:, 1] / window).astype(np.int64)
    wx = np.floor(boxes[:, 0] / window).astype(np.int64)
    wx_serp = np.where(wy % 2 == 0, wx, -wx)  # serpentine: neighbouring windows stay adjacent in time
    band = np.floor(boxes[:, 1] / 64).astype(np.int64)
    order = np.lexsort((boxes[:, 0], band, wx_serp, wy, big))
    # Runs of one window in processing order; every big tile is a run of its own.
    key = np.where(big, -1 - np.arange(n), wy * (int(wx.max()) + 1 - int(wx.min())) + (wx - int(wx.min()))) if n else wy
    ks = key[order]
    starts = np.concatenate([[0], np.flatnonzero(ks[1:] != ks[:-1]) + 1, [n]]) if n else np.array([0])
    chunks: list[tuple[int, int]] = []
    windows: list[Window] = []
    for start, end in zip(starts[:-1].tolist(), starts[1:].tolist()):
        win = Window(box_extent(boxes[order[start:end]]))
        for s in range(start, end, chunk):
            win.chunks.append(len(chunks))
            chunks.append((s, min(s + chunk, end)))
        windows.append(win)
    return Plan(order=order, chunks=chunks, windows=windows)


def default_batch_size(encoder, device: torch.device) -> int:
    side = int(encoder.input_size)
    if device.type != "cuda":
        return int(max(8, min(512, 2**22 // (side * side))))
    return _probe_cuda_batch(encoder, device)


def _probe_cuda_batch(encoder, device: torch.device) -> int:
    """Measure the memory of a small batch and scale to 60 % of what is free."""
    side = int(encoder.input_size)
    probe = 8
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    x = torch.rand(probe, 3, side, side, device=device)
    with torch.inference_mode(), autocast(device):
        encoder(x)
    per_tile = max((torch.cuda.max_memory_allocated(device) - base) / probe, 1.0)
    free, _ = torch.cuda.mem_get_info(device)
    fit = int(0.6 * free / per_tile)
    return int(2 ** int(np.clip(np.floor(np.log2(max(fit, 1))), 3, 10)))


class _Reader(threading.Thread):
    """Reads slide windows ahead of the model (decoding releases the GIL)."""

    def __init__(self, slide, windows: list[Window], depth: int = 2):
        super().__init__(daemon=True)
        self.slide, self.windows = slide, windows
        self.q: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()

    def run(self) -> None:
        for w in self.windows:
            if self.stop.is_set():
                return
            try:
                item = (w, self.slide.read_region(*w.extent))
            except BaseException as exc:  # handed to the consumer, which raises it
                item = (w, exc)
            while not self.stop.is_set():
                try:
                    self.q.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return

    def close(self) -> None:
        self.stop.set()
        self.join(timeout=5)


def _encode(encoder, tiles: torch.Tensor, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(), autocast(device):
        return encoder(tiles).float()


def iter_embed(
    slide,
    boxes: np.ndarray,
    encoder,
    *,
    device: str | torch.device = "auto",
    batch_size: int | None = None,
    cache: EmbeddingCache | None = None,
    stage: str = "embedding",
    window: int = 2048,
    chunk: int = 256,
) -> Job[np.ndarray]:
    """Job: embeddings (N, encoder.dim) float32 of the tiles `boxes` (N, 3) = (cx, cy, side)."""
    dev = resolve_device(device)
    encoder = encoder.to(dev).eval()
    n, dim, size = len(boxes), int(encoder.dim), int(encoder.input_size)
    out = np.zeros((n, dim), dtype=np.float32)
    if n == 0:
        return out
    plan = plan_tiles(boxes, window=window, chunk=chunk)
    todo: list[Window] = []
    done = 0
    for w in plan.windows:
        missing = []
        for ci in w.chunks:
            s, e = plan.chunks[ci]
            arr = cache.get(ci, e - s, dim) if cache is not None else None
            if arr is None:
                missing.append(ci)
            else:
                out[plan.order[s:e]] = arr
                done += e - s
        if missing:
            todo.append(Window(w.extent, missing))
    info = {"device": describe_device(dev), "cached": done}
    yield Progress(stage, done, n, info)
    if not todo:
        return out
    bs = batch_size or default_batch_size(encoder, dev)
    reader = _Reader(slide, todo)
    reader.start()
    t0, computed = time.perf_counter(), 0
    try:
        for _ in range(len(todo)):
            w, region = reader.q.get()
            if isinstance(region, BaseException):
                raise region
            y0, x0 = w.extent[0], w.extent[1]
            try:
                reg = prepare_region(region, dev)
            except Exception as exc:  # reliability: the copy to the device is where a lost GPU shows first
                if is_device_failure(exc) and not is_out_of_memory(exc):
                    raise device_failure(exc, dev) from None
                raise
            for ci in w.chunks:
                s, e = plan.chunks[ci]
                idx = plan.order[s:e]
                emb = np.empty((e - s, dim), dtype=np.float32)
                b0 = 0
                while b0 < e - s:
                    b1 = min(b0 + bs, e - s)
                    try:
                        tiles = crop_resize(reg, (y0, x0), boxes[idx[b0:b1]], size, shifted=True)
                        emb[b0:b1] = _encode(encoder, tiles, dev).cpu().numpy()
                    except Exception as exc:
                        if not is_out_of_memory(exc):
                            if is_device_failure(exc):  # reliability: a lost GPU is one clear line, not a traceback
                                raise device_failure(exc, dev) from None
                            raise
                        if dev.type == "cuda":
                            torch.cuda.empty_cache()
                        if bs == 1:
                            # reliability: name the memory that was needed (torch's "Tried to allocate X"),
                            # else the batch and tile size that did not fit
                            need = out_of_memory_needs(exc, b1 - b0, size, dev)
                            raise InputError(None, f"out of {dev.type.upper()} memory even at batch size 1 on {describe_device(dev)}: {need}; the encoder needs more memory than is free; close other jobs on this GPU or use --device cpu") from None
                        bs = max(1, (b1 - b0) // 2)  # halve what failed, not the nominal size
                        continue
                    b0 = b1
                out[idx] = emb
                if cache is not None:
                    cache.put(ci, emb)
                done += e - s
                computed += e - s
                rate = computed / max(time.perf_counter() - t0, 1e-9)
                yield Progress(stage, done, n, {**info, "batch_size": bs, "tiles_per_s": rate})
    finally:
        reader.close()
    return out
