"""The encoder registry: presets, timm models, local weights, one `Encoder` interface.

``get_encoder(name_or_path)`` gives an :class:`Encoder` in eval mode on the CPU:
``forward(tiles)`` takes (B, 3, S, S) RGB in [0, 1] at ``input_size`` S, applies
the model's own normalisation and returns (B, dim) float32.

``id`` names the architecture and its weights family ("offline-he-v1", "uni",
"hoptimus0", "phikonv2", "timm:NAME"); ``weights_hash`` is the sha256 of the
weights file actually loaded. A preset loaded from a local copy of its weights
keeps the preset's id (the same features), and the hash tells copies apart.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from napari_deepspot2cell.errors import InputError

from . import weights as W

logger = logging.getLogger(__name__)

DEFAULT_ENCODER = "offline"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_OFFLINE_NAMES = {"offline", "offline-he-v1", "default"}


class Encoder(torch.nn.Module):
    """A frozen image encoder: (B, 3, S, S) RGB in [0, 1] -> (B, dim) float32."""

    id: str = ""
    weights_hash: str = ""
    dim: int = 0
    input_size: int = 0
    #: where the weights came from (a Hub repo id or a path); "" when there are none
    source: str = ""
    #: a line for the user about how this encoder was chosen ("" when there is nothing to say)
    note: str = ""

    def __init__(self):
        super().__init__()
        self.training = False  # frozen: created in eval mode and kept there

    def extra_repr(self) -> str:
        return f"id={self.id!r}, dim={self.dim}, input_size={self.input_size}"

    def train(self, mode: bool = True):  # frozen: always evaluates
        return super().train(False)


@dataclass(frozen=True)
class Preset:
    """A pathology foundation model the registry knows by name."""

    name: str
    description: str
    timm_name: str
    timm_kwargs: Mapping[str, Any]
    repo_id: str
    filenames: tuple[str, ...]
    dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    #: layout of the published state dict: "timm" or "hf-dinov2" (transformers Dinov2Model)
    key_format: str = "timm"
    gated: bool = True
    aliases: tuple[str, ...] = field(default=())


PRESETS: dict[str, Preset] = {
    "uni": Preset(
        name="uni",
        description="UNI (Mahmood Lab): ViT-L/16 pathology foundation model, 1024-d; gated, needs a Hugging Face token",
        timm_name="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": True},
        repo_id="MahmoodLab/UNI",
        filenames=("pytorch_model.bin",),
        dim=1024,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        aliases=("mahmoodlab/uni", "uni1", "uni-v1"),
    ),
    "hoptimus0": Preset(
        name="hoptimus0",
        description="H-optimus-0 (Bioptimus): ViT-g/14 with registers, 1536-d, 1.1B parameters; gated, best on a GPU",
        timm_name="vit_giant_patch14_reg4_dinov2",
        timm_kwargs={"img_size": 224, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        repo_id="bioptimus/H-optimus-0",
        filenames=("pytorch_model.bin",),
        dim=1536,
        input_size=224,
        mean=(0.707223, 0.578729, 0.703617),
        std=(0.211883, 0.230117, 0.177517),
        aliases=("h-optimus-0", "hoptimus-0", "h_optimus_0", "bioptimus/h-optimus-0"),
    ),
    "phikonv2": Preset(
        name="phikonv2",
        description="Phikon-v2 (Owkin): ViT-L/16 trained with DINOv2 on 460M pathology tiles, 1024-d",
        timm_name="vit_large_patch16_224",
        timm_kwargs={"img_size": 224, "patch_size": 16, "init_values": 1e-5, "num_classes": 0, "dynamic_img_size": False},
        repo_id="owkin/phikon-v2",
        filenames=("model.safetensors", "pytorch_model.bin"),
        dim=1024,
        input_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        key_format="hf-dinov2",
        gated=False,
        aliases=("phikon-v2", "phikon_v2", "owkin/phikon-v2"),
    ),
}
_ALIASES = {alias: p.name for p in PRESETS.values() for alias in p.aliases}

_OFFLINE_DESCRIPTION = (
    "Offline H&E features: no download, fast on a CPU; hand-crafted nuclear and stain descriptors "
    "(for demos and quick runs)"
)


def describe_encoders() -> list[tuple[str, str]]:
    """(name, one-line description) of the encoders a user can pick, default first."""
    return [(DEFAULT_ENCODER, _OFFLINE_DESCRIPTION)] + [(p.name, p.description) for p in PRESETS.values()]


# --------------------------------------------------------------------------- architectures


def _preset(name: str) -> Preset | None:
    low = name.strip().lower()
    return PRESETS.get(low) or (PRESETS[_ALIASES[low]] if low in _ALIASES else None)


def _timm_kwargs(arch: str, config: Mapping | None) -> tuple[str, dict]:
    """(timm model name, create_model kwargs) of ``arch`` (a preset name or "timm:NAME")."""
    preset = _preset(arch)
    if preset is not None:
        return preset.timm_name, dict(preset.timm_kwargs)
    name = arch[5:] if arch.lower().startswith("timm:") else arch
    kwargs: dict[str, Any] = {}
    if config:
        model_args = config.get("model_args")
        if isinstance(model_args, Mapping):
            kwargs.update(model_args)
        pcfg = config.get("pretrained_cfg")
        if isinstance(pcfg, Mapping):
            keep = ("input_size", "fixed_input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")
            kwargs["pretrained_cfg_overlay"] = {k: pcfg[k] for k in keep if k in pcfg}
    kwargs["num_classes"] = 0
    return name, kwargs


def build_model(arch: str, *, config: Mapping | None = None, device: str | torch.device | None = None):
    """The timm module of ``arch`` (a preset name or "timm:NAME") with random (or, on the
    "meta" device, no) weights; never downloads."""
    import timm

    name, kwargs = _timm_kwargs(arch, config)
    if not timm.is_model(name):
        raise InputError(arch, "is not a model timm knows")
    try:
        if device is not None:
            with torch.device(device):
                return timm.create_model(name, pretrained=False, **kwargs)
        return timm.create_model(name, pretrained=False, **kwargs)
    except (TypeError, ValueError, AssertionError) as exc:
        raise InputError(arch, f"cannot be built with the given configuration ({W._short(exc)})") from None


@functools.lru_cache(maxsize=16)
def _meta_model(arch: str):
    return build_model(arch, device="meta")


def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the state dict the ``arch`` module expects."""
    return {k: tuple(v.shape) for k, v in _meta_model(arch).state_dict().items()}


