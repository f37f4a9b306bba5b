"""Shared fixtures: the real data beside the project, and an offline Hugging Face hub."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch, tmp_path_factory):
    # No test may reach the network or read the developer's own token and cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path_factory.getbasetemp() / "hf_home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("DEEPSPOT2CELL_CACHE", str(tmp_path_factory.getbasetemp() / "embedding_cache"))


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def no_job_left_running(qtbot):
    """A GUI test that fails mid-run must not leave its job holding the one job slot."""
    yield
    from napari_deepspot2cell.widgets import jobs

    running = jobs.current_job()
    if running is not None:
        running.cancel()
        qtbot.waitUntil(lambda: running.done, timeout=60000)
