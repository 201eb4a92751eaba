"""ONNX models: parsed with ``onnx`` (nothing else runs), executed as a trainable torch module
(``onnx_graph.py``), written back as the same graph with repaired weights.

onnxruntime is the reference: the pipeline compares it with the torch module on clean images
before unlearning, and runs the written file in it afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from torch import nn

from ..errors import InputError, UsageError, first_line
from .base import LoadedModel, ModelFormat, SaveRequest, utf8_path
from .metadata import META_ARCH, ibau_metadata, preprocess_from_metadata


def _dims(value_info) -> list[int | None]:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None)
    return dims


def ort_runner(path: Path, channels_last: bool, fixed_batch: int | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A function running the file in onnxruntime on NCHW float32 input (in chunks of ``fixed_batch``,
    the last one padded, for a graph exported with a fixed batch size)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    # onnxruntime opens UTF-8 names only. Other names are read here by onnx, which also reads a graph's
    # external data from beside it (onnxruntime, given bytes, would look for it in the working directory)
    if utf8_path(path):
        source: str | bytes = str(path)
    else:
        import onnx

        source = onnx.load(str(path)).SerializeToString()
    session = ort.InferenceSession(source, sess_options=opts, providers=providers)
    name = session.get_inputs()[0].name

    def run_one(x: np.ndarray) -> np.ndarray:
        if channels_last:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
        return session.run(None, {name: x.astype(np.float32)})[0]

    def run(x: np.ndarray) -> np.ndarray:
        from .base import fixed_batches

        if fixed_batch is None or len(x) == fixed_batch:
            return run_one(x)
        return np.concatenate([run_one(x[idx])[:n] for idx, n in fixed_batches(len(x), fixed_batch)])

    return run


class OnnxFormat(ModelFormat):
    carries_graph = True
    name = "onnx"
    suffixes = (".onnx",)

    def sniff(self, head: bytes, path: Path) -> bool:
        if not head or head[0] != 0x08:  # field 1 (ir_version), varint
            return False
        try:
            import onnx

            model = onnx.load(str(path), load_external_data=False)
        except Exception:
            return False
        return len(model.graph.node) > 0

    def load(self, path: Path, *, arch: str | None, device: str) -> LoadedModel:
        try:
            import onnx
        except ImportError as exc:
            raise InputError("reading ONNX needs the onnx package", hint="pip install onnx onnxruntime") from exc
        from .onnx_graph import GraphError, OnnxGraphModule, unsupported_ops

        if arch is not None:
            raise UsageError(f"{path}: an ONNX file carries its own graph; drop --arch")
        try:
            model = onnx.load(str(path))
        except Exception as exc:
            raise InputError(f"{path}: not a readable ONNX model ({exc})") from exc
        missing = unsupported_ops(model)
        if missing:
            raise InputError(
                f"{path}: unsupported ONNX operator(s) {', '.join(missing)}",
                hint="ibau executes ONNX graphs with its own torch ops (the README's Formats section lists them; `ibau inspect "
                "MODEL` lists the graph's); re-export without that operator, or report the exporter and opset",
            )
        try:
            module = OnnxGraphModule(model)
        except GraphError as exc:
            raise InputError(
                f"{path}: not a runnable ONNX graph: {exc}",
                hint="re-export the model (python -m onnx.checker FILE names what is wrong)",
            ) from None
        graph_inputs = [v for v in model.graph.input if v.name in module.inputs]
        if len(graph_inputs) != 1:
            raise InputError(f"{path}: the graph has {len(graph_inputs)} inputs; ibau handles one image input")
        dims = _dims(graph_inputs[0])
        hint = None
        if len(dims) == 4:
            if dims[1] in (1, 3):
                hint = (dims[1], dims[2], dims[3])
            elif dims[3] in (1, 3):
                module.channels_last = True
                hint = (dims[3], dims[1], dims[2])
        if dims and dims[0] is not None:
            module.fixed_batch = dims[0]
        out_dims = _dims(model.graph.output[0])
        meta = {p.key: p.value for p in model.metadata_props}
        opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
        notes = [f"ONNX graph: {len(model.graph.node)} nodes, opset {opset}, input {graph_inputs[0].name} {dims}"]
        if len(model.graph.output) > 1:
            names = ", ".join(o.name for o in model.graph.output)
            notes.append(
                f"the graph has {len(model.graph.output)} outputs ({names}): ibau reads the first, "
                f"{model.graph.output[0].name}, as the class logits"
            )
        if module.channels_last:
            notes.append("the graph takes NHWC input; ibau feeds it channels-last")
        if module.softmax_input is not None:
            notes.append(
                f"the graph ends in a Softmax: where its output is probabilities, ibau works on its input "
                f"{module.softmax_input} (the logits); a written graph keeps the Softmax"
            )
        if module.fixed_batch is not None:
            notes.append(
                f"the graph was exported with a fixed batch of {module.fixed_batch}: ibau runs it in chunks of "
                f"{module.fixed_batch} (slower; export with a dynamic batch axis to avoid this)"
            )
        if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
            notes.append(
                "no BatchNormalization nodes (an eval-mode export folds them into the convolutions); "
                "unlearning runs in eval mode, so this changes nothing"
            )
        loaded = LoadedModel(
            module=module.to(device).eval(),
            fmt=self.name,
            num_classes=out_dims[-1] if len(out_dims) == 2 and out_dims[-1] else 0,
            arch=meta.get(META_ARCH, "onnx-graph"),
            preprocess=preprocess_from_metadata(meta, path),
            metadata=meta,
            notes=notes,
        )
        loaded.input_hint = hint
        try:
            loaded.reference = ort_runner(path, module.channels_last, module.fixed_batch)
        except ImportError:
            loaded.reference = None
            loaded.notes.append("onnxruntime is not installed: no parity check against it")
        except Exception as exc:  # onnxruntime refuses the graph: so would any runtime that serves it
            raise InputError(
                f"{path}: onnxruntime cannot load the graph ({first_line(exc)})",
                hint="re-export the model (python -m onnx.checker FILE names what is wrong)",
            ) from None
        return loaded

    def can_save_from(self, source_format: str) -> bool:
        return source_format == self.name

    def save(self, module: nn.Module, path: Path, request: SaveRequest) -> None:
        import onnx

        from .onnx_graph import OnnxGraphModule

        if not isinstance(module, OnnxGraphModule):
            raise UsageError(
                f"--out {path}: writing ONNX is supported for ONNX input only",
                hint="write the repaired model in its input format, then export it with your own tooling",
            )
        model = module.updated_proto()
        keep = [p for p in model.metadata_props if not p.key.startswith("ibau.")]
        del model.metadata_props[:]
        model.metadata_props.extend(keep)
        for key, value in ibau_metadata(request).items():
            if key.startswith("ibau."):
                entry = model.metadata_props.add()
                entry.key, entry.value = key, value
        onnx.save(model, str(path))
