"""The built wheel carries the manifest and the sample data: in a fresh venv
(dependencies borrowed, the package itself only from the wheel) the demo runs
and napari's manifest resolves inside the installed package."""

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_in_a_clean_venv_runs_the_demo_and_ships_its_manifest(tmp_path):
    src = tmp_path / "src"  # build from a copy: setuptools writes build/ beside the sources
    shutil.copytree(REPO, src, symlinks=True, ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".hypothesis"))
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(dist), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("napari_deepspot2cell-*.whl"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    # dependencies come from the test's environment as a plain path entry (its .pth
    # files, the editable install among them, are not processed from there)
    Path(site, "borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "--target", site, str(wheel)],
                   check=True, capture_output=True, text=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import napari_deepspot2cell, npe2; print(napari_deepspot2cell.__file__); "
                            "pm = npe2.PluginManager.instance(); pm.discover(); "
                            "print(pm.get_manifest('napari-deepspot2cell').display_name)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split("\n")
    assert where[0].startswith(site) and where[1] == "DeepSpot2Cell"
    out = tmp_path / "demo"
    run = subprocess.run([str(py), "-m", "napari_deepspot2cell.cli", "demo", "--out", str(out), "--quiet"],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert {p.name for p in out.iterdir()} >= {"cells.h5ad", "overview.png", "report.json"}
    assert str(REPO) not in (out / "report.json").read_text()  # the sample came from the installed package