def _classifier(model) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier")
    return name if isinstance(name, str) else None


def _candidates(sd: Mapping[str, torch.Tensor], model) -> list[tuple[str, dict]]:
    """The state dict as given, and converted the ways it may need to be."""
    out: list[tuple[str, dict]] = []
    if W.is_hf_dinov2(sd):
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        out.append(("hf-dinov2", W.hf_dinov2_to_timm(sd, grid=tuple(grid) if grid else None)))
    out.append(("timm", dict(sd)))
    module = __import__(type(model).__module__, fromlist=["checkpoint_filter_fn"])
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None and not W.is_hf_dinov2(sd):
        try:
            out.append(("timm", dict(filter_fn(dict(sd), model))))
        except Exception as exc:  # a conversion that does not apply to these weights
            logger.debug("timm checkpoint filter did not apply: %s", W._short(exc))
    return out


def fit_state_dict(sd: Mapping[str, torch.Tensor], model, *, arch: str, source: str) -> tuple[dict, str]:
    """(state dict with exactly the module's keys and shapes, its layout), or an
    InputError saying how the weights do not fit ``arch``."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    classifier = _classifier(model)
    best = None
    for fmt, cand in _candidates(sd, model):
        mm = W.mismatch(expected, cand, classifier)
        if not any(mm):
            return {k: cand[k] for k in expected}, fmt
        size = sum(len(x) for x in mm)
        if best is None or size < best[0]:
            best = (size, mm)
    raise InputError(source, W.describe_mismatch(arch, *best[1]))


def _load(arch: str, sd: Mapping[str, torch.Tensor], *, config: Mapping | None, source: str):
    """The ``arch`` module holding ``sd`` (built on the meta device and given the
    loaded tensors, so a 4 GB model is not initialised at random first)."""
    model = build_model(arch, config=config, device="meta")
    fitted, _ = fit_state_dict(sd, model, arch=arch, source=source)
    ref = model.state_dict()
    fitted = {k: (v.to(ref[k].dtype) if v.dtype != ref[k].dtype else v) for k, v in fitted.items()}
    model.load_state_dict(fitted, strict=True, assign=True)
    if any(t.is_meta for t in itertools.chain(model.parameters(), model.buffers())):
        model = build_model(arch, config=config)  # has buffers outside the state dict: build for real
        model.load_state_dict(fitted, strict=True)
    return model


# --------------------------------------------------------------------------- the encoder


class TimmEncoder(Encoder):
    """A timm backbone (num_classes=0) with its normalisation inside."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        id: str,
        dim: int,
        input_size: int,
        mean,
        std,
        weights_hash: str,
        source: str = "",
        note: str = "",
    ):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.id = id
        self.dim = int(dim)
        self.input_size = int(input_size)
        self.weights_hash = weights_hash
        self.source = source
        self.note = note
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        if tiles.ndim != 4 or tiles.shape[1] != 3:
            raise ValueError(f"tiles must be (B, 3, S, S), got {tuple(tiles.shape)}")
        s = self.input_size
        if tuple(tiles.shape[-2:]) != (s, s):
            tiles = F.interpolate(tiles.float(), size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        x = (tiles - self.mean.to(tiles.dtype)) / self.std.to(tiles.dtype)
        weights = next(self.model.parameters(), None)
        if weights is not None and weights.dtype in (torch.bfloat16, torch.float16):
            # Weights already in half precision run as they are: autocast would lift every
            # LayerNorm back to float32 and cast around it.
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = self.model(x.to(weights.dtype))
        else:
            out = self.model(x)
        if out.ndim > 2:
            out = out.flatten(1)
        return out.float()


def _data_config(model, config: Mapping | None) -> tuple[int, tuple, tuple]:
    from timm.data import resolve_data_config

    cfg = resolve_data_config({}, model=model)
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-1]), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _out_dim(model) -> int:
    return int(getattr(model, "head_hidden_size", None) or model.num_features)


