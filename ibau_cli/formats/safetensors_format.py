"""safetensors checkpoints: tensors only, so the architecture comes from --arch or metadata."""

from __future__ import annotations

import struct
from pathlib import Path

from torch import nn

from ..errors import InputError
from .base import LoadedModel, ModelFormat, SaveRequest, state_dict_as_stored
from .metadata import ibau_metadata
from .state_dict import loaded_from_state_dict


class SafetensorsFormat(ModelFormat):
    name = "safetensors"
    # a state dict reloads only with its architecture: not from a graph format (TorchScript, ONNX, .pt2)
    save_from = ("safetensors", "checkpoint")
    suffixes = (".safetensors",)

    def sniff(self, head: bytes, path: Path) -> bool:
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return 2 <= n < 100_000_000 and head[8:9] == b"{"

    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel:
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
            tensors = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"{path}: not a readable safetensors file ({exc})",
                hint="check that the download is complete (size, sha256)",
            ) from exc
        return loaded_from_state_dict(tensors, arch, meta, path, fmt=self.name, device=device)

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        from safetensors.torch import save_file

        tensors = state_dict_as_stored(module, request)
        save_file(tensors, str(path), metadata=ibau_metadata(request))
