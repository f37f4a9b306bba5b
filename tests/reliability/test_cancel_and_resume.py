"""Cancel and resume: Ctrl-C during embedding stops within a batch (exit 130, the cancel
message), keeps the finished cache chunks, and the next run computes only the rest.

In-process cancel (generator close) and resume: tests/test_embed.py::test_cache_resumes_after_cancel_and_is_keyed_by_signature.
Training cancel keeps the best checkpoint: tests/test_train.py::test_cancel_keeps_the_best_model_so_far
(and, with a real SIGINT, tests/reliability/test_nothing_half_written.py).
"""

from __future__ import annotations

import signal
import time

import numpy as np
from rel_helpers import cache_folders, counting_caches, finished_chunks, popen_cli, predict_args

from napari_deepspot2cell.encoders.embed import plan_tiles
from napari_deepspot2cell.geometry.tiles import cell_tile_boxes
from napari_deepspot2cell.predict import iter_predict
from napari_deepspot2cell.progress import run


def test_ctrl_c_during_embedding_stops_at_once_and_the_next_run_resumes(tissue_files, checkpoint, reference_prediction,
                                                                       tmp_path, monkeypatch):
    tissue, paths = tissue_files
    cache, out = tmp_path / "cache", tmp_path / "cells.h5ad"
    n_chunks = len(plan_tiles(cell_tile_boxes(tissue.cells)).chunks)
    assert n_chunks >= 3
    # small batches: a chunk of 256 cells takes many encoder calls, so the signal lands inside one
    proc = popen_cli(*predict_args(paths, checkpoint, out, "--cache-dir", cache, "--batch-size", "16"))
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        folders = cache_folders(cache, "cells")
        if folders and finished_chunks(folders[0]) >= 1:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before the test could interrupt it"
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 130, err
    assert "cancelled; finished embeddings stay in the cache" in err and "Traceback" not in err
    assert stopped_in < 10, f"took {stopped_in:.1f} s to stop after Ctrl-C"
    assert not out.exists()
    (folder,) = cache_folders(cache, "cells")
    kept = finished_chunks(folder)
    assert 1 <= kept < n_chunks, f"{kept} of {n_chunks} chunks: the run did not stop early"
    assert len(list(folder.glob("c*.npy"))) == kept  # every chunk has its digest: only whole chunks

    # the second run (in-process, to count) computes exactly the chunks that were missing
    made = counting_caches(monkeypatch)
    adata = run(iter_predict(paths["slide"], paths["labels"], checkpoint, device="cpu", cache_dir=cache))
    cells_cache = next(c for c in made if c.signature["tiles"]["kind"] == "cells")
    assert cells_cache.reused == kept and cells_cache.computed == n_chunks - kept
    np.testing.assert_allclose(adata.X, reference_prediction.X, rtol=1e-4, atol=1e-4)
