"""Batched embedding: the plan covers every tile once, results do not depend on
batching, the cache resumes and is never stale, out-of-memory halves the batch."""

import numpy as np
import pytest
import torch

from napari_deepspot2cell.encoders import get_encoder
from napari_deepspot2cell.encoders.cache import EmbeddingCache
from napari_deepspot2cell.encoders.embed import iter_embed, plan_tiles
from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.geometry.tiles import crop_resize
from napari_deepspot2cell.progress import run


class ArraySlide:
    """A slide held in memory, with the read_region contract of io.slides.Slide."""

    def __init__(self, rgb):
        self.rgb = rgb
        self.shape = rgb.shape[:2]
        self.reads = 0

    def read_region(self, y0, x0, y1, x1, level=0, fill=255):
        self.reads += 1
        out = np.full((y1 - y0, x1 - x0, 3), fill, np.uint8)
        h, w = self.shape
        sy0, sx0, sy1, sx1 = max(y0, 0), max(x0, 0), min(y1, h), min(x1, w)
        if sy1 > sy0 and sx1 > sx0:
            out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = self.rgb[sy0:sy1, sx0:sx1]
        return out


@pytest.fixture(scope="module")
def slide_and_boxes():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, size=(700, 900, 3), dtype=np.uint8)
    boxes = np.concatenate([rng.uniform(-10, 910, (300, 1)), rng.uniform(-10, 710, (300, 1)), rng.uniform(4, 60, (300, 1))], axis=1)
    boxes[:2, 2] = 400  # tiles wider than half a window are read alone
    return ArraySlide(rgb), boxes


def test_plan_covers_every_tile_once_within_its_window(slide_and_boxes):
    _, boxes = slide_and_boxes
    plan = plan_tiles(boxes, window=256, chunk=16)
    covered = np.concatenate([plan.order[s:e] for s, e in plan.chunks])
    assert sorted(covered.tolist()) == list(range(len(boxes)))
    for w in plan.windows:
        idx = np.concatenate([plan.order[slice(*plan.chunks[c])] for c in w.chunks])
        y0, x0, y1, x1 = w.extent
        half = boxes[idx, 2] / 2
        assert (boxes[idx, 0] - half >= x0).all() and (boxes[idx, 0] + half <= x1).all()
        assert (boxes[idx, 1] - half >= y0).all() and (boxes[idx, 1] + half <= y1).all()
        assert all(e - s <= 16 for s, e in (plan.chunks[c] for c in w.chunks))


def test_embeddings_equal_direct_crops_whatever_the_batching(slide_and_boxes):
    slide, boxes = slide_and_boxes
    enc = get_encoder("offline")
    direct = []
    img = torch.from_numpy(slide.rgb).permute(2, 0, 1).float() / 255
    with torch.inference_mode():
        for b in boxes:
            direct.append(enc(crop_resize(img, (0, 0), b[None], enc.input_size)).numpy()[0])
    direct = np.stack(direct)
    for bs, window, chunk in ((7, 256, 16), (512, 2048, 256)):
        got = run(iter_embed(slide, boxes, enc, device="cpu", batch_size=bs, window=window, chunk=chunk))
        np.testing.assert_allclose(got, direct, rtol=1e-3, atol=2e-3)  # float32 sampling grids differ per region


def test_cache_resumes_after_cancel_and_is_keyed_by_signature(slide_and_boxes, tmp_path):
    slide, boxes = slide_and_boxes
    enc = get_encoder("offline")
    sig = {"slide": "a", "encoder": enc.id}
    cache = EmbeddingCache(tmp_path, sig)
    job = iter_embed(slide, boxes, enc, device="cpu", batch_size=16, cache=cache, window=256, chunk=16)
    next(job)  # the cached-chunks event
    next(job)
    next(job)  # two chunks done
    job.close()  # what Cancel and Ctrl-C do
    assert cache.computed == 2
    n_chunks = len(plan_tiles(boxes, window=256, chunk=16).chunks)
    again = EmbeddingCache(tmp_path, sig)
    full = run(iter_embed(slide, boxes, enc, device="cpu", batch_size=16, cache=again, window=256, chunk=16))
    assert again.reused == 2 and again.computed == n_chunks - 2
    third = EmbeddingCache(tmp_path, sig)
    np.testing.assert_array_equal(run(iter_embed(slide, boxes, enc, device="cpu", cache=third, window=256, chunk=16)), full)
    assert third.computed == 0
    # a corrupted chunk is recomputed, never used
    chunk_file = sorted(third.folder.glob("c*.npy"))[0]
    chunk_file.write_bytes(chunk_file.read_bytes()[:50])
    fourth = EmbeddingCache(tmp_path, sig)
    np.testing.assert_array_equal(run(iter_embed(slide, boxes, enc, device="cpu", cache=fourth, window=256, chunk=16)), full)
    assert fourth.computed == 1
    # another signature (another slide, encoder or tile set) lands elsewhere
    assert EmbeddingCache(tmp_path, {**sig, "slide": "b"}).folder != third.folder


def test_out_of_memory_halves_the_batch_then_stops_with_a_message(slide_and_boxes, monkeypatch):
    slide, boxes = slide_and_boxes
    enc = get_encoder("offline")
    calls = []
    real = enc.forward

    def flaky(x):
        calls.append(len(x))
        if len(x) > 8:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(x)

    monkeypatch.setattr(enc, "forward", flaky)
    inside = boxes[(boxes[:, 0] > 0) & (boxes[:, 1] > 0) & (boxes[:, 2] < 100)][:40]  # one window
    got = run(iter_embed(slide, inside, enc, device="cpu", batch_size=64, window=4096))
    assert calls[:4] == [40, 20, 10, 5] and set(calls[4:]) == {5} and np.isfinite(got).all()

    def always(x):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(enc, "forward", always)
    with pytest.raises(InputError, match="batch size 1"):
        run(iter_embed(slide, boxes[:4], enc, device="cpu", batch_size=4))
