"""Attention that can be differentiated twice.

The implicit hypergradient differentiates the inner problem's gradient again (a double backward).
PyTorch's fused attention kernels (flash and memory-efficient, on CPU and CUDA) have no double
backward: a model built on ``nn.MultiheadAttention`` or ``scaled_dot_product_attention`` failed the
repair with "derivative for aten::_scaled_dot_product_flash_attention_for_cpu_backward is not
implemented". Inside ``math_attention`` attention runs on the plain-operator kernel, which has one
(the same attention, in more memory). TorchScript models follow the same switch, except those
traced under ``torch.no_grad()``, whose graph holds a fused inference op with no gradient at all
(refused when loaded: ``formats/torchscript_format.py``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)


@contextlib.contextmanager
def math_attention() -> Iterator[None]:
    """Scaled dot-product attention on its plain-operator (math) kernel while inside."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel  # torch >= 2.3
    except ImportError:  # torch 2.2: the older switch
        with torch.backends.cuda.sdp_kernel(enable_flash=False, enable_math=True, enable_mem_efficient=False):
            yield
        return
    with sdpa_kernel([SDPBackend.MATH]):
        yield


def with_math_attention(fn: F) -> F:
    """``fn`` run inside ``math_attention``."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with math_attention():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
