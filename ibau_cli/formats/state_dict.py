"""Loading a state dict into a module strictly, with an error that lists every mismatch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import InputError

_OPTIONAL_SUFFIXES = ("num_batches_tracked",)


def _short(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def load_strict(module: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    expected = module.state_dict()
    missing = [k for k in expected if k not in tensors and not k.endswith(_OPTIONAL_SUFFIXES)]
    unexpected = [k for k in tensors if k not in expected]
    misshaped = [
        f"{k} file {list(tensors[k].shape)} vs model {list(v.shape)}"
        for k, v in expected.items()
        if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if misshaped:
            parts.append(f"mis-shaped {len(misshaped)}: {_short(misshaped, 3)}")
        raise InputError(
            f"{path}: weights do not fit the architecture ({'; '.join(parts)})",
            hint="check --arch, or pass your own model code with --arch file.py:Class",
        )
    present = {k: v for k, v in tensors.items() if k in expected}
    module.load_state_dict(present, strict=False)
