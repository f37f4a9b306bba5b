"""Secrets: a Hugging Face token (from HF_TOKEN or the ``token=`` argument) never shows
in output, logs, exception messages or tracebacks, layer metadata, checkpoints, AnnData
``uns``, metrics or cache files, whether the gated encoder fails or the offline one runs."""

from __future__ import annotations

import logging
import traceback
from pathlib import Path

import pytest
from rel_helpers import predict_args, run_cli, train_args

from napari_deepspot2cell.encoders import weights as W
from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.predict import iter_predict, write_cells
from napari_deepspot2cell.progress import run
from napari_deepspot2cell.train import TrainInput, iter_train

TOKEN = "hf_FAKEtokenDEEPSPOT2CELLzz9QxW4reliability"
FAST = dict(max_epochs=2, n_ensemble=2, phi2rho_size=16, device="cpu")


def _no_token_in_files(root: Path) -> int:
    n = 0
    for p in Path(root).rglob("*"):
        if p.is_file():
            n += 1
            assert TOKEN.encode() not in p.read_bytes(), f"the token is in {p}"
    return n


def _no_token_in(*texts) -> None:
    for t in texts:
        assert TOKEN not in str(t)


@pytest.fixture
def token_env(monkeypatch, caplog):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.mark.parametrize("command", ["predict", "train"])
def test_gated_encoder_failing_offline_never_shows_the_token(command, tissue_files, checkpoint, tmp_path, token_env):
    _, paths = tissue_files
    out = tmp_path / ("cells.h5ad" if command == "predict" else "model.ckpt")
    args = predict_args(paths, checkpoint, out) if command == "predict" else train_args(paths, out)
    res = run_cli(*args, "--encoder", "uni", "--cache-dir", tmp_path / "cache")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "MahmoodLab/UNI" in res.stderr
    _no_token_in(res.stdout, res.stderr)
    assert not out.exists()
    _no_token_in_files(tmp_path)


@pytest.mark.parametrize("failure", ["offline", "gated", "network error echoing the token"])
def test_token_argument_never_reaches_messages_tracebacks_or_logs(failure, tissue_files, checkpoint, monkeypatch, token_env):
    import huggingface_hub.errors as hf_errors
    import requests

    _, paths = tissue_files
    seen = []

    def download(repo, filename, **kw):
        seen.append(kw.get("token"))
        if failure == "gated":
            response = requests.Response()
            response.status_code, response.url = 401, f"https://huggingface.co/{repo}"
            raise hf_errors.GatedRepoError(f"401 Client Error for {repo} with token {kw.get('token')}", response=response)
        if failure != "offline":
            raise requests.exceptions.ConnectionError(f"Authorization: Bearer {kw.get('token')} refused")
        raise hf_errors.OfflineModeIsEnabled("offline")

    if failure != "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(W, "hf_hub_download", download)
    with pytest.raises(InputError) as info:
        run(iter_predict(paths["slide"], paths["labels"], checkpoint, encoder="uni", token=TOKEN, device="cpu"))
    assert TOKEN in seen  # the token was really handed to the hub...
    text = "".join(traceback.format_exception(info.value))  # ...and is nowhere in the report
    _no_token_in(str(info.value), text, repr(info.value.__context__), repr(info.value.__cause__), token_env.text)


def test_a_successful_run_with_a_token_keeps_it_out_of_every_artefact(tissue_files, checkpoint, tmp_path, token_env, capsys):
    from napari_deepspot2cell.widgets.layers import prediction_layers

    tissue, paths = tissue_files
    cache = tmp_path / "cache"
    # through the command line, token in the environment
    res_p = run_cli(*predict_args(paths, checkpoint, tmp_path / "cli.h5ad", "--cache-dir", cache))
    res_t = run_cli(*train_args(paths, tmp_path / "cli.ckpt", "--cache-dir", cache))
    assert res_p.returncode == 0 and res_t.returncode == 0, res_p.stderr + res_t.stderr
    _no_token_in(res_p.stdout, res_p.stderr, res_t.stdout, res_t.stderr)
    # in process, token as the argument
    adata = run(iter_predict(paths["slide"], paths["labels"], checkpoint, token=TOKEN, device="cpu", cache_dir=cache))
    write_cells(adata, tmp_path / "api.h5ad")
    run(iter_train([TrainInput(paths["slide"], paths["labels"], paths["spots"])], tmp_path / "api.ckpt", token=TOKEN,
                   cache_dir=cache, **FAST))
    layers = prediction_layers(adata, tissue.labels)
    _no_token_in(repr(adata.uns), repr([meta for _, meta, _ in layers]), token_env.text, capsys.readouterr())
    n = _no_token_in_files(tmp_path)
    names = {p.name for p in tmp_path.iterdir()}
    assert {"cli.h5ad", "cli.ckpt", "cli.metrics.json", "cli.loss.png", "api.h5ad", "api.ckpt", "api.metrics.json"} <= names
    assert n >= 12  # outputs and cache chunks were all searched
