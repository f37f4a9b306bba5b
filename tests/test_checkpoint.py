"""Checkpoints: round trip, atomic writes, refused files, reference Lightning checkpoints."""

import os
import sys
import types
import zipfile
from collections import OrderedDict

import pytest
import torch

import napari_deepspot2cell
from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.model import FORMAT, DeepSpot2Cell, load_checkpoint, save_checkpoint
from napari_deepspot2cell.model import checkpoint as ckpt_module

D, H, G = 6, 4, 5
GENES = [f"GENE{i}" for i in range(G)]
META = dict(
    genes=GENES,
    encoder={"id": "tiny-test", "dim": D, "weights_hash": "abc123"},
    geometry={"cell_tile": "max_side", "spot_kind": "grid", "patch_um": 55.0, "um_per_px": 0.5, "neighbours": "grid8"},
    target={"normalisation": "log1p_cp10k", "scale": 1e4},
)


def _inputs(n=4, k=6):
    g = torch.Generator().manual_seed(2)
    missing = torch.zeros(n, k, dtype=torch.bool)
    missing[0, :3] = True
    missing[1] = True
    return (torch.randn(n, D, generator=g), torch.randn(n, D, generator=g), torch.randn(n, k, D, generator=g), missing)


def _plain_only(x):
    if isinstance(x, dict):
        return all(isinstance(k, str) and _plain_only(v) for k, v in x.items())
    if isinstance(x, list):
        return all(_plain_only(v) for v in x)
    return x is None or isinstance(x, (str, int, float, bool))


# ---------------------------------------------------------------- our format


@pytest.mark.parametrize("aggregate", ["codes", "counts"])
def test_round_trip_is_bit_for_bit(tmp_path, aggregate):
    model = DeepSpot2Cell(D, G, n_ensemble=3, phi2rho_size=H, aggregate=aggregate, seed=5).eval()
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, **META, metrics={"val_loss": 0.25, "history": [1.0, 0.5]}, training={"epochs": 3, "seed": 5})

    raw = torch.load(path, weights_only=True)  # no allow-list needed for our files
    assert raw["format"] == FORMAT and raw["software_version"] == napari_deepspot2cell.__version__
    assert all(isinstance(v, torch.Tensor) for v in raw["state_dict"].values())
    assert _plain_only({k: v for k, v in raw.items() if k != "state_dict"})

    loaded = load_checkpoint(path)
    assert not loaded.reference and not loaded.model.training
    assert loaded.aggregate == aggregate and loaded.genes == GENES
    assert loaded.encoder == META["encoder"] and loaded.geometry == META["geometry"] and loaded.target == META["target"]
    assert loaded.metrics == {"val_loss": 0.25, "history": [1.0, 0.5]} and loaded.training == {"epochs": 3, "seed": 5}
    assert loaded.hyper_parameters["n_ensemble"] == 3 and loaded.hyper_parameters["phi2rho_size"] == H
    cells, own, neighbours, missing = _inputs()
    with torch.no_grad():
        for a, b in zip(model.forward_cells(cells, own, neighbours, missing), loaded.model.forward_cells(cells, own, neighbours, missing)):
            assert (a is None and b is None) or torch.equal(a, b)
        mask = torch.tensor([[True, False, True, True]])
        assert torch.equal(
            model.forward_spot(cells[None], mask, own[:1], neighbours[:1], missing[:1]),
            loaded.model.forward_spot(cells[None], mask, own[:1], neighbours[:1], missing[:1]),
        )


def test_save_refuses_what_would_not_load_safely(tmp_path):
    model = DeepSpot2Cell(D, G, n_ensemble=1, phi2rho_size=H)
    with pytest.raises(ValueError, match="gene names"):
        save_checkpoint(tmp_path / "a.ckpt", model, **{**META, "genes": GENES[:-1]})
    with pytest.raises(ValueError, match="dim"):
        save_checkpoint(tmp_path / "a.ckpt", model, **{**META, "encoder": {"id": "x", "dim": D + 1}})
    with pytest.raises(TypeError, match="geometry.where"):
        save_checkpoint(tmp_path / "a.ckpt", model, **{**META, "geometry": {"where": tmp_path}})
    assert list(tmp_path.iterdir()) == []


