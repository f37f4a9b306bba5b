"""Encoder weights: local files and folders, the Hugging Face Hub, key mapping.

Everything here runs without the network unless `hub_file` is asked for a file
that is not in the huggingface_hub cache. Files are never unpickled: PyTorch
files go through ``torch.load(..., weights_only=True)`` and safetensors through
``safetensors.torch.load_file``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Iterable, Mapping

import torch
import torch.nn.functional as F

from napari_deepspot2cell.errors import InputError

logger = logging.getLogger(__name__)

#: suffixes of a single weights file
WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
#: file names looked for, in this order, inside a weights folder
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth", "model.bin")
#: wrapper prefixes stripped from state-dict keys (training wrappers, DDP, Lightning)
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.", "dinov2.")
#: keys of a checkpoint dict under which the weights may be nested
_NESTED_KEYS = ("state_dict", "model_state_dict", "model", "teacher", "module", "net", "weights")

_OFFLINE_HINT = (
    "the weights are not in the local Hugging Face cache and this machine cannot reach the Hub; "
    "connect once to download them (they are cached afterwards), or give a local weights file "
    "with --encoder PATH (a .bin/.pth/.safetensors file or its folder)"
)


# --------------------------------------------------------------------------- local files


def resolve_weights_path(path: str | os.PathLike) -> tuple[Path, dict | None]:
    """The weights file named by ``path`` (a file, or a folder holding one) and the
    folder's ``config.json`` if it has one (else None)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise InputError(p, "no such weights file or folder")
    if p.is_file():
        if not p.name.lower().endswith(WEIGHT_SUFFIXES):
            raise InputError(
                p, f"is not a weights file: expected one of {', '.join(WEIGHT_SUFFIXES)} or a folder holding one"
            )
        return p, None
    folder = p
    snapshots = folder / "snapshots"
    if snapshots.is_dir():  # a huggingface_hub cache folder such as models--MahmoodLab--UNI
        snaps = sorted((s for s in snapshots.iterdir() if s.is_dir()), key=lambda s: s.stat().st_mtime)
        if snaps:
            folder = snaps[-1]
    for name in FOLDER_WEIGHT_FILES:
        f = folder / name
        if f.is_file():
            return f, _read_config(folder / "config.json")
    if (folder / "model.safetensors.index.json").is_file() or (folder / "pytorch_model.bin.index.json").is_file():
        raise InputError(folder, "holds sharded weights, which are not supported; merge them into one file")
    singles = sorted(f for f in folder.iterdir() if f.is_file() and f.name.lower().endswith(WEIGHT_SUFFIXES))
    if len(singles) == 1:
        return singles[0], _read_config(folder / "config.json")
    if singles:
        names = ", ".join(f.name for f in singles[:4])
        raise InputError(folder, f"holds several weights files ({names}); name the one to use")
    raise InputError(folder, f"holds no weights file (looked for {', '.join(FOLDER_WEIGHT_FILES)})")


def _read_config(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(path, f"is not valid JSON ({exc})") from None
    if not isinstance(cfg, dict):
        raise InputError(path, "does not hold a JSON object")
    return cfg


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, on the CPU, with wrapper prefixes stripped."""
    path = Path(path)
    if path.name.lower().endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise InputError(path, f"is not a readable safetensors file ({_short(exc)})") from None
    else:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "global" not in str(exc).lower():  # not refused objects: broken or not a PyTorch file
                raise InputError(path, "is not a readable PyTorch weights file (it could not be unpickled)") from None
            raise InputError(
                path,
                "holds Python objects besides tensors and was not unpickled, for safety; save only the state "
                "dict (torch.save(model.state_dict(), path)) or convert it to .safetensors",
            ) from None
        except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError) as exc:
            raise InputError(path, f"is not a readable PyTorch weights file ({_short(exc)})") from None
    sd = _unwrap(obj)
    if not sd:
        raise InputError(path, "holds no tensors")
    return strip_prefixes(sd)


def _unwrap(obj, depth: int = 0) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping) or depth > 4:
        return {}
    tensors = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    for key in _NESTED_KEYS:
        inner = obj.get(key)
        if isinstance(inner, Mapping):
            found = _unwrap(inner, depth + 1)
            if len(found) > len(tensors):
                return found
    return tensors


def strip_prefixes(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``backbone.``, ...) from keys.

    A prefix is removed when every key has it, or when most keys have it (a
    classifier head kept outside the wrapped backbone keeps its name)."""
    sd = dict(sd)
    changed = True
    while changed and sd:
        changed = False
        for prefix in STRIP_PREFIXES:
            n = sum(k.startswith(prefix) for k in sd)
            if n and n * 2 > len(sd):
                stripped = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in sd.items()}
                if len(stripped) == len(sd):  # no collisions
                    sd = stripped
                    changed = True
    return sd


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --------------------------------------------------------------------------- hashing


def _hash_cache_file() -> Path:
    root = os.environ.get("NAPARI_DEEPSPOT2CELL_CACHE")
    if root:
        base = Path(root)
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "napari-deepspot2cell"
    return base / "weights-sha256.json"


