"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .errors import UsageError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda when available else cpu; ``cpu``; ``cuda`` / ``cuda:N``."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "cuda" or spec.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device {spec}: CUDA is not available in this torch build or machine",
                hint="use --device cpu or install a CUDA build of torch",
            )
        index = spec.partition(":")[2]
        if index:
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise UsageError(f"--device {spec}: no such GPU (this machine has {torch.cuda.device_count()})")
        return torch.device(spec)
    raise UsageError(f"--device {spec!r} is not one of auto, cpu, cuda, cuda:N")


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype to use for forward-only or first-order work, or None."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "fp16":
        return torch.float16
    if amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None  # auto on a GPU without bf16: full precision (fp16 needs loss scaling)


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
