"""TorchScript archives (``torch.jit.save``): the graph travels with the weights.

Loaded with ``torch.jit.load`` (TorchScript code is a restricted language, not arbitrary Python),
unlearned like any module (ScriptModules support double backward), saved back with
``torch.jit.save`` so a plain ``torch.jit.load`` runs it with no ibau installed. ibau's metadata
rides along as the archive's extra file ``ibau.json``.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, UsageError, first_line
from .base import LoadedModel, ModelFormat, SaveRequest, opened
from .metadata import META_ARCH, ibau_metadata, num_classes_from_metadata, preprocess_from_metadata
from .zipped import check_zip_integrity, is_torchscript_zip

EXTRA = "ibau.json"


class TorchScriptFormat(ModelFormat):
    carries_graph = True
    name = "torchscript"
    # scripting or tracing needs a torch module of the architecture (or a TorchScript one already)
    save_from = ("safetensors", "checkpoint", "torchscript")
    suffixes = (".pt", ".pth", ".ts", ".torchscript", ".jit")

    def sniff(self, head: bytes, path: Path) -> bool:
        return head[:4] == b"PK\x03\x04" and is_torchscript_zip(path)

    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel:
        check_zip_integrity(path, "TorchScript")
        extra = {EXTRA: ""}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with opened(path, "rb") as src:
                    module = torch.jit.load(src, map_location="cpu", _extra_files=extra)
        except Exception as exc:  # torch raises RuntimeError and friends for bad archives
            text = " ".join(str(exc).split())
            op = re.search(r"Unknown builtin op: (\S+?)\.", text)
            if op:  # torch.ops.<library>.<name>: code outside the archive, which ibau cannot have
                raise InputError(
                    f"{path}: the TorchScript archive calls the custom operator {op.group(1)}, which is not loaded",
                    hint="export the model without custom operators (or as ONNX); ibau loads no extension libraries",
                ) from None
            raise InputError(
                f"{path}: not a loadable TorchScript archive ({type(exc).__name__}: {text[:300]})"
            ) from exc
        meta: dict[str, str] = {}
        raw = extra.get(EXTRA) or b""
        if raw:
            try:
                meta = {str(k): str(v) for k, v in json.loads(raw).items()}
            except (ValueError, AttributeError) as exc:
                raise InputError(f"{path}: its extra file {EXTRA} is not valid JSON ({exc})") from exc
        if arch is not None:
            raise InputError(f"{path}: a TorchScript file carries its own graph; drop --arch")
        params = list(module.parameters())
        if not params:
            raise InputError(f"{path}: the TorchScript module has no parameters to repair")
        if any(t.is_meta for t in [*params, *module.buffers()]):
            raise InputError(
                f"{path}: the TorchScript archive holds no weight data (its tensors are on the meta device)",
                hint="save the module after its weights are materialised (e.g. after loading a checkpoint into it)",
            )
        _check_one_input(module, path)
        _check_differentiable(module, path)
        notes = ["graph from the TorchScript archive (BatchNorm mode as traced or scripted)"]
        stored = {
            k: v.dtype for k, v in module.state_dict().items() if v.is_floating_point() and v.dtype != torch.float32
        }
        if stored:  # computed in float32, like a half-precision state dict; written back in its dtypes
            _cast(module, dict.fromkeys(stored, torch.float32))
            kinds = ", ".join(sorted({str(d).replace("torch.", "") for d in stored.values()}))
            notes.append(f"{len(stored)} tensors stored as {kinds}: computed in float32, written back as {kinds}")
        return LoadedModel(
            module=module.to(device).eval(),
            fmt=self.name,
            num_classes=num_classes_from_metadata(meta, path) or 0,
            arch=meta.get(META_ARCH, "torchscript"),
            preprocess=preprocess_from_metadata(meta, path),
            metadata=meta,
            notes=notes,
            stored_dtypes=stored,
        )

    def check_can_save(self, module: nn.Module, path: Path) -> None:
        """A module that TorchScript cannot compile is refused before the repair, not after it."""
        if isinstance(module, torch.jit.ScriptModule):
            return
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.jit.script(module)
        except Exception as exc:
            raise UsageError(
                f"--out {path}: the model cannot be compiled to TorchScript ({type(exc).__name__}: {first_line(exc)})",
                hint="write the input's own format, or a .pt2 program (torch.export)",
            ) from None

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        if not isinstance(module, torch.jit.ScriptModule):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                module = torch.jit.script(module)
        meta = ibau_metadata(request)
        module = module.cpu()
        stored = {k: d for k, d in request.stored_dtypes.items() if k in module.state_dict()}
        _cast(module, stored)  # the input's own dtypes in the file (the weights were rounded to them)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with opened(path, "wb") as dst:
                    torch.jit.save(module, dst, _extra_files={EXTRA: json.dumps(meta)})
        finally:
            _cast(module, dict.fromkeys(stored, torch.float32))


def _cast(module: nn.Module, dtypes: dict[str, torch.dtype]) -> None:
    """Convert the named parameters and buffers of ``module`` to ``dtypes`` in place."""
    tensors = dict(module.named_parameters()) | dict(module.named_buffers())
    with torch.no_grad():
        for name, dtype in dtypes.items():
            if name in tensors:
                tensors[name].data = tensors[name].data.to(dtype)


def _check_one_input(module: torch.jit.ScriptModule, path: Path) -> None:
    """ibau feeds a model one image batch; a forward that needs more is refused here, by name."""
    try:
        args = module.forward.schema.arguments[1:]  # after self
    except (AttributeError, RuntimeError):
        return
    required = [a.name for a in args if not a.has_default_value()]
    if len(required) > 1:
        raise InputError(
            f"{path}: the model's forward takes {len(required)} inputs ({', '.join(required)}); ibau gives it one "
            "image batch",
            hint="save a module whose forward takes the image batch alone (the other inputs fixed inside it)",
        )


# fused inference kernels that torch.jit.trace records when a model is traced under torch.no_grad()
# (nn.MultiheadAttention's and nn.TransformerEncoderLayer's fast paths): they have no backward at all
NO_BACKWARD_OPS = ("aten::_native_multi_head_attention", "aten::_transformer_encoder_layer_fwd")


def _check_differentiable(module: torch.nn.Module, path: Path) -> None:
    """A graph holding an op with no gradient can be neither repaired nor probed (the synthesised
    probes differentiate with respect to the input): say so before any work, not as an autograd
    error after the probes."""
    try:
        nodes = list(module.inlined_graph.nodes())
    except (AttributeError, RuntimeError):
        return
    # only ops on the graph's own block run whatever happens: a scripted nn.MultiheadAttention keeps its
    # fused kernel inside a prim::If that it takes only when nothing needs a gradient (a traced one
    # records the kernel unconditionally), and that branch is not taken while repairing or probing
    found = sorted({n.kind() for n in nodes if n.kind() in NO_BACKWARD_OPS})
    if found:
        raise InputError(
            f"{path}: the graph holds {', '.join(found)}, a fused inference kernel with no gradient "
            "(recorded when attention is traced under torch.no_grad()), so it can be neither repaired nor probed",
            hint="trace the model again with gradients enabled (torch.jit.trace outside torch.no_grad()), "
            "script it (torch.jit.script), or give its weights as safetensors or a state dict",
        )
