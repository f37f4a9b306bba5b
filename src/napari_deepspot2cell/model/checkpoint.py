"""Checkpoints: our own format, and the authors' reference Lightning checkpoints.

Files are always read with ``torch.load(weights_only=True)``: a checkpoint is
data from someone else, and a full unpickle would run any code it carries.
Ours therefore hold only tensors and plain data (str, int, float, bool, None,
lists, dicts), and are written atomically (temporary file, then rename).
"""

from __future__ import annotations

import math
import pickle
import re
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch

import napari_deepspot2cell
from napari_deepspot2cell.errors import InputError
from napari_deepspot2cell.io.atomic import atomic_path
from napari_deepspot2cell.model.deepspot2cell import AGGREGATES, DeepSpot2Cell

FORMAT = "napari-deepspot2cell/1"
DEFAULT_TARGET = {"normalisation": "log1p_cp10k", "scale": 1e4}

REFERENCE_HINT = (
    "this is a reference DeepSpot2Cell checkpoint without gene names; "
    "pass --genes FILE and --encoder NAME"
)
UNSAFE = (
    "not a safe checkpoint: it holds Python objects other than tensors and plain data "
    "(refused without running them)"
)

# Lightning saves ``hyper_parameters`` as an AttributeDict (a dict subclass). Its
# qualified names are mapped to plain ``dict``: unpickling then builds an ordinary
# dict, runs nothing, and needs no lightning import.
_ATTRIBUTE_DICT_NAMES = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
    "lightning.pytorch.utilities.parsing.AttributeDict",
)
_SAFE_ALIASES = [(dict, name) for name in _ATTRIBUTE_DICT_NAMES]

_REQUIRED_KEYS = ("format", "state_dict", "hyper_parameters", "genes", "encoder", "geometry", "target")
_KEY = re.compile(r"^(phi_spot|phi_cell|rho)\.(\d+)\.model\.(\d+)\.(weight|bias)$")


@dataclass
class LoadedCheckpoint:
    model: DeepSpot2Cell  # in eval mode, on the CPU
    genes: list[str]
    encoder: dict  # id, dim, weights_hash (None for reference checkpoints)
    geometry: dict  # opaque to this module; {} for reference checkpoints
    aggregate: str
    target: dict
    metrics: dict | None
    training: dict | None
    hyper_parameters: dict
    software_version: str | None
    reference: bool
    path: str = field(default="")


# ---------------------------------------------------------------- saving