def test_failed_save_keeps_the_earlier_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "m.ckpt"
    first = DeepSpot2Cell(D, G, n_ensemble=2, phi2rho_size=H, seed=1)
    save_checkpoint(path, first, **META)
    before = path.read_bytes()

    def broken_save(obj, f, *a, **kw):
        with open(f, "wb") as fh:
            fh.write(b"half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, DeepSpot2Cell(D, G, n_ensemble=2, phi2rho_size=H, seed=2), **META)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.ckpt"]
    sd = load_checkpoint(path).model.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in first.state_dict().items())


# ---------------------------------------------------------------- refused files


class _RunsCode:
    """Pickles as a call to os.mkdir: loading it unsafely creates the marker folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


@pytest.mark.parametrize("zip_format", [True, False])
def test_a_code_running_file_is_refused_without_running_it(tmp_path, zip_format):
    path, marker = tmp_path / "evil.ckpt", tmp_path / "marker"
    payload = {"format": FORMAT, "state_dict": {}, "x": _RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)
    with pytest.raises(InputError) as info:
        load_checkpoint(path)
    assert ckpt_module.UNSAFE in str(info.value) and str(path) in str(info.value)
    assert "os.mkdir" in str(info.value) or "posix.mkdir" in str(info.value)
    assert not marker.exists()
    # the file really does run code when unpickled in full: the refusal is what saved us
    torch.load(path, weights_only=False)
    assert marker.is_dir()


def _saved(tmp_path, payload, name="x.ckpt"):
    path = tmp_path / name
    torch.save(payload, path)
    return path


def test_files_that_are_not_checkpoints(tmp_path):
    text = tmp_path / "notes.ckpt"
    text.write_text("just some text\n")
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    archive = tmp_path / "archive.ckpt"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("a.txt", "hi")
    cases = {
        tmp_path / "absent.ckpt": "no such",
        tmp_path: "folder",
        text: "not a checkpoint",
        empty: "empty",
        archive: "not a checkpoint",
        _saved(tmp_path, torch.zeros(3), "tensor.ckpt"): "not a DeepSpot2Cell checkpoint",
        _saved(tmp_path, {"state_dict": {"layer.weight": torch.zeros(2)}}, "other.ckpt"): "not a DeepSpot2Cell checkpoint",
    }
    for path, words in cases.items():
        with pytest.raises(InputError, match=words) as info:
            load_checkpoint(path)
        assert info.value.source == str(path)


def _ours(tmp_path, **change):
    model = DeepSpot2Cell(D, G, n_ensemble=2, phi2rho_size=H, seed=0)
    path = tmp_path / "m.ckpt"
    save_checkpoint(path, model, **META)
    raw = torch.load(path, weights_only=True)
    raw.update(change)
    return _saved(tmp_path, raw, "changed.ckpt"), raw


def test_damaged_checkpoints_of_our_format(tmp_path):
    path, raw = _ours(tmp_path)
    sd = dict(raw["state_dict"])
    sd["rho.1.model.3.weight"] = torch.zeros(G + 1, 3 * H)
    bad_shape, _ = _ours(tmp_path, state_dict=sd)
    with pytest.raises(InputError, match=r"rho\.1\.model\.3\.weight has shape \(6, 12\).*\(5, 12\)") as info:
        load_checkpoint(bad_shape)
    assert info.value.source == str(bad_shape)

    sd = dict(raw["state_dict"])
    del sd["phi_cell.0.model.0.bias"]
    with pytest.raises(InputError, match="lack phi_cell.0.model.0.bias"):
        load_checkpoint(_ours(tmp_path, state_dict=sd)[0])
    with pytest.raises(InputError, match="newer"):
        load_checkpoint(_ours(tmp_path, format="napari-deepspot2cell/2")[0])
    with pytest.raises(InputError, match="4 gene names but the model predicts 5"):
        load_checkpoint(_ours(tmp_path, genes=GENES[:4])[0])
    with pytest.raises(InputError, match="aggregation"):
        load_checkpoint(_ours(tmp_path, hyper_parameters={**raw["hyper_parameters"], "aggregate": "mean"})[0])
    with pytest.raises(InputError, match="output_size"):
        load_checkpoint(_ours(tmp_path, hyper_parameters={**raw["hyper_parameters"], "output_size": "5"})[0])
    damaged, _ = _ours(tmp_path)
    raw2 = torch.load(damaged, weights_only=True)
    del raw2["encoder"]
    with pytest.raises(InputError, match="lacks encoder"):
        load_checkpoint(_saved(tmp_path, raw2, "noenc.ckpt"))
    with pytest.raises(InputError, match="differ"):
        load_checkpoint(path, genes=list("abcde"))


# ---------------------------------------------------------------- reference checkpoints


def _reference_state_dict(n_phi, n_rho, seed=3):
    """Weights laid out as the authors' Lightning module names them, made without our module."""
    g = torch.Generator().manual_seed(seed)
    sd = OrderedDict()
    for name in ("phi_spot", "phi_cell"):
        for i in range(n_phi):
            for j, (o, n) in ((0, (D, D)), (3, (H, D))):
                sd[f"{name}.{i}.model.{j}.weight"] = torch.randn(o, n, generator=g) * 0.5
                sd[f"{name}.{i}.model.{j}.bias"] = torch.randn(o, generator=g) * 0.1
    for i in range(n_rho):
        for j, (o, n) in ((1, (3 * H, 3 * H)), (3, (G, 3 * H))):
            sd[f"rho.{i}.model.{j}.weight"] = torch.randn(o, n, generator=g) * 0.5
            sd[f"rho.{i}.model.{j}.bias"] = torch.randn(o, generator=g) * 0.1 + 0.2
    return sd


