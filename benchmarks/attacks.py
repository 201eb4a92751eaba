"""Backdoor triggers for the benchmark model zoo, all applied in [0, 1] pixel space.

``apply(attack, x, seed)`` takes a float batch ``x`` of shape (N, C, H, W) in [0, 1] and returns the
triggered batch (a new tensor, clamped to [0, 1]). ``seed`` fixes the random parts of a trigger (the
blend noise image, the WaNet warping field); the other triggers ignore it.

``target_labels(attack, y, target, num_classes)`` gives the labels a poisoned sample is given (and the
label a successful attack makes the model predict): ``target`` for the single-target attacks and
``(y + 1) % num_classes`` for all2all.

``trigger_files(attack, out_dir, seed=..., size=...)`` writes the trigger as PNG images that the CLI's
known-trigger option accepts, where the attack has a file-based form, and returns a JSON-able dict that
describes the trigger (for the manifest).

All fixed trigger pixels are multiples of 1/255, so the PNG files reproduce them exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ATTACKS = (
    "badnets",
    "badnets-edge",
    "blend",
    "trojan-square",
    "watermark",
    "invisible",
    "sig",
    "wanet",
    "all2all",
    "clean",
)

BADNETS_SIZE = 3
BLEND_ALPHA = 0.1
TROJAN_SIZE = 4
SIG_AMPLITUDE = 20 / 255
SIG_FREQUENCY = 6
WANET_K = 4
WANET_S = 0.5
# Watermark: a yellow 7x7 "X" drawn at opacity 0.8, top half, right of centre (no corner, not the centre):
# not among the probes' fixed patterns (shape, colour and place all differ).
WATERMARK_SIZE = 7
WATERMARK_TOP_LEFT = (5, 19)  # (row, column) on a 32x32 input
WATERMARK_RGB = (255, 220, 0)
WATERMARK_ALPHA = 0.8
# Invisible additive: a seeded +-INVISIBLE_255/255 sign pattern over the whole image.
INVISIBLE_255 = 6

# Trojan-square pattern: a 4x4 checkerboard of magenta and green (RGB, 0..255).
_TROJAN_A = (255, 0, 255)
_TROJAN_B = (0, 255, 0)


def _trojan_pattern(channels: int = 3) -> Tensor:
    """The 4x4 trojan-square patch, shape (C, 4, 4), values in [0, 1]."""
    p = torch.empty(3, TROJAN_SIZE, TROJAN_SIZE)
    for i in range(TROJAN_SIZE):
        for j in range(TROJAN_SIZE):
            p[:, i, j] = torch.tensor(_TROJAN_A if (i + j) % 2 == 0 else _TROJAN_B, dtype=torch.float32)
    p = p / 255.0
    if channels == 1:
        p = p.mean(0, keepdim=True)
    return p


def _watermark(channels: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Full-size (pattern (C, H, W), mask (1, H, W)) of the watermark "X"."""
    top, left = WATERMARK_TOP_LEFT
    top, left = top * h // 32, left * w // 32
    mask = torch.zeros(1, h, w)
    for i in range(WATERMARK_SIZE):
        mask[0, top + i, left + i] = WATERMARK_ALPHA
        mask[0, top + i, left + WATERMARK_SIZE - 1 - i] = WATERMARK_ALPHA
    colour = torch.tensor(WATERMARK_RGB, dtype=torch.float32) / 255.0
    pattern = colour.view(3, 1, 1).expand(3, h, w).clone()
    if channels == 1:
        pattern = pattern.mean(0, keepdim=True)
    return pattern, mask


def _invisible_offset(seed: int, channels: int, h: int, w: int) -> Tensor:
    """Seeded sign pattern (C, H, W) with values +-INVISIBLE_255/255."""
    g = torch.Generator().manual_seed(int(seed) + 7919)
    signs = torch.randint(0, 2, (channels, h, w), generator=g).float() * 2 - 1
    return signs * INVISIBLE_255 / 255.0


