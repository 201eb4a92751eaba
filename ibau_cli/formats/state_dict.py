"""Loading a state dict into a module strictly, with an error that lists every mismatch."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..archs.resolve import build_user_model, builtin_spec, is_user_code
from ..errors import InputError
from .base import LoadedModel
from .metadata import META_ARCH, META_CLASSES, preprocess_from_metadata

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


def loaded_from_state_dict(
    tensors: dict[str, torch.Tensor], arch: str | None, meta: dict[str, str], path: Path, *, fmt: str, device: str
) -> LoadedModel:
    """Build the architecture (from ``--arch`` or the file's metadata), load the tensors and
    return the model with what the file says of it. The number of classes is 0 when only a
    forward pass can tell. Never guesses an architecture from tensor names.
    """
    source = "--arch"
    if arch is None:
        arch = meta.get(META_ARCH)
        source = "file metadata"
        if arch is None:
            raise InputError(
                f"{path}: the architecture is unknown (the file holds only tensors)",
                hint="pass --arch NAME (see `ibau archs`) or --arch path/to/file.py:ClassOrFactory",
            )
        if is_user_code(arch):
            raise InputError(
                f"{path}: its metadata names user code {arch!r}, which ibau never runs on a file's say-so",
                hint=f"pass --arch {arch} to allow it",
            )
    notes = [f"architecture {arch!r} from {source}"]
    if is_user_code(arch):
        meta_classes = meta.get(META_CLASSES, "")
        module = build_user_model(arch, int(meta_classes) if meta_classes.isdigit() else None)
        num_classes = 0
    else:
        spec = builtin_spec(arch)
        weight = tensors.get(spec.classifier_key)
        if weight is None or weight.ndim < 1:
            raise InputError(
                f"{path}: no tensor {spec.classifier_key!r}, which architecture {arch!r} needs for its final layer",
                hint="check --arch; `ibau inspect` lists the file's tensors",
            )
        num_classes = int(weight.shape[0])
        module = spec.build(num_classes)
    load_strict(module, tensors, path)
    return LoadedModel(
        module=module.to(device).eval(),
        fmt=fmt,
        num_classes=num_classes,
        arch=arch,
        preprocess=preprocess_from_metadata(meta, path),
        metadata=meta,
        notes=notes,
    )
