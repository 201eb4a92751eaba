"""The ``ibau.*`` string metadata written into outputs, so ibau reloads them with no flags."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .. import __version__
from ..errors import InputError
from ..preprocess import Preprocess
from .base import SaveRequest

META_ARCH = "ibau.arch"
META_CLASSES = "ibau.num_classes"
META_PRE = "ibau.preprocess"


def ibau_metadata(request: SaveRequest) -> dict[str, str]:
    meta = dict(request.extra_metadata)
    meta.update(
        {
            META_CLASSES: str(request.num_classes),
            META_PRE: json.dumps(request.preprocess.to_dict()),
            "ibau.format_version": "1",
            "ibau.version": __version__,
            "ibau.torch_version": torch.__version__.split("+")[0],
        }
    )
    if request.arch:
        meta[META_ARCH] = request.arch
    return meta


def num_classes_from_metadata(meta: dict[str, str], path: Path) -> int | None:
    """``ibau.num_classes`` as a positive integer, None when absent; anything else is an error."""
    raw = meta.get(META_CLASSES)
    if raw is None:
        return None
    if not raw.strip().isdigit() or int(raw) < 1:
        raise InputError(
            f"{path}: metadata {META_CLASSES} is {raw!r}, not a positive integer",
            hint="fix or remove that metadata key (the class count is read from the model otherwise)",
        )
    return int(raw)


def preprocess_from_metadata(meta: dict[str, str], path: Path) -> Preprocess | None:
    raw = meta.get(META_PRE)
    if raw is None:
        return None
    try:
        d = json.loads(raw)
        return Preprocess(
            input_size=tuple(int(v) for v in d["input_size"]),
            channels=int(d["channels"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
            value_range=tuple(float(v) for v in d.get("value_range", (0.0, 1.0))),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise InputError(f"{path}: metadata {META_PRE} is not valid ({exc})") from exc