def _blend_noise(seed: int, channels: int, h: int, w: int) -> Tensor:
    """Uniform noise image (C, H, W) with values k/255, fixed by ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randint(0, 256, (channels, h, w), generator=g).float() / 255.0


def _sig_pattern(h: int, w: int) -> Tensor:
    """Horizontal sinusoid (1, 1, H, W): delta * sin(2 pi j f / W) along the columns."""
    j = torch.arange(w, dtype=torch.float32)
    row = SIG_AMPLITUDE * torch.sin(2 * math.pi * j * SIG_FREQUENCY / w)
    return row.view(1, 1, 1, w).expand(1, 1, h, w)


def wanet_grid(seed: int, h: int, w: int) -> Tensor:
    """The fixed WaNet warping grid (1, H, W, 2) for ``grid_sample`` (align_corners=True).

    As in Nguyen & Tran (2021): a random k x k field of offsets in [-1, 1], normalised by its mean
    absolute value, upsampled bicubically to the image size, scaled by s / H and added to the
    identity grid.
    """
    g = torch.Generator().manual_seed(int(seed))
    ins = torch.rand(1, 2, WANET_K, WANET_K, generator=g) * 2 - 1
    ins = ins / ins.abs().mean()
    noise = F.interpolate(ins, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    ys = torch.linspace(-1, 1, h)
    xs = torch.linspace(-1, 1, w)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    identity = torch.stack((gx, gy), dim=2)[None]
    grid = identity + WANET_S * noise / h
    return grid.clamp(-1, 1)


def apply(attack: str, x: Tensor, seed: int = 0) -> Tensor:
    """Return ``x`` (N, C, H, W, float in [0, 1]) with the attack's trigger inserted."""
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    x = x.float()
    n, c, h, w = x.shape
    if attack == "clean":
        return x.clone()
    if attack in ("badnets", "all2all"):
        out = x.clone()
        out[:, :, h - BADNETS_SIZE :, w - BADNETS_SIZE :] = 1.0
        return out
    if attack == "badnets-edge":  # the same patch halfway down the right edge: no corner
        out = x.clone()
        top = _edge_top(h)
        out[:, :, top : top + BADNETS_SIZE, w - BADNETS_SIZE :] = 1.0
        return out
    if attack == "trojan-square":
        out = x.clone()
        out[:, :, h - TROJAN_SIZE :, w - TROJAN_SIZE :] = _trojan_pattern(c)
        return out
    if attack == "watermark":
        pattern, mask = _watermark(c, h, w)
        return ((1 - mask) * x + mask * pattern).clamp(0, 1)
    if attack == "invisible":
        return (x + _invisible_offset(seed, c, h, w)).clamp(0, 1)
    if attack == "blend":
        noise = _blend_noise(seed, c, h, w)
        return ((1 - BLEND_ALPHA) * x + BLEND_ALPHA * noise).clamp(0, 1)
    if attack == "sig":
        return (x + _sig_pattern(h, w)).clamp(0, 1)
    if attack == "wanet":
        grid = wanet_grid(seed, h, w).expand(n, h, w, 2)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True).clamp(0, 1)
    raise AssertionError(attack)


def _edge_top(h: int) -> int:
    return (h - BADNETS_SIZE) // 2


def target_labels(attack: str, y: Tensor, target: int, num_classes: int) -> Tensor:
    """Labels of poisoned samples: ``target``, or ``(y + 1) % num_classes`` for all2all."""
    if attack == "all2all":
        return (y + 1) % num_classes
    return torch.full_like(y, int(target))


def is_single_target(attack: str) -> bool:
    return attack not in ("all2all", "clean")


