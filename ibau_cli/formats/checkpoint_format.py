"""Plain PyTorch checkpoints (``torch.save`` of a state dict), loaded with ``weights_only=True``.

A file that needs full unpickling could run arbitrary code when loaded; ibau refuses it and
never falls back to an unsafe load.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError
from .base import LoadedModel, ModelFormat, SaveRequest, opened, state_dict_as_stored
from .metadata import ibau_metadata
from .state_dict import loaded_from_state_dict
from .zipped import check_zip_integrity, is_torch_save_zip

# where checkpoints keep the state dict; an exponential moving average only when nothing else is there
NESTED_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "net",
    "module",
    "weights",
    "state_dict_ema",
    "model_ema",
    "ema",
)
META_KEY = "ibau_metadata"


def _is_state_dict(obj: object) -> bool:
    """A dict of named tensors; a few plain numbers beside them (``_version``, a step count) allowed."""
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) for k in obj):
        return False
    tensors = sum(isinstance(v, torch.Tensor) for v in obj.values())
    others = [v for v in obj.values() if not isinstance(v, torch.Tensor)]
    return tensors > 0 and all(isinstance(v, int | float) for v in others) and len(others) <= max(2, tensors // 10)


def find_state_dict(obj: object, path: Path) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict itself, or one nested under a usual key (its tensors; plain numbers beside them
    dropped). Wrapper prefixes (``module.``, ...) are removed by load_strict, against the architecture."""
    where = "top level"
    if not _is_state_dict(obj) and isinstance(obj, dict):
        for key in NESTED_KEYS:
            if _is_state_dict(obj.get(key)):
                obj, where = obj[key], f"key {key!r}"
                break
    if not _is_state_dict(obj):
        keys = list(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
        raise InputError(
            f"{path}: no state dict found (top-level keys: {keys})",
            hint=f"save a dict of tensors, possibly under one of {', '.join(NESTED_KEYS)}",
        )
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}  # wrapper prefixes: load_strict
    return sd, where


def _refusal_reason(exc: Exception) -> str:
    """What the safe loader objected to, from torch's message: the unsupported global when it names
    one, without torch's advice on how to load the file unsafely, and without terminal escapes."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))
    for line in text.splitlines():
        m = re.search(
            r"(unsupported GLOBAL \S+|Unsupported (?:global|operand):? (?:GLOBAL )?\S+)", line, flags=re.IGNORECASE
        )
        if m:
            reason = m.group(1).strip().rstrip(".")[:200]
            if re.search(r"operand:? 149\b", reason):  # FRAME: a plain pickle (protocol 4+), not a torch.save file
                reason = "a plain Python pickle, not a torch.save file: " + reason
            return reason
    return "it holds objects other than tensors and plain containers"


def safe_load(path: Path) -> object:
    """``torch.load(weights_only=True)``; anything that needs more is refused, never retried."""
    if is_torch_save_zip(path):
        check_zip_integrity(path, "torch.save")
    try:
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": noise for the user
            warnings.simplefilter("ignore")
            with opened(path, "rb") as src:
                return torch.load(src, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise InputError(
            f"{path}: refused: loading it needs full unpickling, which can run arbitrary code ({_refusal_reason(exc)})",
            hint="ask the publisher for a safetensors or state-dict file, or convert it in a sandbox",
        ) from None
    except Exception as exc:
        raise InputError(
            f"{path}: not a readable PyTorch checkpoint ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
            hint="the file may be truncated or damaged; check its size and sha256",
        ) from None


class CheckpointFormat(ModelFormat):
    name = "checkpoint"
    save_from = ("safetensors", "checkpoint")  # a state dict: see SafetensorsFormat
    suffixes = (".pt", ".pth", ".bin", ".ckpt")

    def sniff(self, head: bytes, path: Path) -> bool:
        if head[:4] == b"PK\x03\x04":
            return is_torch_save_zip(path)
        return head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")  # legacy pickle

    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel:
        obj = safe_load(path)
        sd, where = find_state_dict(obj, path)
        meta = {}
        if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict):
            meta = {str(k): str(v) for k, v in obj[META_KEY].items()}
        loaded = loaded_from_state_dict(sd, arch, meta, path, fmt=self.name, device=device)
        loaded.notes.append(f"state dict at {where}")
        return loaded

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        sd = state_dict_as_stored(module, request)
        with opened(path, "wb") as dst:
            torch.save({"state_dict": sd, META_KEY: ibau_metadata(request)}, dst)