def _lightning_checkpoint(sd, hparams):
    return {
        "epoch": 7,
        "global_step": 140,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": sd,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 8, "completed": 7}}}},
        "callbacks": {"EarlyStopping{'monitor': 'val_loss', 'mode': 'min'}": {"wait_count": 0, "stopped_epoch": 0, "best_score": torch.tensor(0.1), "patience": 5}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(140.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-4, "weight_decay": 1e-6, "params": [0]}]}],
        "lr_schedulers": [],
        "hparams_name": "kwargs",
        "hyper_parameters": hparams,
    }


REF_HPARAMS = {
    "input_size": D, "output_size": G, "lr": 1e-4, "p": 0.3, "p_phi": None, "p_rho": None,
    "n_ensemble": 3, "n_ensemble_phi": None, "n_ensemble_rho": None, "phi2rho_size": H,
    "weight_decay": 1e-6, "random_seed": 2024, "cell_gt_available": True,
}


def _direct_cells(sd, n_phi, n_rho, cells, own, neighbours, missing):
    """The reference cell forward written out: median phi, masked neighbour mean, mean rho, clamp."""
    def phi(name, x):
        outs = []
        for i in range(n_phi):
            a = torch.relu(x @ sd[f"{name}.{i}.model.0.weight"].T + sd[f"{name}.{i}.model.0.bias"])
            outs.append(torch.relu(a @ sd[f"{name}.{i}.model.3.weight"].T + sd[f"{name}.{i}.model.3.bias"]))
        return torch.median(torch.stack(outs, 1), 1).values

    nb = phi("phi_spot", neighbours.reshape(-1, D)).view(*missing.shape, H).masked_fill(missing[..., None], 0.0)
    mean_nb = nb.sum(1) / (~missing).sum(1, keepdim=True).float().clamp(min=1)
    z = torch.cat([phi("phi_cell", cells), phi("phi_spot", own), mean_nb], 1)
    out = []
    for i in range(n_rho):
        a = torch.relu(z @ sd[f"rho.{i}.model.1.weight"].T + sd[f"rho.{i}.model.1.bias"])
        out.append(torch.relu(a @ sd[f"rho.{i}.model.3.weight"].T + sd[f"rho.{i}.model.3.bias"]))
    return torch.stack(out, 1).mean(1).clamp(min=0)