def _plain(value: Any, where: str) -> Any:
    """Return ``value`` as JSON-like plain data, or raise TypeError naming where it sits."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy / torch scalars
        return _plain(value.item(), where)
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"{where}: keys must be str, got {type(k).__name__} {k!r}")
            out[k] = _plain(v, f"{where}.{k}")
        return out
    raise TypeError(f"{where}: {type(value).__name__} is not plain data (str, number, bool, None, list, dict)")


def save_checkpoint(
    path: str | PathLike,
    model: DeepSpot2Cell,
    *,
    genes: list[str],
    encoder: dict,
    geometry: dict,
    target: dict,
    metrics: dict | None = None,
    training: dict | None = None,
) -> None:
    """Write ``model`` and everything predict needs to ``path``, atomically."""
    genes = list(genes)
    if not all(isinstance(g, str) for g in genes):
        raise TypeError("genes must be a list of str")
    if len(genes) != model.output_size:
        raise ValueError(f"{len(genes)} gene names for a model with {model.output_size} outputs")
    encoder = _plain(dict(encoder), "encoder")
    if not isinstance(encoder.get("id"), str) or not isinstance(encoder.get("dim"), int):
        raise ValueError("encoder must hold 'id' (str) and 'dim' (int)")
    if encoder["dim"] != model.input_size:
        raise ValueError(f"encoder dim {encoder['dim']} != model input_size {model.input_size}")
    encoder.setdefault("weights_hash", None)
    payload = {
        "format": FORMAT,
        "software_version": napari_deepspot2cell.__version__,
        # detached CPU copies: no autograd state, no device, loadable anywhere
        "state_dict": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
        "hyper_parameters": model.hyper_parameters,
        "genes": genes,
        "encoder": encoder,
        "geometry": _plain(dict(geometry), "geometry"),
        "target": _plain(dict(target), "target"),
        "metrics": None if metrics is None else _plain(dict(metrics), "metrics"),
        "training": None if training is None else _plain(dict(training), "training"),
    }
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


# ---------------------------------------------------------------- loading


def _read(path: Path) -> Any:
    if not path.exists():
        raise InputError(path, "no such checkpoint file")
    if path.is_dir():
        raise InputError(path, "is a folder, not a checkpoint file")
    if path.stat().st_size == 0:
        raise InputError(path, "is empty, not a checkpoint")
    try:
        with torch.serialization.safe_globals(_SAFE_ALIASES):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        raise InputError(path, UNSAFE + (f": found {found.group(1)}" if found else "")) from None
    except OSError as exc:
        raise InputError(path, f"cannot be read: {exc.strerror or exc}") from None
    except Exception as exc:  # any other failure of torch.load means: not a torch file
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise InputError(path, f"not a checkpoint (torch.load cannot read it: {detail})") from None


def _expected_shapes(hp: dict) -> dict[str, tuple[int, ...]]:
    # built on the meta device: shapes only, no memory, no initialisation
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in _build(hp).state_dict().items()}


def _build(hp: dict) -> DeepSpot2Cell:
    return DeepSpot2Cell(
        hp["input_size"],
        hp["output_size"],
        n_ensemble=hp["n_ensemble"],
        n_ensemble_phi=hp.get("n_ensemble_phi"),
        n_ensemble_rho=hp.get("n_ensemble_rho"),
        phi2rho_size=hp["phi2rho_size"],
        p=hp.get("p", 0.3),
        aggregate=hp["aggregate"],
    )


def _some(keys: list[str]) -> str:
    return keys[0] if len(keys) == 1 else f"{keys[0]} (and {len(keys) - 1} more)"


def _model_from(path: Path, state_dict: Any, hp: dict) -> DeepSpot2Cell:
    """Build the model ``hp`` describes and fill it with ``state_dict``, checking every shape."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise InputError(path, "its 'state_dict' is not a mapping of names to tensors")
    try:
        expected = _expected_shapes(hp)
    except (TypeError, ValueError, KeyError) as exc:
        raise InputError(path, f"its hyper-parameters are not valid: {exc}") from None
    missing = [k for k in expected if k not in state_dict]
    if missing:
        raise InputError(path, f"its weights lack {_some(missing)}, which its hyper-parameters ask for")
    extra = [k for k in state_dict if k not in expected]
    if extra:
        raise InputError(path, f"its weights hold {_some(extra)}, which its hyper-parameters do not describe")
    for k, shape in expected.items():
        got = tuple(state_dict[k].shape)
        if got != shape:
            raise InputError(path, f"weight {k} has shape {got} but its hyper-parameters ask for {shape}")
    with torch.device("meta"):
        model = _build(hp)
    # assign=True adopts the loaded tensors instead of copying into initialised ones
    model.load_state_dict({k: v.float().contiguous() for k, v in state_dict.items()}, strict=True, assign=True)
    return model.eval()


def _int(path: Path, hp: dict, key: str, required: bool = True) -> int | None:
    value = hp.get(key)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(path, f"its hyper-parameter {key} is {value!r}, not a positive integer")
    return value


def _check_genes(path: Path, genes: Any, n: int, what: str) -> list[str]:
    if not isinstance(genes, (list, tuple)) or not all(isinstance(g, str) for g in genes):
        raise InputError(path, f"{what} is not a list of gene names")
    if len(genes) != n:
        raise InputError(path, f"{what} has {len(genes)} gene names but the model predicts {n} genes")
    return list(genes)