def trigger_params(attack: str, seed: int = 0) -> dict:
    """The trigger's parameters (JSON-able)."""
    if attack in ("badnets", "all2all"):
        p = {"type": "patch", "size": BADNETS_SIZE, "value": 1.0, "position": "bottom-right"}
        if attack == "all2all":
            p["label_map"] = "(y + 1) % num_classes"
        return p
    if attack == "badnets-edge":
        return {"type": "patch", "size": BADNETS_SIZE, "value": 1.0, "position": "middle of the right edge"}
    if attack == "trojan-square":
        return {
            "type": "patch",
            "size": TROJAN_SIZE,
            "pattern": "checkerboard",
            "colors_rgb": [list(_TROJAN_A), list(_TROJAN_B)],
            "position": "bottom-right",
        }
    if attack == "watermark":
        return {
            "type": "watermark",
            "shape": f"X, {WATERMARK_SIZE}x{WATERMARK_SIZE}",
            "top_left_row_col_on_32x32": list(WATERMARK_TOP_LEFT),
            "color_rgb": list(WATERMARK_RGB),
            "alpha": WATERMARK_ALPHA,
        }
    if attack == "invisible":
        return {"type": "additive-sign-noise", "amplitude_255": INVISIBLE_255, "seed": int(seed) + 7919}
    if attack == "blend":
        return {"type": "blend", "alpha": BLEND_ALPHA, "noise": "uniform randint(0,256)/255", "seed": int(seed)}
    if attack == "sig":
        return {
            "type": "additive-sinusoid",
            "amplitude": SIG_AMPLITUDE,
            "amplitude_255": 20,
            "frequency": SIG_FREQUENCY,
            "direction": "horizontal (varies along width)",
        }
    if attack == "wanet":
        return {
            "type": "warp",
            "k": WANET_K,
            "s": WANET_S,
            "seed": int(seed),
            "grid_sample": {"mode": "bilinear", "padding_mode": "border", "align_corners": True},
            "noise_mode": False,
        }
    return {"type": "none"}


def _save_png(img: Tensor, path: Path) -> None:
    from PIL import Image

    arr = (img.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")
    tmp.replace(path)


def trigger_files(
    attack: str, out_dir: str | Path, seed: int = 0, size: tuple[int, int] = (32, 32), channels: int = 3
) -> dict:
    """Write the CLI-usable trigger PNG(s) into ``out_dir``; return a description for the manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"attack": attack, "params": trigger_params(attack, seed)}
    h, w = size
    if attack in ("badnets", "all2all"):
        _save_png(torch.ones(channels, BADNETS_SIZE, BADNETS_SIZE), out / "trigger.png")
        info.update(
            file="trigger.png", cli_hint=["--trigger", "trigger.png"], note="patch pasted at the bottom-right corner"
        )
    elif attack == "badnets-edge":
        _save_png(torch.ones(channels, BADNETS_SIZE, BADNETS_SIZE), out / "trigger.png")
        pos = f"{w - BADNETS_SIZE},{_edge_top(h)}"
        info.update(
            file="trigger.png",
            cli_hint=["--trigger", "trigger.png", "--trigger-pos", pos],
            note=f"patch pasted with its top-left corner at x,y = {pos}",
        )
    elif attack == "trojan-square":
        _save_png(_trojan_pattern(channels), out / "trigger.png")
        info.update(
            file="trigger.png", cli_hint=["--trigger", "trigger.png"], note="patch pasted at the bottom-right corner"
        )
    elif attack == "blend":
        _save_png(_blend_noise(seed, channels, h, w), out / "trigger.png")
        info.update(
            file="trigger.png",
            trigger_blend=BLEND_ALPHA,
            cli_hint=["--trigger", "trigger.png", "--trigger-blend", str(BLEND_ALPHA)],
            note="x' = (1 - alpha) * x + alpha * trigger",
        )
    elif attack == "watermark":
        pattern, mask = _watermark(channels, h, w)
        _save_png(pattern, out / "trigger.png")
        _save_png(mask, out / "mask.png")
        info.update(
            file="trigger.png",
            cli_hint=["--trigger", "trigger.png", "--trigger-mask", "mask.png"],
            note="x' = (1 - mask) * x + mask * trigger",
        )
    elif attack == "invisible":
        _save_png(_invisible_offset(seed, channels, h, w) + 128 / 255, out / "trigger.png")
        info.update(
            file="trigger.png",
            cli_hint=["--trigger", "trigger.png", "--trigger-additive"],
            note="x' = clip(x + (trigger - 128/255))",
        )
    else:
        info.update(file=None, note="no file-based trigger is available for this attack")
    return info
