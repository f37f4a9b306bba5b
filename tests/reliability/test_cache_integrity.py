"""Cache integrity: a stale or damaged embedding is never used. Each change below lands
in a recompute, and the result always equals a run without any cache.

Truncated chunk and other signatures at the unit level: tests/test_embed.py::test_cache_resumes_after_cancel_and_is_keyed_by_signature.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import tifffile

from napari_deepspot2cell.encoders import get_encoder
from napari_deepspot2cell.encoders.embed import iter_embed
from napari_deepspot2cell.encoders.offline import OfflineEncoder
from napari_deepspot2cell.geometry.tiles import cell_tile_boxes
from napari_deepspot2cell.io.slides import open_slide
from napari_deepspot2cell.predict import embedding_cache
from napari_deepspot2cell.progress import run

CHUNK = 32  # small chunks: several per test, each cheap


def _embed(slide, boxes, enc, root):
    cache = embedding_cache(root, slide, enc, boxes, "cells") if root is not False else None
    emb = run(iter_embed(slide, boxes, enc, device="cpu", cache=cache, chunk=CHUNK))
    return emb, cache


@pytest.fixture(scope="module")
def setup(tissue_files):
    tissue, _ = tissue_files
    boxes = cell_tile_boxes(tissue.cells)[:128]
    return tissue, boxes, get_encoder("offline")


def _write_slide(path, image, um_per_px):
    px_per_cm = 1e4 / um_per_px
    # uncompressed: an edit of the pixels keeps the file's size exactly
    tifffile.imwrite(path, image, photometric="rgb", tile=(128, 128), resolution=(px_per_cm, px_per_cm),
                     resolutionunit="CENTIMETER", metadata=None)


def test_a_slide_edited_in_place_with_its_size_and_mtime_restored_is_recomputed(setup, tmp_path):
    tissue, boxes, enc = setup
    path = tmp_path / "slide.tif"
    _write_slide(path, tissue.image, tissue.um_per_px)
    with open_slide(path) as slide:
        first, c1 = _embed(slide, boxes, enc, tmp_path / "cache")
    assert c1.computed > 0
    st = os.stat(path)
    edited = tissue.image.copy()
    # away from the pixel-sample windows of Slide.identity (a 4 x 4 grid of 32 px windows), on cells
    edited[100:220, 100:220] = 255 - edited[100:220, 100:220]
    _write_slide(path, edited, tissue.um_per_px)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    st2 = os.stat(path)
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    with open_slide(path) as slide:
        again, c2 = _embed(slide, boxes, enc, tmp_path / "cache")
        truth, _ = _embed(slide, boxes, enc, False)
    assert c2.reused == 0 and c2.computed == c1.computed
    np.testing.assert_array_equal(again, truth)
    assert not np.allclose(first, truth)  # the edit did change embeddings: a stale cache would show


class _Variant(OfflineEncoder):
    """Another encoder of the same dim: scaled features, another id (or only other weights)."""

    def __init__(self, id_, weights_hash, scale=2.0):
        super().__init__()
        self.id, self.weights_hash, self.scale = id_, weights_hash, scale

    def forward(self, tiles):
        return super().forward(tiles) * self.scale


@pytest.mark.parametrize("what", ["another encoder", "other weights of the same encoder", "other cells"])
def test_another_encoder_or_other_tiles_are_recomputed(setup, tissue_files, tmp_path, what):
    tissue, boxes, enc = setup
    _, paths = tissue_files
    with open_slide(paths["slide"]) as slide:
        _, c1 = _embed(slide, boxes, enc, tmp_path)
        other_enc, other_boxes = enc, boxes
        if what == "another encoder":
            other_enc = _Variant("offline-variant", enc.weights_hash)
        elif what == "other weights of the same encoder":
            other_enc = _Variant(enc.id, "another-hash")
        else:
            other_boxes = boxes.copy()
            other_boxes[5, 0] += 1.0  # one cell moved by one pixel
        got, c2 = _embed(slide, other_boxes, other_enc, tmp_path)
        truth, _ = _embed(slide, other_boxes, other_enc, False)
    assert c2.folder != c1.folder and c2.reused == 0 and c2.computed == c1.computed
    np.testing.assert_array_equal(got, truth)


def _flip_payload(path):
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x40  # a bit of a float in the data, not the header: shape and dtype stay valid
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "bit flip in the data", "digest lost", "garbage", "empty",
                                    "signature damaged"])
def test_a_damaged_cache_file_is_recomputed_never_used(setup, tissue_files, tmp_path, damage):
    tissue, boxes, enc = setup
    _, paths = tissue_files
    with open_slide(paths["slide"]) as slide:
        full, c1 = _embed(slide, boxes, enc, tmp_path)
        chunk = sorted(c1.folder.glob("c*.npy"))[1]
        n_chunks = c1.computed
        if damage == "truncated":
            chunk.write_bytes(chunk.read_bytes()[:-100])
        elif damage == "bit flip in the data":
            _flip_payload(chunk)
        elif damage == "digest lost":
            chunk.with_name(chunk.name + ".sha256").unlink()
        elif damage == "garbage":
            chunk.write_bytes(os.urandom(chunk.stat().st_size))
        elif damage == "empty":
            chunk.write_bytes(b"")
        else:
            (c1.folder / "signature.json").write_text('{"not": "this cache"')
        got, c2 = _embed(slide, boxes, enc, tmp_path)
        truth, _ = _embed(slide, boxes, enc, False)
    expected = n_chunks if damage == "signature damaged" else 1
    assert c2.computed == expected and c2.reused == n_chunks - expected
    np.testing.assert_array_equal(got, truth)
    np.testing.assert_array_equal(full, truth)
