"""``ibau inspect``: what a model file is, without repairing anything.

safetensors: only the header is read (no model code runs). Checkpoints: torch's weights-only
loader. TorchScript: ``torch.jit.load`` (restricted TorchScript code, never Python pickles).
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

from .archs import ARCHS
from .errors import InputError
from .formats import detect_format, sha256_file
from .formats.metadata import META_ARCH, META_CLASSES, num_classes_from_metadata, preprocess_from_metadata


def _tensor_summary(shapes: dict[str, tuple[list[int], str]]) -> dict[str, Any]:
    return {
        "tensors": len(shapes),
        "parameters": int(sum(math.prod(s) for s, _ in shapes.values())),
        "dtypes": sorted({d for _, d in shapes.values()}),
        "first_tensors": {k: {"shape": s, "dtype": d} for k, (s, d) in list(shapes.items())[:12]},
    }


def _last_dense_width(model, shapes: dict) -> tuple[int, str] | None:
    """The output width of the last MatMul or Gemm whose weight is a 2-D initializer, and its name:
    a MatMul weight is [in, out] (TensorFlow's layout), a Gemm's [out, in] when transB is set."""
    for node in reversed(model.graph.node):
        if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 and len(shapes.get(node.input[1], ([],))[0]) == 2:
            dims = shapes[node.input[1]][0]
            trans_b = any(a.name == "transB" and a.i for a in node.attribute)
            return int(dims[0] if trans_b else dims[1]), f"{node.op_type} ({node.input[1]})"
    return None


def _stored_as(key: str, shapes: dict) -> str | None:
    """``key`` as the file stores it: itself, or under a wrapper's prefix (``module.``, ``model.``)."""
    if key in shapes:
        return key
    return next((k for k in shapes if k.endswith("." + key)), None)


def inspect_file(path: Path) -> dict[str, Any]:
    path = Path(path)
    fmt = detect_format(path)
    info: dict[str, Any] = {
        "path": str(path),
        "format": fmt.name,
        "sha256": sha256_file(path),
        "size_bytes": path.stat().st_size,
    }
    meta: dict[str, str] = {}
    shapes: dict[str, tuple[list[int], str]] = {}
    if fmt.name == "safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = dict(fh.metadata() or {})
                for k in fh.keys():
                    sl = fh.get_slice(k)
                    shapes[k] = (list(sl.get_shape()), str(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError) as exc:
            raise InputError(
                f"{path}: not a readable safetensors file ({exc})",
                hint="check that the download is complete (size, sha256)",
            ) from exc
    elif fmt.name == "checkpoint":
        from .formats.checkpoint_format import META_KEY, find_state_dict, safe_load

        obj = safe_load(path)
        sd, where = find_state_dict(obj, path)
        info["state_dict_at"] = where
        shapes = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()}
        if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict):
            meta = {str(k): str(v) for k, v in obj[META_KEY].items()}
    elif fmt.name == "onnx":
        import onnx
        from onnx import numpy_helper

        from .formats.onnx_format import _dims
        from .formats.onnx_graph import unsupported_ops

        try:
            model = onnx.load(str(path))
        except Exception as exc:  # a damaged file or missing external data: the same error as sanitize's
            raise InputError(f"{path}: not a readable ONNX model ({exc})") from exc
        meta = {p.key: p.value for p in model.metadata_props}
        for t in model.graph.initializer:
            arr = numpy_helper.to_array(t)
            shapes[t.name] = (list(arr.shape), str(arr.dtype))
        inits = set(shapes)
        info["graph"] = {
            "opset": [f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import],
            "inputs": {v.name: _dims(v) for v in model.graph.input if v.name not in inits},
            "outputs": {v.name: _dims(v) for v in model.graph.output},
            "nodes": len(model.graph.node),
            "ops": sorted({n.op_type for n in model.graph.node}),
            "unsupported_ops": unsupported_ops(model),
            "producer": f"{model.producer_name} {model.producer_version}".strip(),
        }
        out_dims = next(iter(info["graph"]["outputs"].values()), [])
        if len(out_dims) == 2 and out_dims[1]:
            info["num_classes_from_graph"] = out_dims[1]
        else:
            info["num_classes_from_layer"] = _last_dense_width(model, shapes)
        in_dims = next(iter(info["graph"]["inputs"].values()), [])
        if len(in_dims) == 4:
            info["input_shape_from_graph"] = in_dims[1:]
    else:
        loaded = fmt.load(path, arch=None, device="cpu")
        meta = loaded.metadata
        # the file's own module, not ibau's wrapper around a .pt2 program (its names have no "inner.")
        module = getattr(loaded.module, "inner", loaded.module) if fmt.name == "torch-export" else loaded.module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in module.state_dict().items()}
        info["graph"] = (
            "torch.export program"
            if fmt.name == "torch-export"
            else getattr(module, "original_name", type(module).__name__)
        )
        if loaded.input_hint is not None:
            info["input_shape_from_graph"] = list(loaded.input_hint)
    info.update(_tensor_summary(shapes))
    arch = meta.get(META_ARCH)
    info["architecture"] = arch
    info["architecture_source"] = "metadata" if arch else None
    if arch is None and fmt.name in ("safetensors", "checkpoint"):
        import torch

        from .formats.state_dict import registered_matches

        # shapes only (tensors on the meta device): what sanitize matches without --arch
        matches = registered_matches({k: torch.empty(s, device="meta") for k, (s, _) in shapes.items()})
        if len(matches) == 1:
            arch = info["architecture"] = matches[0]
            info["architecture_source"] = "registry: the only registered architecture with every tensor name and shape"
        elif matches:
            info["architecture_candidates"] = matches
    num_classes, source = num_classes_from_metadata(meta, path), "metadata"
    from_model, model_source = None, None
    spec = ARCHS.get(arch) if arch else None
    # the classifier under the file's own name for it (a DataParallel checkpoint's "module." prefix)
    key = None if spec is None else _stored_as(spec.classifier_key, shapes)
    if key is not None:
        from_model, model_source = shapes[key][0][0], f"architecture {arch}: {key}"
    elif "num_classes_from_graph" in info:
        from_model, model_source = info["num_classes_from_graph"], "graph output"
    info.pop("num_classes_from_graph", None)
    if num_classes is not None and from_model is not None and int(from_model) != num_classes:
        info["warnings"] = [
            f"metadata {META_CLASSES} says {num_classes} classes but the {model_source} has {from_model}: "
            "the model's outputs are what counts; fix or remove the metadata"
        ]
    if num_classes is None and from_model is not None:
        num_classes, source = from_model, model_source
    layer = info.pop("num_classes_from_layer", None)
    if num_classes is None and layer is not None:
        num_classes, source = (
            layer[0],
            f"a guess: the output width of the graph's last {layer[1]} (sanitize checks it by running the model)",
        )
    if num_classes is None:
        last_2d = [k for k, (s, _) in shapes.items() if len(s) == 2]
        if last_2d:  # a classifier's last linear layer: [classes, features]
            num_classes = shapes[last_2d[-1]][0][0]
            source = f"a guess: the last 2-D weight, {last_2d[-1]} (sanitize checks it by running the model)"
    info["num_classes"] = int(num_classes) if num_classes is not None else None
    info["num_classes_source"] = source if num_classes is not None else None
    pre = preprocess_from_metadata(meta, path)
    if pre is not None:
        info["input_shape"] = [pre.channels, *pre.input_size]
    elif spec is not None and spec.input_size is not None and spec.channels is not None:
        info["input_shape"] = [spec.channels, *spec.input_size]
    else:
        info["input_shape"] = info.pop("input_shape_from_graph", None)
    info.pop("input_shape_from_graph", None)
    info["metadata"] = meta
    return info