def build_encoder(
    arch: str,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    weights_hash: str | None = None,
    source: str = "",
    config: Mapping | None = None,
    note: str = "",
) -> TimmEncoder:
    """An encoder of architecture ``arch`` (a preset name or "timm:NAME") holding
    ``state_dict``; without one, random weights (tests, benchmarks) whose hash is
    that of the tensors."""
    preset = _preset(arch)
    label = preset.name if preset else (arch if arch.lower().startswith("timm:") else f"timm:{arch}")
    if state_dict is None:
        model = build_model(label, config=config)
        if weights_hash is None:
            weights_hash = W.tensors_sha256(model.state_dict())
    else:
        model = _load(label, state_dict, config=config, source=source or label)
        if weights_hash is None:
            weights_hash = W.tensors_sha256(model.state_dict())
    if preset is not None:
        size, mean, std, dim = preset.input_size, preset.mean, preset.std, preset.dim
        if _out_dim(model) != dim:  # pragma: no cover - guards the preset table
            raise RuntimeError(f"{preset.name} built with dim {_out_dim(model)}, expected {dim}")
    else:
        size, mean, std = _data_config(model, config)
        dim = _out_dim(model)
    return TimmEncoder(
        model, id=label, dim=dim, input_size=size, mean=mean, std=std,
        weights_hash=weights_hash, source=source, note=note,
    )


# --------------------------------------------------------------------------- guessing


def guess_architecture(sd: Mapping[str, torch.Tensor], config: Mapping | None = None) -> tuple[str, str]:
    """(architecture, why) for a state dict given without one: the preset whose shapes
    it fits (its published layout first), else the timm architecture its config.json names."""
    fits: list[tuple[int, int, str, str]] = []
    for order, preset in enumerate(PRESETS.values()):
        model = _meta_model(preset.name)
        expected = expected_shapes(preset.name)
        for fmt, cand in _candidates(sd, model):
            if not any(W.mismatch(expected, cand, _classifier(model))):
                fits.append((0 if fmt == preset.key_format else 1, order, preset.name, fmt))
                break
    if fits:
        fits.sort()
        _, _, name, fmt = fits[0]
        layout = "transformers Dinov2" if fmt == "hf-dinov2" else "timm"
        return name, f"the {name} architecture, guessed from the tensor shapes ({W.describe_state_dict(sd)}, {layout} layout)"
    arch = (config or {}).get("architecture")
    if isinstance(arch, str) and arch:
        import timm

        if timm.is_model(arch):
            return f"timm:{arch}", f"the timm architecture {arch} named in config.json"
    raise LookupError(W.describe_state_dict(sd))


