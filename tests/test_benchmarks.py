"""The benchmark scripts work: a tiny generated slide opens with the readers, gpu.py's smoke run finishes."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_make_wsi_writes_files_the_readers_open(tmp_path):
    from napari_deepspot2cell.geometry.cells import cell_table
    from napari_deepspot2cell.io.masks import open_cells
    from napari_deepspot2cell.io.slides import open_slide

    make_wsi = _module("make_wsi")
    info = make_wsi.make_wsi(tmp_path, (1500, 2100), pitch=30.0, um_per_px=0.25, workers=2)
    assert info["n_cells"] == 50 * 70
    with open_slide(info["slide"]) as slide:
        assert slide.shape == (1500, 2100)
        assert abs(slide.um_per_px - 0.25) < 1e-9
        assert len(slide.levels) == 3 and slide.levels[-1].shape[:2] == (375, 525)
        pix = slide.read_region(0, 0, 300, 300)
        assert pix.dtype == np.uint8 and pix[..., 1].mean() < pix[..., 0].mean()  # pinkish, not grey
    mask = open_cells(info["mask"], (1500, 2100), 0.25)
    try:
        assert mask.labels.dtype == np.uint32
        table = cell_table(mask.labels)
    finally:
        mask.close()
    assert len(table) == info["n_cells"]
    assert table["label"].min() == 1 and table["label"].max() == info["n_cells"]
    # a tile renders alone the same as inside the whole: the analytic cells do not depend on the window
    lat = make_wsi.lattice((1500, 2100), pitch=30.0)
    whole = make_wsi.render_labels(lat, 0, 0, 1024, 1024)
    assert np.array_equal(whole[512:, 512:], make_wsi.render_labels(lat, 512, 512, 512, 512))


def test_gpu_script_smoke_run_on_the_cpu(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--smoke", "--device", "cpu", "--e2e-side", "1024", "--predict-side", "768",
         "--tmp", str(tmp_path)],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["mode"].startswith("CPU smoke run")
    uni = report["archs"]["uni"]
    assert uni["best_tiles_per_s"] > 0 and uni["whole_path"]["tiles"] == 4
    assert set(uni["precisions"]) == {"autocast", "bf16"} and uni["best_precision"] in uni["precisions"]
    assert all(r["whole_path"]["tiles"] == 4 for r in uni["precisions"].values())
    stages = uni["whole_path_stages"]
    assert stages["tiles"] == 4 and stages["read_tiles_per_s"] > 0 and stages["upload_and_crop_tiles_per_s"] > 0
    assert stages["slowest_stage"] == "model"  # ViT-L/16 on a CPU, against reading and cutting 4 tiles
    pred = report["predict"]
    assert pred["completed"] and pred["cells_ok"]
    assert pred["stages"]["embedding cells"]["done"] == pred["cells"]
    assert report["targets"]["vit_l16_whole_path_tiles_per_s"]["ok"] is None


def test_gpu_script_keeps_its_budget_and_its_partial_figures(tmp_path):
    out = tmp_path / "gpu.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu.py"), "--smoke", "--device", "cpu", "--e2e-side", "1024", "--predict-side", "768",
         "--precisions", "autocast", "--budget", "0.001", "--out", str(out), "--tmp", str(tmp_path)],
        capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())  # the file holds what stdout says
    assert report == json.loads(proc.stdout[proc.stdout.index("{"):])
    assert report["settings"]["budget_s"] == 0.0
    assert not report["predict"]["completed"] and "cells_per_s" not in report["predict"]
    assert list(report["archs"]["uni"]["precisions"]) == ["autocast"]
