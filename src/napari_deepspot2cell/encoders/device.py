"""Device choice: `auto` = CUDA, then Apple MPS, then CPU; said to the user in words."""

from __future__ import annotations

import contextlib

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
