"""GPU faults, injected on the CPU through the encoder's forward: out of memory halves
the batch down to 1, then stops with a message naming the memory needed; a device that
fails mid-run (device-side assert, launch failure) is one clear error, and the job
returns at once with its slide reader thread stopped.

The halving itself: tests/test_embed.py::test_out_of_memory_halves_the_batch_then_stops_with_a_message.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from napari_deepspot2cell.encoders import get_encoder
from napari_deepspot2cell.encoders.cache import EmbeddingCache
from napari_deepspot2cell.encoders.device import DeviceError
from napari_deepspot2cell.encoders.embed import _Reader, iter_embed
from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.geometry.tiles import cell_tile_boxes
from napari_deepspot2cell.io.slides import open_slide
from napari_deepspot2cell.progress import run


@pytest.fixture(scope="module")
def slide_boxes(tissue_files):
    tissue, paths = tissue_files
    slide = open_slide(paths["slide"])
    yield slide, cell_tile_boxes(tissue.cells)[:48]
    slide.close()


def _live_readers():
    return [t for t in threading.enumerate() if isinstance(t, _Reader) and t.is_alive()]


@pytest.mark.parametrize(
    "error, named",
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.50 GiB (GPU 0; 79.1 GiB total capacity)"),
         "tried to allocate 3.50 GiB"),
        (RuntimeError("CUDA error: out of memory"), "a batch of 1 tile(s) of 64 x 64 px did not fit"),
    ],
)
def test_out_of_memory_at_batch_one_names_the_memory_needed(slide_boxes, monkeypatch, error, named):
    slide, boxes = slide_boxes
    enc = get_encoder("offline")
    sizes = []

    def oom(x):
        sizes.append(len(x))
        raise error

    monkeypatch.setattr(enc, "forward", oom)
    with pytest.raises(InputError) as info:
        run(iter_embed(slide, boxes[:8], enc, device="cpu", batch_size=8))
    msg = str(info.value)
    assert sizes == [8, 4, 2, 1]
    assert "batch size 1" in msg and named in msg and "\n" not in msg, msg
    assert not _live_readers()


@pytest.mark.parametrize("text", ["CUDA error: device-side assert triggered",
                                  "CUDA error: unspecified launch failure",
                                  "AcceleratorError"])
def test_a_device_lost_mid_run_is_one_clear_error_and_nothing_hangs(slide_boxes, tmp_path, monkeypatch, text):
    slide, boxes = slide_boxes
    enc = get_encoder("offline")
    real = enc.forward
    calls = []

    def dies(x):
        calls.append(len(x))
        if len(calls) == 3:  # the device goes away after two good batches
            if text == "AcceleratorError":
                raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
            raise RuntimeError(text)
        return real(x)

    monkeypatch.setattr(enc, "forward", dies)
    cache = EmbeddingCache(tmp_path, {"slide": "s", "encoder": enc.id})
    threads_before = {t for t in threading.enumerate() if not t.daemon}
    t0 = time.monotonic()
    with pytest.raises(DeviceError) as info:
        run(iter_embed(slide, boxes, enc, device="cpu", batch_size=8, cache=cache, chunk=16))
    assert time.monotonic() - t0 < 30
    msg = str(info.value)
    assert isinstance(info.value, InputError)  # the CLI prints it as one line with exit status 2
    assert "device failed during embedding" in msg and "\n" not in msg and "rerun" in msg
    assert len(calls) == 3, "no retry on a failed device"
    assert not _live_readers()
    assert {t for t in threading.enumerate() if not t.daemon} <= threads_before
    assert cache.computed == 1  # the chunk finished before the fault is kept for the rerun


def test_a_device_error_from_the_cli_is_one_line_exit_2(tissue_files, checkpoint, tmp_path, monkeypatch, capsys):
    from napari_deepspot2cell import cli
    from napari_deepspot2cell.encoders.offline import OfflineEncoder

    _, paths = tissue_files

    def dies(self, x):
        raise RuntimeError("CUDA error: unspecified launch failure\nCUDA kernel errors might be asynchronously reported")

    monkeypatch.setattr(OfflineEncoder, "forward", dies)
    out = tmp_path / "cells.h5ad"
    t0 = time.monotonic()
    rc = cli.main(["predict", str(paths["slide"]), "--labels", str(paths["labels"]), "--checkpoint", str(checkpoint),
                   "--out", str(out), "--device", "cpu", "--quiet", "--no-cache"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unspecified launch failure" in err[0], err
    assert not out.exists() and time.monotonic() - t0 < 60
    assert not _live_readers()