def sha256_file(path: str | os.PathLike, *, chunk_size: int = 8 << 20) -> str:
    """sha256 hex digest of a file's bytes, streamed in chunks.

    The digest is remembered in a small JSON sidecar keyed by the resolved path,
    size, mtime, ctime and inode, so a 4 GB file is read once, not at every start.
    (os.utime can put an edited file's mtime back, not its ctime; a file replaced by
    a copy has a new inode: as for the slides' identity, a false miss only re-hashes.)"""
    real = Path(path).resolve()
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
    cache_file = _hash_cache_file()
    cache: dict = {}
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
        if not isinstance(cache, dict):
            cache = {}
    except (OSError, ValueError):
        cache = {}
    if isinstance(cache.get(key), str):
        return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        while True:
            block = fh.read(chunk_size)
            if not block:
                break
            h.update(block)
    digest = h.hexdigest()
    cache = {k: v for k, v in cache.items() if not k.startswith(f"{real}|")}
    cache[key] = digest
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_name(f"{cache_file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0), encoding="utf-8")
        os.replace(tmp, cache_file)
    except OSError:  # a read-only home only costs re-hashing next time
        pass
    return digest


def tensors_sha256(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, shapes, dtypes and bytes (for weights not from a file)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- the Hub


def hf_hub_download(*args, **kwargs):  # indirection so tests can replace the download
    from huggingface_hub import hf_hub_download as _download

    return _download(*args, **kwargs)


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_cache_dir() -> str | None:
    """The hub cache the environment names now (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return os.environ["HUGGINGFACE_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    return None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or huggingface_hub's own offline switch) is on."""
    if _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE"):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.is_offline_mode()) if hasattr(constants, "is_offline_mode") else bool(
            constants.HF_HUB_OFFLINE
        )
    except Exception:  # pragma: no cover - a broken install is not offline mode
        return False


def _gated_error(repo_id: str) -> InputError:
    return InputError(
        repo_id,
        f"is gated: request access at https://huggingface.co/{repo_id} and log in with `hf auth login` "
        "or paste a token in the widget",
    )


def _hf_error(name: str) -> tuple[type, ...]:
    """huggingface_hub's exception class ``name`` (as a 1-tuple), () where this version lacks it."""
    import huggingface_hub.utils as hf_utils

    try:
        import huggingface_hub.errors as hf_errors
    except ImportError:  # older huggingface_hub keeps them in utils only
        hf_errors = hf_utils
    cls = getattr(hf_errors, name, None) or getattr(hf_utils, name, None)
    return (cls,) if isinstance(cls, type) else ()


def _classify_hub_error(exc: BaseException) -> str:
    """'gated', 'offline', 'missing' (file not in the repo) or 'other'."""
    if isinstance(exc, _hf_error("GatedRepoError") + _hf_error("LocalTokenNotFoundError")):
        return "gated"
    if isinstance(exc, _hf_error("RepositoryNotFoundError")):
        return "gated"  # the Hub answers 401 'not found' to anonymous requests for gated repos
    if isinstance(exc, _hf_error("HfHubHTTPError")):
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status in (401, 403):
            return "gated"
        if isinstance(exc, _hf_error("RemoteEntryNotFoundError")) or status == 404:
            return "missing"
        return "offline" if status is None or status >= 500 else "other"
    if isinstance(exc, _hf_error("EntryNotFoundError")) and not isinstance(exc, FileNotFoundError):
        return "missing"
    if isinstance(exc, _hf_error("OfflineModeIsEnabled") + (FileNotFoundError, ConnectionError, TimeoutError)):
        return "offline"
    name = type(exc).__name__
    if any(s in name for s in ("Connect", "Timeout", "Network", "Proxy")):
        return "offline"
    return "other"


def hub_file(repo_id: str, filenames: Iterable[str], *, token: str | None = None) -> Path:
    """Path of the first of ``filenames`` that huggingface_hub can give for ``repo_id``
    (from its cache or downloaded), with its token store and HF_HUB_OFFLINE respected.

    Errors become one-line InputErrors that never hold the token."""
    filenames = tuple(filenames)
    token = token.strip() if isinstance(token, str) and token.strip() else None
    local_only = hub_offline()
    cache_dir = _hub_cache_dir()
    kinds: list[str] = []
    for filename in filenames:
        kwargs = dict(token=token, local_files_only=local_only)
        if cache_dir:
            kwargs["cache_dir"] = cache_dir
        failure = None
        try:
            return Path(hf_hub_download(repo_id, filename, **kwargs))
        except Exception as exc:  # mapped below, outside the handler: no chained exception keeps its text
            kind = _classify_hub_error(exc)
            logger.debug("hub download of %s/%s failed: %s", repo_id, filename, type(exc).__name__)
            if kind == "other" and not type(exc).__module__.startswith(
                ("huggingface_hub", "httpx", "requests", "urllib3")
            ):
                raise  # not a Hub problem: a bug, keep its traceback
            failure = (kind, type(exc).__name__)
        kind, exc_name = failure
        if kind == "gated":
            raise _gated_error(repo_id)
        if kind == "other":
            raise InputError(
                repo_id,
                f"could not be downloaded from the Hugging Face Hub ({exc_name}); "
                "give a local weights file with --encoder PATH",
            )
        kinds.append(kind)
    if "offline" in kinds:
        raise InputError(repo_id, _OFFLINE_HINT)
    raise InputError(repo_id, f"has none of the weights files {', '.join(filenames)} on the Hub")


# --------------------------------------------------------------------------- key mapping


def is_hf_dinov2(sd: Mapping[str, torch.Tensor]) -> bool:
    """Whether a state dict is in the transformers Dinov2Model layout."""
    return "embeddings.patch_embeddings.projection.weight" in sd


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_LAYER_MAP = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias",
}
_HF_TOP_MAP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def hf_dinov2_to_timm(
    sd: Mapping[str, torch.Tensor], grid: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Map a transformers ``Dinov2Model`` state dict onto a timm VisionTransformer
    with a class token, layer scale and no register tokens.

    The separate query/key/value projections are stacked into timm's ``qkv``; the
    (unused at inference) mask token is dropped; keys this mapping does not know
    are kept as they are, so that they show up as unexpected. ``grid``: the
    target patch grid; position embeddings of another grid are resampled the way
    transformers does at run time (bicubic, align_corners=False)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "embeddings.mask_token":
            continue
        if key in _HF_TOP_MAP:
            out[_HF_TOP_MAP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m:
            i, rest = m.groups()
            if rest in _HF_LAYER_MAP:
                out[f"blocks.{i}.{_HF_LAYER_MAP[rest]}"] = value
                continue
            q = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if q:
                qkv.setdefault((i, q.group(2)), {})[q.group(1)] = value
                continue
        out[key] = value
    for (i, kind), parts in qkv.items():
        if len(parts) == 3:
            out[f"blocks.{i}.attn.qkv.{kind}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
        else:  # incomplete: keep the originals so the mismatch is reported
            for which, value in parts.items():
                out[f"encoder.layer.{i}.attention.attention.{which}.{kind}"] = value
    pos = out.get("pos_embed")
    if grid is not None and pos is not None and pos.ndim == 3 and pos.device.type != "meta":
        n_patch = pos.shape[1] - 1
        side = int(round(n_patch**0.5))
        if side * side == n_patch and (side, side) != tuple(grid):
            cls_pos, patch_pos = pos[:, :1], pos[:, 1:]
            dim = pos.shape[-1]
            patch_pos = patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2)
            patch_pos = F.interpolate(patch_pos.float(), size=tuple(grid), mode="bicubic", align_corners=False)
            patch_pos = patch_pos.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, -1, dim)
            out["pos_embed"] = torch.cat([cls_pos, patch_pos], 1)
    return out


# --------------------------------------------------------------------------- fitting a state dict


def mismatch(
    expected: Mapping[str, torch.Size | tuple], sd: Mapping[str, torch.Tensor], classifier: str | None = None
) -> tuple[list[str], list[str], list[tuple[str, tuple, tuple]]]:
    """(missing, unexpected, wrong-shape) keys of ``sd`` against the expected shapes.

    Unexpected keys of a classifier head (``classifier.``) that the model does
    not have are not counted: an encoder has num_classes=0."""
    missing = [k for k in expected if k not in sd]
    unexpected = [
        k
        for k in sd
        if k not in expected and not (classifier and (k == classifier or k.startswith(classifier + ".")))
    ]
    wrong = [
        (k, tuple(sd[k].shape), tuple(expected[k]))
        for k in expected
        if k in sd and tuple(sd[k].shape) != tuple(expected[k])
    ]
    return missing, unexpected, wrong


def describe_mismatch(arch: str, missing, unexpected, wrong) -> str:
    def few(names):
        names = list(names)
        shown = ", ".join(names[:3])
        return f" (e.g. {shown}{', ...' if len(names) > 3 else ''})" if names else ""

    parts = []
    if missing:
        parts.append(f"{len(missing)} keys missing{few(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected{few(unexpected)}")
    if wrong:
        k, got, want = wrong[0]
        parts.append(f"{len(wrong)} of the wrong shape (e.g. {k}: file {list(got)} vs model {list(want)})")
    return (
        f"these weights do not fit the {arch} architecture: {'; '.join(parts)}. Check that the file holds "
        f"{arch} weights, or name the architecture they belong to (uni, hoptimus0, phikonv2 or a timm model name)"
    )


def describe_state_dict(sd: Mapping[str, torch.Tensor]) -> str:
    """A short human description of a ViT-like state dict: patch size, width, depth."""
    w = sd.get("patch_embed.proj.weight", sd.get("embeddings.patch_embeddings.projection.weight"))
    blocks = {m.group(1) for k in sd for m in [re.match(r"^(?:blocks|encoder\.layer)\.(\d+)\.", k)] if m}
    bits = [f"{len(sd)} tensors"]
    if w is not None and w.ndim == 4:
        bits.insert(0, f"patch {w.shape[-1]}, width {w.shape[0]}, {len(blocks)} blocks")
    return ", ".join(bits)
