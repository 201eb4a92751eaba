"""Model formats behind a registry: detect by content, load, save atomically."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import InputError, UsageError
from ..preprocess import Preprocess
from ..registry import Registry
from .base import LoadedModel, ModelFormat, SaveRequest, sha256_file, write_atomically

FORMATS: Registry[ModelFormat] = Registry("format")


def register_format(fmt: ModelFormat, *, origin: str | None = None) -> ModelFormat:
    return FORMATS.register(fmt.name, fmt, origin=origin)


def _register_builtins() -> None:
    from .checkpoint_format import CheckpointFormat
    from .exported_format import ExportedProgramFormat
    from .onnx_format import OnnxFormat
    from .safetensors_format import SafetensorsFormat
    from .torchscript_format import TorchScriptFormat

    for fmt in (SafetensorsFormat(), TorchScriptFormat(), CheckpointFormat(), OnnxFormat(), ExportedProgramFormat()):
        register_format(fmt)


_register_builtins()


def _read_head(path: Path, n: int = 64) -> bytes:
    if not path.exists():
        raise InputError(f"model file not found: {path}")
    if path.is_dir():
        raise InputError(f"model path {path} is a folder, not a file")
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError as exc:
        raise InputError(f"cannot read model file {path} ({exc.strerror})") from exc


# Extensions of formats other tools use, so a mislabelled file is caught even when ibau
# has no reader registered for the format the extension claims.
OTHER_SUFFIXES = {
    ".h5": "keras/hdf5",
    ".keras": "keras",
    ".pb": "tensorflow",
    ".tflite": "tflite",
    ".gguf": "gguf",
    ".pkl": "pickle",
    ".joblib": "joblib",
}


def detect_format(path: Path) -> ModelFormat:
    """Identify the format by content; a disagreeing extension is an error."""
    head = _read_head(path)
    if not head:
        raise InputError(
            f"model file is empty: {path}", hint="the download or copy did not finish; fetch the file again"
        )
    matches = [FORMATS.get(n) for n in FORMATS.names() if FORMATS.get(n).sniff(head, path)]
    by_suffix = [FORMATS.get(n) for n in FORMATS.names() if path.suffix.lower() in FORMATS.get(n).suffixes]
    if not matches:
        known = ", ".join(FORMATS.names())
        raise InputError(
            f"{path}: not a model format ibau reads, or a damaged file (formats: {known})",
            hint="check that the download is complete (size, sha256)",
        )
    fmt = matches[0]
    if len(matches) > 1 and by_suffix:
        fmt = next((m for m in matches if m in by_suffix), fmt)
    claimed = by_suffix[0].name if by_suffix else OTHER_SUFFIXES.get(path.suffix.lower())
    if claimed == "pickle" and fmt.name == "checkpoint":
        return fmt  # a torch.save pickle named .pkl: it goes through the safe loader like any checkpoint
    if claimed is not None and fmt not in by_suffix:
        raise InputError(
            f"{path}: the extension {path.suffix!r} says {claimed} but the content is {fmt.name}",
            hint="rename the file to match its content",
        )
    return fmt


def format_for_output(path: Path, fallback: str) -> ModelFormat:
    """The format to write ``path`` in: ``fallback`` (the input's) when the suffix allows it, else
    the first format that claims the suffix, else ``fallback`` for a name without a suffix. A
    suffix no format claims (``fixed.txt``) is an error: the file would lie about its content."""
    preferred = FORMATS.get(fallback)
    if preferred is not None and path.suffix.lower() in preferred.suffixes:
        return preferred
    for name in FORMATS.names():
        fmt = FORMATS.get(name)
        if path.suffix.lower() in fmt.suffixes:
            return fmt
    fmt = FORMATS.get(fallback)
    if fmt is None:
        raise UsageError(f"cannot write format {fallback!r}")
    if path.suffix:
        raise UsageError(
            f"--out {path}: no format ibau writes uses the extension {path.suffix!r}",
            hint=f"end the name in {' or '.join(fmt.suffixes)} (the input's format, {fmt.name}), or another format's",
        )
    return fmt


def load_model(path: Path, *, arch: str | None = None, device: str = "cpu") -> LoadedModel:
    path = Path(path)
    return detect_format(path).load(path, arch=arch, device=device)


def save_model(
    module: nn.Module,
    path: Path,
    *,
    fmt: str,
    arch: str | None,
    num_classes: int,
    preprocess: Preprocess,
    extra_metadata: dict[str, str] | None = None,
    stored_dtypes: dict[str, torch.dtype] | None = None,
) -> None:
    """Write ``module`` to ``path`` in format ``fmt``, atomically (state-dict formats write the
    tensors named in ``stored_dtypes`` in those dtypes)."""
    writer = FORMATS.get(fmt)
    if writer is None:
        raise UsageError(f"unknown output format {fmt!r}")
    request = SaveRequest(
        arch=arch,
        num_classes=num_classes,
        preprocess=preprocess,
        extra_metadata=extra_metadata or {},
        stored_dtypes=stored_dtypes or {},
    )
    write_atomically(Path(path), lambda tmp: writer.save(module, tmp, request))


__all__ = [
    "FORMATS",
    "LoadedModel",
    "ModelFormat",
    "SaveRequest",
    "detect_format",
    "format_for_output",
    "load_model",
    "register_format",
    "save_model",
    "sha256_file",
]
