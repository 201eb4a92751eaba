"""safetensors checkpoints: tensors only, so the architecture comes from --arch or metadata."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from torch import nn

from .. import __version__
from ..archs.resolve import build_user_model, builtin_spec, is_user_code
from ..errors import InputError
from ..preprocess import Preprocess
from .base import LoadedModel, ModelFormat, SaveRequest
from .state_dict import load_strict

META_ARCH = "ibau.arch"
META_CLASSES = "ibau.num_classes"
META_PRE = "ibau.preprocess"


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


class SafetensorsFormat(ModelFormat):
    name = "safetensors"
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
            raise InputError(f"{path}: not a readable safetensors file ({exc})") from exc
        source = "--arch"
        if arch is None:
            arch = meta.get(META_ARCH)
            source = "file metadata"
            if arch is None:
                raise InputError(
                    f"{path}: the architecture is unknown (a safetensors file holds only tensors)",
                    hint="pass --arch NAME (see `ibau archs`) or --arch path/to/file.py:ClassOrFactory",
                )
            if is_user_code(arch):
                raise InputError(
                    f"{path}: its metadata names user code {arch!r}, which ibau never runs on a file's say-so",
                    hint=f"pass --arch {arch} to allow it",
                )
        notes = [f"architecture {arch!r} from {source}"]
        if is_user_code(arch):
            meta_classes = meta.get(META_CLASSES)
            num_classes = int(meta_classes) if meta_classes and meta_classes.isdigit() else None
            module = build_user_model(arch, num_classes)
            num_classes = None
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
        module.to(device)
        module.eval()
        return LoadedModel(
            module=module,
            fmt=self.name,
            num_classes=num_classes or 0,
            arch=arch,
            preprocess=preprocess_from_metadata(meta, path),
            metadata=meta,
            notes=notes,
        )

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
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
        save_file(tensors, str(path), metadata=meta)
