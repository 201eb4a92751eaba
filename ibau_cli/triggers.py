"""A known trigger supplied by the user, applied in pixel space to measure the true ASR."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .errors import InputError, UsageError
from .images import open_image
from .preprocess import Preprocess

POSITIONS = ("br", "bl", "tr", "tl", "center")


@dataclass(frozen=True)
class KnownTrigger:
    """x' = (1 - mask) * x + mask * pattern  (blend), or  x' = clip(x + pattern)  (additive)."""

    pattern: Tensor  # [C, H, W]
    mask: Tensor  # [1 or C, H, W] in [0, 1]; unused when additive
    additive: bool
    target: int
    description: str

    def apply(self, x: Tensor) -> Tensor:
        pattern = self.pattern.to(x.device, x.dtype)
        if self.additive:
            return (x + pattern).clamp(0, 1)
        mask = self.mask.to(x.device, x.dtype)
        return (1 - mask) * x + mask * pattern


def _read(path: Path, mode: str, what: str) -> np.ndarray:
    if path.is_dir():
        raise InputError(f"{what} {path} is a folder", hint="give one image file (PNG, JPEG, ...)")
    if not path.is_file():
        raise InputError(f"{what} not found: {path}")
    return np.asarray(open_image(path, mode, what), dtype=np.float32) / 255.0


def _place(size: tuple[int, int], patch_hw: tuple[int, int], position: str) -> tuple[int, int]:
    H, W = size
    h, w = patch_hw
    if "," in position:
        try:
            x, y = (int(v) for v in position.split(","))
        except ValueError:
            raise UsageError(f"--trigger-pos {position!r}: expected X,Y or one of {', '.join(POSITIONS)}") from None
        top, left = y, x
    else:
        table = {
            "br": (H - h, W - w),
            "bl": (H - h, 0),
            "tr": (0, W - w),
            "tl": (0, 0),
            "center": ((H - h) // 2, (W - w) // 2),
        }
        if position not in table:
            raise UsageError(f"--trigger-pos {position!r}: expected X,Y or one of {', '.join(POSITIONS)}")
        top, left = table[position]
    if top < 0 or left < 0 or top + h > H or left + w > W:
        raise UsageError(
            f"--trigger-pos {position!r}: a {w}x{h} patch does not fit a {W}x{H} input there (width x height)"
        )
    return top, left


def _check_changes_pixels(
    path: Path, mask_path: Path | None, pattern: np.ndarray, mask: np.ndarray, additive: bool, has_alpha: bool
) -> None:
    """A trigger that changes no pixel would measure an ASR of 0 and pass every gate: refuse it."""
    if additive:
        if np.abs(pattern).max() < 0.5 / 255:
            raise InputError(
                f"additive trigger {path} is uniform mid-grey (128), so it changes no pixel",
                hint="an additive trigger is a signed offset around 128: 128 adds nothing, 255 adds +127",
            )
        return
    top = float(mask.max())
    if top >= 1.5 / 255:
        return
    if mask_path is not None:
        raise InputError(
            f"trigger mask {mask_path} changes no pixel: its largest value is {round(top * 255)} of 255",
            hint="white (255) = trigger, black (0) = image; a 0/1 mask must be saved as 0/255",
        )
    if has_alpha:
        raise InputError(
            f"trigger {path} is fully transparent: its alpha channel hides every pixel",
            hint="save the trigger with opaque pixels where it applies",
        )
    raise InputError(f"trigger {path} changes no pixel")


def load_trigger(
    path: Path,
    *,
    target: int,
    pre: Preprocess,
    mask_path: Path | None = None,
    blend: float | None = None,
    additive: bool = False,
    position: str = "br",
) -> KnownTrigger:
    """Build a trigger from an image.

    - An image the input's size: with ``mask_path`` (grey-scale, white = trigger) or an alpha
      channel, mask blending; with ``blend`` a uniform opacity; with ``additive`` the image is a
      signed offset around mid-grey (128 = 0).
    - A smaller image: a patch pasted at ``position`` (its alpha channel, when present, is the mask).
    """
    mode = "L" if pre.channels == 1 else "RGB"
    rgba = _read(path, "RGBA" if pre.channels == 3 else "LA", "trigger image")
    pat = rgba[..., :-1] if rgba.ndim == 3 else rgba[..., None]
    has_alpha = bool((rgba[..., -1] < 1).any())
    alpha = rgba[..., -1:]
    H, W = pre.input_size
    h, w = pat.shape[:2]
    options = sum(x is not None and x is not False for x in (mask_path, blend, additive or None))
    if options > 1:
        raise UsageError("use only one of --trigger-mask, --trigger-blend and --trigger-additive")
    pattern = np.zeros((H, W, pre.channels), np.float32)
    mask = np.zeros((H, W, 1), np.float32)
    if (h, w) == (H, W):
        if position != "br":
            raise UsageError(
                f"--trigger-pos {position}: trigger {path} covers the whole {W}x{H} input, so there is nothing to place",
                hint="drop --trigger-pos, or give a patch smaller than the input",
            )
        pattern[:] = pat
        if additive:
            desc = f"additive image {path.name}"
            pattern = pattern - 128.0 / 255.0
        elif blend is not None:
            if not 0 < blend <= 1:
                raise UsageError(f"--trigger-blend {blend}: must be in (0, 1]")
            mask[:] = blend
            desc = f"blend {path.name} at opacity {blend}"
        elif mask_path is not None:
            m = _read(mask_path, "L", "trigger mask")
            if m.shape != (H, W):
                raise InputError(
                    f"trigger mask {mask_path} is {m.shape[1]}x{m.shape[0]}, the input is {W}x{H}",
                    hint=f"give a {W}x{H} mask, the size of the full-size trigger image",
                )
            mask[..., 0] = m
            desc = f"{path.name} with mask {mask_path.name}"
        elif has_alpha:
            mask[:] = alpha
            desc = f"{path.name} (alpha channel as mask)"
        else:
            raise UsageError(
                f"trigger {path} covers the whole {W}x{H} input but says nothing of how to apply it",
                hint="add --trigger-mask MASK, --trigger-blend ALPHA or --trigger-additive, or give a smaller patch",
            )
    elif h <= H and w <= W:
        if blend is not None or additive or mask_path is not None:
            raise UsageError(
                f"trigger {path} is a {w}x{h} patch; mask, blend and additive options need a full {W}x{H} image"
            )
        top, left = _place((H, W), (h, w), position)
        pattern[top : top + h, left : left + w] = pat
        mask[top : top + h, left : left + w] = alpha if has_alpha else 1.0
        desc = f"{w}x{h} patch {path.name} at {position}"
    else:
        raise InputError(
            f"trigger image {path} ({w}x{h}, width x height) is larger than the model input ({W}x{H})",
            hint=f"give a patch smaller than {W}x{H} (pasted at --trigger-pos) or a full {W}x{H} image "
            "with --trigger-mask, --trigger-blend or --trigger-additive",
        )
    del mode
    _check_changes_pixels(path, mask_path, pattern, mask, additive, has_alpha)
    return KnownTrigger(
        pattern=torch.from_numpy(np.ascontiguousarray(pattern.transpose(2, 0, 1))),
        mask=torch.from_numpy(np.ascontiguousarray(mask.transpose(2, 0, 1))),
        additive=additive,
        target=target,
        description=desc,
    )
