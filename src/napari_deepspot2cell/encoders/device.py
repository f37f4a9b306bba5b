"""Device choice: `auto` = CUDA, then Apple MPS, then CPU; said to the user in words."""

from __future__ import annotations

import contextlib
import re

import torch

from ..errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device(name: str | torch.device | None = "auto") -> torch.device:
    if isinstance(name, torch.device):
        return name
    name = (name or "auto").lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(None, f"--device {name}: no CUDA GPU is visible to PyTorch (torch {torch.__version__}); use --device cpu or install a CUDA build of PyTorch")
        return torch.device(name)
    if name == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InputError(None, "--device mps: Apple Metal is not available here; use --device cpu")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(None, f"--device {name}: unknown device; choose one of {', '.join(DEVICES)}")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(idx)
        return f"CUDA: {torch.cuda.get_device_name(idx)} ({free / 2**30:.0f} of {total / 2**30:.0f} GiB free)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"


def autocast(device: torch.device):
    """bf16 autocast on CUDA (fp16 where bf16 is unsupported); full precision elsewhere."""
    if device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast("cuda", dtype=dtype)
    return contextlib.nullcontext()


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# ---------------------------------------------------------------- faults (reliability)

# What CUDA / MPS drivers say when the device itself fails mid-run (a lost or reset
# GPU, an Xid, a device-side assert): no retry on that device can succeed.
_DEVICE_FAILURE_MARKERS = (
    "cuda error", "device-side assert", "unspecified launch failure", "illegal memory access",
    "cublas_status", "cudnn_status", "cudnn error", "nccl error", "device not ready",
    "no cuda gpus are available", "cuda driver", "hip error", "mps backend failed",
)


class DeviceError(InputError):
    """The GPU failed during a run (lost, reset, a device-side assert): one line for the
    user, as an InputError, since there is nothing to debug in our code and the remedy
    (rerun, check the GPU, --device cpu) is theirs; finished cache chunks are kept."""


def is_device_failure(exc: BaseException) -> bool:
    accelerator_error = getattr(torch, "AcceleratorError", None)  # torch >= 2.8
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(m in text for m in _DEVICE_FAILURE_MARKERS)


def device_failure(exc: BaseException, device: torch.device) -> DeviceError:
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return DeviceError(
        None,
        f"the {device.type.upper()} device failed during embedding ({first}); the run stopped and finished "
        "embeddings stay in the cache: check the GPU (nvidia-smi), then rerun to resume, or use --device cpu",
    )


_ALLOCATE = re.compile(r"tried to allocate\s+([0-9.]+\s*[KMGT]i?B)", re.IGNORECASE)


def out_of_memory_needs(exc: BaseException, batch: int, side: int, device: torch.device) -> str:
    """How much memory the failed step wanted, in words: torch's 'Tried to allocate X GiB'
    when it says so, else the batch and tile size that did not fit (and what was free)."""
    found = _ALLOCATE.search(str(exc))
    if found:
        need = f"it tried to allocate {found.group(1)} more"
    else:
        need = f"a batch of {batch} tile(s) of {side} x {side} px did not fit"
    if device.type == "cuda":
        try:
            free, total = torch.cuda.mem_get_info(device)
            need += f" ({free / 2**30:.2f} of {total / 2**30:.2f} GiB free)"
        except Exception:  # a failing device cannot report its memory; the message stands without it
            pass
    return need