@pytest.mark.parametrize("zip_format", [True, False])
def test_reference_lightning_checkpoint_predicts_identically(tmp_path, zip_format):
    sd = _reference_state_dict(3, 3)
    path = tmp_path / "reference.ckpt"
    torch.save(_lightning_checkpoint(sd, dict(REF_HPARAMS)), path, _use_new_zipfile_serialization=zip_format)
    loaded = load_checkpoint(path, genes=GENES, encoder="uni")
    assert loaded.reference and loaded.aggregate == "codes" and loaded.genes == GENES
    assert loaded.encoder == {"id": "uni", "dim": D, "weights_hash": None}
    assert loaded.training == {"epoch": 7, "global_step": 140, "lightning_version": "2.4.0"}
    cells, own, neighbours, missing = _inputs()
    with torch.no_grad():
        out = loaded.model.forward_cells(cells, own, neighbours, missing)
    torch.testing.assert_close(out.mean, _direct_cells(sd, 3, 3, cells, own, neighbours, missing), atol=1e-6, rtol=1e-6)


def test_reference_checkpoint_needs_gene_names_and_encoder(tmp_path):
    path = _saved(tmp_path, _lightning_checkpoint(_reference_state_dict(3, 3), dict(REF_HPARAMS)))
    for kwargs in ({}, {"genes": GENES}, {"encoder": "uni"}):
        with pytest.raises(InputError, match="pass --genes FILE and --encoder NAME"):
            load_checkpoint(path, **kwargs)
    with pytest.raises(InputError, match="4 gene names but the model predicts 5"):
        load_checkpoint(path, genes=GENES[:4], encoder="uni")


def test_reference_ensemble_sizes_override_and_shape_mismatch(tmp_path):
    sd = _reference_state_dict(2, 4)
    hp = {**REF_HPARAMS, "n_ensemble_phi": 2, "n_ensemble_rho": 4}
    loaded = load_checkpoint(_saved(tmp_path, _lightning_checkpoint(sd, hp)), genes=GENES, encoder="uni")
    assert len(loaded.model.phi_spot) == 2 and len(loaded.model.rho) == 4
    cells, own, neighbours, missing = _inputs()
    with torch.no_grad():
        got = loaded.model.forward_cells(cells, own, neighbours, missing).mean
    torch.testing.assert_close(got, _direct_cells(sd, 2, 4, cells, own, neighbours, missing), atol=1e-6, rtol=1e-6)

    wrong = _saved(tmp_path, _lightning_checkpoint(sd, {**hp, "phi2rho_size": H + 1}), "wrong.ckpt")
    with pytest.raises(InputError, match="has shape") as info:
        load_checkpoint(wrong, genes=GENES, encoder="uni")
    assert info.value.source == str(wrong)


def test_reference_hyper_parameters_saved_as_lightning_attribute_dict(tmp_path, monkeypatch):
    # Lightning's AttributeDict, recreated under its qualified name without importing lightning
    class AttributeDict(dict):
        def __getattr__(self, key):
            try:
                return self[key]
            except KeyError as exc:
                raise AttributeError(key) from exc

        def __setattr__(self, key, value):
            self[key] = value

    qualified = "lightning.fabric.utilities.data"
    AttributeDict.__module__, AttributeDict.__qualname__ = qualified, "AttributeDict"
    parts = qualified.split(".")
    for i in range(1, len(parts) + 1):
        monkeypatch.setitem(sys.modules, ".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    sys.modules[qualified].AttributeDict = AttributeDict
    sd = _reference_state_dict(3, 3)
    path = _saved(tmp_path, _lightning_checkpoint(sd, AttributeDict(REF_HPARAMS)))
    monkeypatch.undo()  # the class is gone from sys.modules again, as without lightning installed
    assert "lightning" not in sys.modules or sys.modules["lightning"].__spec__ is not None

    with pytest.raises(Exception, match="AttributeDict"):
        torch.load(path, weights_only=True)  # without our allow-list it is refused
    loaded = load_checkpoint(path, genes=GENES, encoder="uni")
    assert loaded.reference and loaded.hyper_parameters["n_ensemble"] == 3
    cells, own, neighbours, missing = _inputs()
    with torch.no_grad():
        got = loaded.model.forward_cells(cells, own, neighbours, missing).mean
    torch.testing.assert_close(got, _direct_cells(sd, 3, 3, cells, own, neighbours, missing), atol=1e-6, rtol=1e-6)