def _load_ours(path: Path, ckpt: dict, genes: list[str] | None) -> LoadedCheckpoint:
    if ckpt["format"] != FORMAT:
        raise InputError(path, f"has format {ckpt['format']!r}; this version reads {FORMAT!r} (a newer napari-deepspot2cell wrote it?)")
    lacking = [k for k in _REQUIRED_KEYS if k not in ckpt]
    if lacking:
        raise InputError(path, f"is a damaged napari-deepspot2cell checkpoint: it lacks {', '.join(lacking)}")
    hp = ckpt["hyper_parameters"]
    if not isinstance(hp, dict):
        raise InputError(path, "its 'hyper_parameters' is not a mapping")
    hp = dict(hp)
    for key in ("input_size", "output_size", "n_ensemble", "phi2rho_size"):
        _int(path, hp, key)
    for key in ("n_ensemble_phi", "n_ensemble_rho"):
        _int(path, hp, key, required=False)
    if hp.get("aggregate") not in AGGREGATES:
        raise InputError(path, f"its aggregation {hp.get('aggregate')!r} is not one of {', '.join(AGGREGATES)}")
    stored = _check_genes(path, ckpt["genes"], hp["output_size"], "its gene list")
    if genes is not None and list(genes) != stored:
        raise InputError(path, "holds its own gene names, which differ from the gene list given; leave out --genes")
    encoder = ckpt["encoder"]
    if not isinstance(encoder, dict) or not isinstance(encoder.get("id"), str):
        raise InputError(path, "its 'encoder' record has no encoder id")
    if encoder.get("dim") != hp["input_size"]:
        raise InputError(path, f"its encoder dim {encoder.get('dim')!r} does not match the model's input size {hp['input_size']}")
    for key in ("geometry", "target"):
        if not isinstance(ckpt[key], dict):
            raise InputError(path, f"its '{key}' record is not a mapping")
    for key in ("metrics", "training"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise InputError(path, f"its '{key}' record is not a mapping")
    model = _model_from(path, ckpt["state_dict"], hp)
    return LoadedCheckpoint(
        model=model, genes=stored, encoder=dict(encoder), geometry=dict(ckpt["geometry"]),
        aggregate=hp["aggregate"], target=dict(ckpt["target"]), metrics=ckpt.get("metrics"),
        training=ckpt.get("training"), hyper_parameters=hp,
        software_version=ckpt.get("software_version"), reference=False, path=str(path),
    )


def _load_reference(path: Path, ckpt: dict, genes: list[str] | None, encoder: str | None) -> LoadedCheckpoint:
    raw = ckpt.get("hyper_parameters")
    if not isinstance(raw, dict):
        raise InputError(path, "is a Lightning checkpoint without its 'hyper_parameters'")
    hp = {"aggregate": "codes"}  # the reference sums codes; ReLU ends its rho
    for key in ("input_size", "output_size", "n_ensemble", "phi2rho_size"):
        hp[key] = _int(path, raw, key, required=key != "n_ensemble" and key != "phi2rho_size")
    hp["n_ensemble"] = hp["n_ensemble"] or 10  # the reference's defaults
    hp["phi2rho_size"] = hp["phi2rho_size"] or 512
    for key in ("n_ensemble_phi", "n_ensemble_rho"):
        hp[key] = _int(path, raw, key, required=False)
    p = raw.get("p", 0.3)
    hp["p"] = float(p) if isinstance(p, (int, float)) and not isinstance(p, bool) and math.isfinite(p) else 0.3
    if genes is None or encoder is None:
        raise InputError(path, REFERENCE_HINT)
    if not isinstance(encoder, str) or not encoder:
        raise InputError(path, "the encoder name must be a non-empty string")
    gene_list = _check_genes(path, genes, hp["output_size"], "the gene list given")
    model = _model_from(path, ckpt["state_dict"], hp)
    training = {k: ckpt[k] for k in ("epoch", "global_step") if isinstance(ckpt.get(k), int)}
    version = ckpt.get("pytorch-lightning_version")
    if isinstance(version, str):
        training["lightning_version"] = version
    return LoadedCheckpoint(
        model=model, genes=gene_list,
        encoder={"id": encoder, "dim": hp["input_size"], "weights_hash": None},
        geometry={}, aggregate="codes", target=dict(DEFAULT_TARGET), metrics=None,
        training=training or None, hyper_parameters=hp, software_version=None,
        reference=True, path=str(path),
    )


def _is_reference(ckpt: dict) -> bool:
    sd = ckpt.get("state_dict")
    return isinstance(sd, dict) and any(isinstance(k, str) and _KEY.match(k) for k in sd)


def load_checkpoint(
    path: str | PathLike, *, genes: list[str] | None = None, encoder: str | None = None
) -> LoadedCheckpoint:
    """Load our checkpoint, or a reference one (which needs ``genes`` and ``encoder`` names).

    Every problem with the file is an InputError naming it.
    """
    path = Path(path)
    ckpt = _read(path)
    if isinstance(ckpt, dict) and "format" in ckpt:
        return _load_ours(path, ckpt, genes)
    if isinstance(ckpt, dict) and _is_reference(ckpt):
        return _load_reference(path, ckpt, genes, encoder)
    raise InputError(path, "not a DeepSpot2Cell checkpoint (no model weights with the expected names)")
