"""Files from collaborators are data: reading a checkpoint, an embedding cache chunk or an
AnnData file never runs code from it.

Checkpoint refusal at the API level: tests/test_checkpoint.py::test_a_code_running_file_is_refused_without_running_it.
"""

from __future__ import annotations

import ast
import hashlib
import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import torch
from rel_helpers import predict_args, run_cli

import napari_deepspot2cell
from napari_deepspot2cell.encoders.cache import EmbeddingCache

SRC = Path(napari_deepspot2cell.__file__).resolve().parent


class _RunsCode:
    """Unpickling this creates ``marker``: proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _kw(node: ast.Call, key: str):
    for k in node.keywords:
        if k.arg == key:
            return k.value
    return None


def test_no_pickle_on_any_read_path_of_the_source_tree():
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    bad = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        tree = ast.parse(text)
        rel = path.relative_to(SRC)
        for mod in ("pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"):
            if re.search(rf"\b{mod}\.loads?\(", text):
                bad.append(f"{rel}: {mod}.load")
        if re.search(r"allow_pickle\s*=\s*True", text):
            bad.append(f"{rel}: allow_pickle=True")
        if re.search(r"read_pickle\(|weights_only\s*=\s*False", text):
            bad.append(f"{rel}: read_pickle / weights_only=False")
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            full = ast.unparse(node.func)
            last = full.split(".")[-1]
            if last == "load" and full.split(".")[0] in ("torch",):
                w = _kw(node, "weights_only")
                if not (isinstance(w, ast.Constant) and w.value is True):
                    bad.append(f"{rel}:{node.lineno}: {full}( without weights_only=True")
            if last == "load" and full.split(".")[0] in ("np", "numpy"):
                a = _kw(node, "allow_pickle")
                if not (isinstance(a, ast.Constant) and a.value is False):
                    bad.append(f"{rel}:{node.lineno}: {full}( without allow_pickle=False")
    assert not bad, "\n".join(bad)


def test_the_grep_finds_what_it_forbids(tmp_path):
    """The check above really fails on the forbidden forms (so it is not vacuous)."""
    src = "import numpy as np, torch\nnp.load(p)\ntorch.load(p)\ntorch.load(p, weights_only=True)\nnp.load(p, allow_pickle=False)\n"
    tree = ast.parse(src)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            full = ast.unparse(node.func)
            if full == "torch.load" and not (isinstance(_kw(node, "weights_only"), ast.Constant)):
                found.append(node.lineno)
            if full == "np.load" and not (isinstance(_kw(node, "allow_pickle"), ast.Constant)):
                found.append(node.lineno)
    assert found == [2, 3]


def test_cli_refuses_a_code_running_checkpoint_in_one_line_and_runs_nothing(tissue_files, tmp_path):
    _, paths = tissue_files
    evil, marker, out = tmp_path / "evil.ckpt", tmp_path / "marker", tmp_path / "cells.h5ad"
    torch.save({"format": "napari-deepspot2cell/1", "state_dict": {}, "x": _RunsCode(marker)}, evil)
    res = run_cli(*predict_args(paths, evil, out, "--no-cache"))
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "evil.ckpt" in lines[0] and "not a safe checkpoint" in lines[0], res.stderr
    assert "Traceback" not in res.stderr
    assert not marker.exists() and not out.exists()


def test_a_pickled_cache_chunk_is_recomputed_without_unpickling(tmp_path):
    cache = EmbeddingCache(tmp_path, {"slide": "s", "encoder": "e"})
    marker = tmp_path / "marker"
    buf = io.BytesIO()
    np.save(buf, np.array([_RunsCode(marker)], dtype=object), allow_pickle=True)
    data = buf.getvalue()
    chunk = cache.folder / "c0000000.npy"
    chunk.write_bytes(data)
    # a matching digest too: only allow_pickle=False stands between the file and its code
    (cache.folder / "c0000000.npy.sha256").write_text(hashlib.sha256(data).hexdigest())
    assert cache.get(0, 1, 4) is None
    assert not marker.exists() and not chunk.exists()
    # the file really runs code when unpickled: the refusal is what saved us
    np.load(io.BytesIO(data), allow_pickle=True)
    assert marker.is_dir()


def test_anndata_inputs_are_read_without_pickle(tissue_files, tmp_path, monkeypatch):
    """Spots (.h5ad), a centroid table (.h5ad) and the cell truth go through HDF5 only:
    with every unpickling entry point booby-trapped, they still read."""
    import anndata as ad

    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.spots import read_spots

    tissue, paths = tissue_files
    cent = tmp_path / "centroids.h5ad"
    obs = tissue.cells[["x", "y"]].copy()
    obs.index = obs.index.astype(str)
    ad.AnnData(obs=obs).write_h5ad(cent)

    def trap(*a, **k):
        raise AssertionError("an input was unpickled")

    monkeypatch.setattr(pickle, "load", trap)
    monkeypatch.setattr(pickle, "loads", trap)
    monkeypatch.setattr(pickle, "Unpickler", trap)
    real_np_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: real_np_load(*a, **{**k, "allow_pickle": False}))

    sp = read_spots(paths["spots"], um_per_px=tissue.um_per_px)
    assert sp.n_obs > 0
    mask = open_cells(cent, tissue.image.shape[:2], tissue.um_per_px, cell_diameter_um=10.0)
    assert mask.n_cells == len(obs)
    truth = ad.read_h5ad(paths["truth"])
    assert truth.n_obs > 0
