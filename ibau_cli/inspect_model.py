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
from .formats import detect_format, sha256_file
from .formats.metadata import META_ARCH, META_CLASSES, META_PRE


def _tensor_summary(shapes: dict[str, tuple[list[int], str]]) -> dict[str, Any]:
    return {
        "tensors": len(shapes),
        "parameters": int(sum(math.prod(s) for s, _ in shapes.values())),
        "dtypes": sorted({d for _, d in shapes.values()}),
        "first_tensors": {k: {"shape": s, "dtype": d} for k, (s, d) in list(shapes.items())[:12]},
    }


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
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = dict(fh.metadata() or {})
            for k in fh.keys():
                sl = fh.get_slice(k)
                shapes[k] = (list(sl.get_shape()), str(sl.get_dtype()))
    elif fmt.name == "checkpoint":
        from .formats.checkpoint_format import META_KEY, find_state_dict, safe_load

        obj = safe_load(path)
        sd, where = find_state_dict(obj, path)
        info["state_dict_at"] = where
        shapes = {k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in sd.items()}
        if isinstance(obj, dict) and isinstance(obj.get(META_KEY), dict):
            meta = {str(k): str(v) for k, v in obj[META_KEY].items()}
    else:
        loaded = fmt.load(path, arch=None, device="cpu")
        meta = loaded.metadata
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            shapes = {
                k: (list(v.shape), str(v.dtype).replace("torch.", "")) for k, v in loaded.module.state_dict().items()
            }
        info["graph"] = getattr(loaded.module, "original_name", type(loaded.module).__name__)
    info.update(_tensor_summary(shapes))
    arch = meta.get(META_ARCH)
    info["architecture"] = arch
    num_classes = meta.get(META_CLASSES)
    if num_classes is None and arch and ARCHS.get(arch) and ARCHS.get(arch).classifier_key in shapes:
        num_classes = shapes[ARCHS.get(arch).classifier_key][0][0]
    info["num_classes"] = int(num_classes) if num_classes is not None else None
    if META_PRE in meta:
        import json

        pre = json.loads(meta[META_PRE])
        info["input_shape"] = [pre.get("channels"), *pre.get("input_size", [])]
    else:
        info["input_shape"] = None
    info["metadata"] = meta
    return info
