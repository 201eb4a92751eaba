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
from .base import LoadedModel, ModelFormat, SaveRequest, fixed_batches, opened
from .metadata import META_ARCH, ibau_metadata, num_classes_from_metadata, preprocess_from_metadata
from .zipped import check_zip_integrity, zip_members

EXTRA = "ibau.json"


class FixedMode(nn.Module):
    """Holds an exported module; ``train()``/``eval()`` stop here instead of raising inside it.

    ``batch_range``: the batch sizes the program accepts, (low, high or None), when its export
    bounded them (a fixed batch is (B, B)). Other batches run in chunks within the range, the last
    one padded by repeating an image (eval mode: images do not interact, so the answers and the
    gradients are those of the whole batch).
    """

    def __init__(self, inner: nn.Module, batch_range: tuple[int, int | None] | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.batch_range = batch_range

    def train(self, mode: bool = True) -> FixedMode:
        self.training = mode
        return self

    def forward(self, x: Tensor) -> Tensor:
        if self.batch_range is None:
            return self.inner(x)
        low, high = self.batch_range
        n = len(x)
        if n >= low and (high is None or n <= high):
            return self.inner(x)
        size = high if high is not None and n > high else low
        return torch.cat([self.inner(x[idx])[:real] for idx, real in fixed_batches(n, size)])


def is_exported_program(path: Path) -> bool:
    names = zip_members(path) or []
    return any(n.endswith("/archive_format") for n in names) and any("/models/" in n for n in names)


def batch_range(program) -> tuple[int, int | None] | None:
    """The batch sizes the program's first input accepts, (low, high; None: no bound), when its
    export fixed or bounded them; None when any batch runs (or the graph does not say)."""
    try:
        name = program.graph_signature.user_inputs[0]
        node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
        first = node.meta["val"].shape[0]
    except (AttributeError, IndexError, KeyError, StopIteration, TypeError):
        return None
    if isinstance(first, int):
        return (first, first)
    try:
        bounds = program.range_constraints[first.node.expr]
    except (AttributeError, KeyError, TypeError):
        return None
    high = _finite_int(bounds.upper)
    return None if high is None else (max(1, _finite_int(bounds.lower) or 1), high)


def _finite_int(value) -> int | None:
    try:
        number = int(value)
    except Exception:  # sympy's and torch's infinities raise anything from TypeError to AttributeError
        return None
    return number if number < 2**62 else None  # torch's int_oo converts to a huge number


class ExportedProgramFormat(ModelFormat):
    carries_graph = True
    name = "torch-export"
    save_from = ("safetensors", "checkpoint", "torch-export")  # torch.export needs an eager module
    suffixes = (".pt2",)

    def sniff(self, head: bytes, path: Path) -> bool:
        return head[:4] == b"PK\x03\x04" and is_exported_program(path)

    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel:
        if arch is not None:
            raise InputError(f"{path}: a torch.export program carries its own graph; drop --arch")
        check_zip_integrity(path, "torch.export")
        extra = {EXTRA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with opened(path, "rb") as src:
                    program = torch.export.load(src, extra_files=extra)
                module = program.module()
        except Exception as exc:
            raise InputError(f"{path}: not a loadable torch.export program ({type(exc).__name__}: {exc})") from exc
        batches = batch_range(program)
        notes = ["graph from the torch.export program (BatchNorm mode fixed at export)"]
        if batches is not None:
            low, high = batches
            accepted = f"a fixed batch of {low}" if low == high else f"batches of {low} to {high}"
            notes.append(f"the program accepts {accepted}: ibau runs it in chunks within that range")
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
            module=FixedMode(module, batches).to(device),
            fmt=self.name,
            num_classes=num_classes_from_metadata(meta, path) or 0,
            arch=meta.get(META_ARCH, "torch-export"),
            preprocess=preprocess_from_metadata(meta, path),
            metadata=meta,
            notes=notes,
        )
        loaded.input_hint = hint
        return loaded

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        inner = module.inner if isinstance(module, FixedMode) else module.eval()
        h, w = request.preprocess.input_size
        # Exported on the CPU: a program traced on CUDA records CUDA devices (it would not load on a
        # machine without one) and CUDA convolutions guard the batch axis (at most 65,535), which
        # torch.export refuses for a dynamic batch. The module goes back to its device afterwards.
        # A program loaded with a fixed or bounded batch is written with the same one: its module
        # checks the range, and an export asking for more is refused.
        device = next(module.parameters()).device
        bounds = module.batch_range if isinstance(module, FixedMode) else None
        if bounds is not None and bounds[0] == bounds[1]:
            example, dynamic = torch.rand(bounds[0], request.preprocess.channels, h, w), None
        else:
            dim = torch.export.Dim("batch") if bounds is None else torch.export.Dim("batch", max=bounds[1])
            example, dynamic = torch.rand(2, request.preprocess.channels, h, w), ({0: dim},)
        try:
            inner.cpu()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                program = torch.export.export(inner, (example,), dynamic_shapes=dynamic)
                with opened(path, "wb") as dst:
                    torch.export.save(program, dst, extra_files={EXTRA: json.dumps(ibau_metadata(request))})
        finally:
            inner.to(device)
