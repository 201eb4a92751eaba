"""The model's input shape when nothing declares it (no architecture size, graph shape, metadata,
preset, config or flag): the channels its first convolution takes, and the size every clean image
shares. Best effort: anything unreadable here is left to the loaders, which say what is wrong."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from .data import IMAGE_SUFFIXES

MAX_INFERRED_SIDE = 512  # images larger than this are photos to shrink, not a size a classifier takes as it is
_EXIF_ORIENTATION = 0x0112
_TURNED = (5, 6, 7, 8)  # EXIF orientations shown turned a quarter: width and height swap


@dataclass(frozen=True)
class InferredInput:
    channels: int | None
    size: tuple[int, int] | None  # (height, width)
    channels_from: str | None = None  # where each came from, for the report
    size_from: str | None = None

    def layer(self) -> dict[str, Any]:
        """The preprocess keys inferred, as a settings layer."""
        pre: dict[str, Any] = {}
        if self.channels is not None:
            pre["channels"] = self.channels
        if self.size is not None:
            pre["input_size"] = list(self.size)
        return {"preprocess": pre} if pre else {}


def first_conv_channels(module: nn.Module) -> tuple[int, str] | None:
    """The channels the first 2-D convolution of ``module`` takes (1 or 3), with its name; None when
    it has none or they cannot be told. A TorchScript module keeps ``in_channels`` when scripted; a
    traced one keeps only the weight, read as [out, in, kh, kw] (a grouped first layer is not read)."""
    for name, m in module.named_modules():
        if isinstance(m, nn.Conv2d):
            channels = m.in_channels
        elif getattr(m, "original_name", None) == "Conv2d":
            channels = getattr(m, "in_channels", None)
            groups = getattr(m, "groups", 1)
            weight = getattr(m, "weight", None)
            if channels is None and weight is not None and weight.dim() == 4 and groups == 1:
                channels = int(weight.shape[1])
        else:
            continue
        return (int(channels), name or "the model") if channels in (1, 3) else None
    return None


def _image_size(path: Path) -> tuple[int, int] | None:
    """(height, width) as shown (EXIF orientation applied), from the file's header only."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            w, h = img.size
            if img.getexif().get(_EXIF_ORIENTATION) in _TURNED:
                w, h = h, w
            return h, w
    except Exception:  # noqa: BLE001 - unreadable: the loader reports it with its own message
        return None


def common_image_size(root: Path) -> tuple[tuple[int, int], int] | None:
    """The (height, width) every image under ``root/<class>/`` has, and how many there are; None
    when the sizes differ, a header cannot be read or there is no image."""
    sizes: set[tuple[int, int]] = set()
    count = 0
    try:
        folders = [p for p in sorted(root.iterdir()) if p.is_dir() and not p.name.startswith(".")]
        for folder in folders:
            for path in sorted(folder.iterdir()):
                if path.name.startswith(".") or path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
                    continue
                size = _image_size(path)
                if size is None:
                    return None
                sizes.add(size)
                count += 1
                if len(sizes) > 1:
                    return None
    except OSError:
        return None
    return (sizes.pop(), count) if count else None


def infer_input(module: nn.Module, clean: Path | None) -> InferredInput | None:
    """What the model and the clean images say of the input shape; None when they say nothing. A size
    past MAX_INFERRED_SIDE on a side is not taken (the 32x32 default and its resize warnings stay)."""
    conv = first_conv_channels(module)
    common = common_image_size(clean) if clean is not None else None
    if common is not None and max(common[0]) > MAX_INFERRED_SIDE:
        common = None
    if conv is None and common is None:
        return None
    channels_from = (
        None
        if conv is None
        else f"{conv[0]} channel{'s' if conv[0] > 1 else ''}: what the first convolution ({conv[1]}) takes"
    )
    size_from = None
    if common is not None:
        (h, w), n = common
        size_from = f"input size {h}x{w} (height x width): the size of all {n} clean images"
    return InferredInput(
        None if conv is None else conv[0], None if common is None else common[0], channels_from, size_from
    )