# --------------------------------------------------------------------------- get_encoder


def _looks_like_path(s: str) -> bool:
    return (
        "/" in s or "\\" in s or s.startswith(("~", ".")) or s.lower().endswith(W.WEIGHT_SUFFIXES)
    )


def _parse(name_or_path) -> tuple[str, Any]:
    if name_or_path is None:
        return "offline", None
    if isinstance(name_or_path, os.PathLike):
        return "path", Path(name_or_path).expanduser()
    s = str(name_or_path).strip()
    low = s.lower()
    if not s or low in _OFFLINE_NAMES:
        return "offline", None
    preset = _preset(s)
    if preset is not None:
        return "preset", preset
    if low.startswith("timm:"):
        import timm

        name = s[5:].strip()
        if not name or not timm.is_model(name):
            raise InputError(s, "is not a model timm knows (see timm.list_models())")
        return "timm", name
    p = Path(s).expanduser()
    if p.exists() or _looks_like_path(s):
        return "path", p
    import timm

    if timm.is_model(s):
        return "timm", s
    names = ", ".join([DEFAULT_ENCODER, *PRESETS])
    raise InputError(s, f"is not an encoder: choose {names}, a timm model name (timm:NAME) or a weights file")


def _hub_weights(arch: str, *, token: str | None) -> tuple[Path, str]:
    preset = _preset(arch)
    if preset is not None:
        return W.hub_file(preset.repo_id, preset.filenames, token=token), preset.repo_id
    cfg = _meta_model(arch).pretrained_cfg or {}
    repo = cfg.get("hf_hub_id")
    if not repo:
        raise InputError(arch, "has no weights on the Hugging Face Hub that timm knows of; give a weights file with it")
    names = [cfg["hf_hub_filename"]] if cfg.get("hf_hub_filename") else []
    names += [n for n in ("model.safetensors", "pytorch_model.bin") if n not in names]
    return W.hub_file(repo, names, token=token), repo


def get_encoder(
    name_or_path: str | os.PathLike | None = None,
    *,
    token: str | None = None,
    weights: str | os.PathLike | None = None,
) -> Encoder:
    """The encoder a user named, in eval mode on the CPU.

    ``name_or_path``: None or "offline" (the default, needs nothing), a preset
    ("uni", "hoptimus0", "phikonv2"), a timm model ("timm:NAME" or a bare name timm
    knows), or a local weights file or folder (the architecture is then guessed
    among the presets from the tensor shapes). ``weights``: a local file or folder
    for the named architecture instead of the Hub. ``token``: a Hugging Face token
    for gated weights (else huggingface_hub's own token store); it is never kept."""
    kind, value = _parse(name_or_path)
    if kind == "offline":
        if weights is not None:
            raise InputError(weights, "the offline encoder takes no weights; name an architecture for them")
        from .offline import OfflineEncoder

        return OfflineEncoder()
    if kind == "path":
        if weights is not None:
            raise InputError(weights, f"two weights were given ({value} and this one); give one")
        file, config = W.resolve_weights_path(value)
        sd = W.read_state_dict(file)
        try:
            arch, why = guess_architecture(sd, config)
        except LookupError as exc:
            raise InputError(
                file,
                f"cannot tell which encoder these weights are for ({exc}): they fit none of "
                f"{', '.join(PRESETS)}; name the architecture together with the file (a preset or a timm model name)",
            ) from None
        note = f"{file}: loaded as {why}"
        logger.info(note)
        return build_encoder(arch, state_dict=sd, weights_hash=W.sha256_file(file), source=str(file),
                             config=config, note=note)
    arch = value.name if kind == "preset" else f"timm:{value}"
    if weights is not None:
        file, config = W.resolve_weights_path(weights)
        source = str(file)
    else:
        file, source = _hub_weights(arch, token=token)
        config = None
    sd = W.read_state_dict(file)
    return build_encoder(arch, state_dict=sd, weights_hash=W.sha256_file(file), source=source, config=config)
