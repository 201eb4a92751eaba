"""``torch.export`` programs (``.pt2``), the successor torch offers to TorchScript.

Loaded with ``torch.export.load`` (a serialised graph and weights, no Python code), run through
``ExportedProgram.module()``, which trains and supports double backward; saved by exporting the
repaired module again with a dynamic batch axis. Such modules refuse ``.train()``/``.eval()``:
their BatchNorm mode was fixed at export, and ibau keeps it (it unlearns in eval mode anyway).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..errors import InputError
from .base import LoadedModel, ModelFormat, SaveRequest
from .metadata import META_ARCH, ibau_metadata, num_classes_from_metadata, preprocess_from_metadata
from .zipped import zip_members

EXTRA = "ibau.json"


class FixedMode(nn.Module):
    """Holds an exported module; ``train()``/``eval()`` stop here instead of raising inside it."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def train(self, mode: bool = True) -> FixedMode:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x)


def is_exported_program(path: Path) -> bool:
    names = zip_members(path) or []
    return any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


def _static_batch(program) -> int | None:
    """The first user input's batch size when the program fixed it at export, else None."""
    try:
        name = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
        first = node.meta["val"].shape[0]
    except (AttributeError, IndexError, KeyError, StopIteration, TypeError):
        return None
    return int(first) if isinstance(first, int) else None


class ExportedProgramFormat(ModelFormat):
    name = "torch-export"
    save_from = ("safetensors", "checkpoint", "torch-export")  # torch.export needs an eager module
    suffixes = (".pt2",)

    def sniff(self, head: bytes, path: Path) -> bool:
        return head[:4] == b"PK\x03\x04" and is_exported_program(path)

    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel:
        if arch is not None:
            raise InputError(f"{path}: a torch.export program carries its own graph; drop --arch")
        extra = {EXTRA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.load(str(path), extra_files=extra)
                module = program.module()
        except Exception as exc:
            raise InputError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
        batch = _static_batch(program)
        if batch is not None:
            raise InputError(
                f"{path}: the program was exported with a fixed batch of {batch}; ibau runs batches of other sizes",
                hint="re-export with a dynamic batch axis: torch.export.export(model.eval(), (x,), "
                "dynamic_shapes=({0: torch.export.Dim('batch')},))",
            )
        meta = {str(k): str(v) for k, v in json.loads(extra.get(EXTRA) or "{}").items()}
        hint = None
        example = getattr(program, "example_inputs", None)
        try:
            first = example[0][0] if example else None
            if isinstance(first, Tensor) and first.dim() == 4 and first.shape[1] in (1, 3):
                hint = (int(first.shape[1]), int(first.shape[2]), int(first.shape[3]))
        except (TypeError, IndexError):
            hint = None
        loaded = LoadedModel(
            module=FixedMode(module).to(device),
            fmt=self.name,
            num_classes=num_classes_from_metadata(meta, path) or 0,
            arch=meta.get(META_ARCH, "torch-export"),
            preprocess=preprocess_from_metadata(meta, path),
            metadata=meta,
            notes=["graph from the torch.export program (BatchNorm mode fixed at export)"],
        )
        loaded.input_hint = hint
        return loaded

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        inner = module.inner if isinstance(module, FixedMode) else module.eval()
        h, w = request.preprocess.input_size
        # Exported on the CPU: a program traced on CUDA records CUDA devices (it would not load on a
        # machine without one) and CUDA convolutions guard the batch axis (at most 65,535), which
        # torch.export refuses for a dynamic batch. The module goes back to its device afterwards.
        device = next(module.parameters()).device
        example = torch.rand(2, request.preprocess.channels, h, w)
        try:
            inner.cpu()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(inner, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
                torch.export.save(program, str(path), extra_files={EXTRA: json.dumps(ibau_metadata(request))})
        finally:
            inner.to(device)
