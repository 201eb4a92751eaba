"""safetensors checkpoints: tensors only, so the architecture comes from --arch or metadata."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from torch import nn

from ..errors import InputError
from .base import LoadedModel, ModelFormat, SaveRequest, state_dict_as_stored, utf8_path
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
            if utf8_path(path):
                with safe_open(str(path), framework="pt") as fh:
                    meta = dict(fh.metadata() or {})
                tensors = load_file(str(path), device="cpu")
            else:  # the library takes UTF-8 paths only: a name in another encoding is read here
                meta, tensors = _load_bytes(path.read_bytes())
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"{path}: not a readable safetensors file ({exc})",
                hint="check that the download is complete (size, sha256)",
            ) from exc
        return loaded_from_state_dict(tensors, arch, meta, path, fmt=self.name, device=device)

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        from safetensors.torch import save

        tensors = state_dict_as_stored(module, request)
        path.write_bytes(with_sorted_header(save(tensors, metadata=ibau_metadata(request))))


def _load_bytes(data: bytes) -> tuple[dict, dict]:
    from safetensors.torch import load

    _, header = _header(data)
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return dict(meta or {}), load(data)


def _header(data: bytes) -> tuple[int, dict]:
    """A safetensors file's header: its length in bytes and its JSON (ValueError when unreadable)."""
    if len(data) < 8:
        raise ValueError("file too short for a safetensors header")
    (n,) = struct.unpack("<Q", data[:8])
    try:
        return n, json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable header: {exc}") from None


def with_sorted_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header in a fixed order: metadata keys sorted,
    tensors by offset. The writer keeps the metadata in a hash map whose order changes from run to
    run, so two identical repairs gave files with different sha256 sums (a registry or a CI cache
    that compares hashes saw a change where there was none). The tensor bytes are untouched: their
    offsets count from the end of the header."""
    n, header = _header(data)
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta else {}
    ordered.update(sorted(header.items(), key=lambda kv: (kv[1]["data_offsets"][0], kv[0])))
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the writer pads the header to 8 bytes so the tensors stay aligned
    return struct.pack("<Q", len(text)) + text + data[8 + n :]
