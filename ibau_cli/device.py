"""Device selection and mixed precision."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

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
    """The autocast dtype to use for forward-only or first-order work, or None. On a CPU only an
    explicit ``bf16`` turns it on (about 2x faster on CPUs with AVX-512 BF16 or AMX, emulated and slower
    on others); ``auto`` and ``fp16`` stay in full precision there."""
    if device.type == "cpu":
        return torch.bfloat16 if amp == "bf16" else None
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


@contextlib.contextmanager
def full_precision() -> Iterator[None]:
    """Plain fp32 matrix products and convolutions on CUDA (no TF32, which cuDNN uses for fp32
    convolutions by default and which moves logits by ~1e-2): for comparisons with another runtime."""
    flags = (torch.backends.cuda.matmul, torch.backends.cudnn)
    try:
        saved = [f.allow_tf32 for f in flags]
    except RuntimeError:  # a process that set the newer fp32_precision API: leave its choice alone
        yield
        return
    for f in flags:
        f.allow_tf32 = False
    try:
        yield
    finally:
        for f, value in zip(flags, saved, strict=True):
            f.allow_tf32 = value


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPUs this process may use under a cgroup quota (``docker run --cpus 2``, a Kubernetes CPU
    limit), or None without one. cgroup v2 ``cpu.max``, else v1 ``cpu.cfs_quota_us``."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota_us / period_us if quota_us > 0 and period_us > 0 else None


def fit_threads_to_cpu_quota(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Lower torch's CPU thread count to the cgroup CPU quota, and return the new count.

    In a container limited to a few CPUs, torch still sees every host core and starts one thread
    per core; the threads then wait on the quota and CPU work runs several times slower. Nothing
    changes when OMP_NUM_THREADS is set (the user chose) or when there is no quota below the count.
    """
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    limit = cgroup_cpu_limit(root)
    if limit is None:
        return None
    threads = max(1, math.floor(limit))
    if threads >= torch.get_num_threads():
        return None
    torch.set_num_threads(threads)
    return threads
