"""Fixed trigger patterns, not tuned to any one attack: patches, frames, blends, a sinusoidal
signal, smooth warps and low-frequency colour shifts."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import ProbeContext, ProbeResult, class_rates, predict, remap_rate, worst_class

Transform = Callable[[Tensor, torch.Generator], Tensor]

# where a fixed patch goes: the four corners, the centre and (0.4.0) the middle of each edge, a place
# a QA model's trigger sat (mid-right) that no fixed patch reached
PATCH_PLACES = ("br", "bl", "tr", "tl", "cc", "cr", "cl", "tc", "bc")
EDGE_PLACES = ("cr", "cl", "tc", "bc")


@dataclass
class PatternProbe:
    name: str
    family: str
    transform: Transform
    # False for the middle of each edge (0.4.0) and the frames (0.4.2): as a proxy trigger such a probe
    # must beat the corner and centre ones by proxy_trigger's margin (a model whose patch detector
    # answers along a whole edge kept its corner proxy, whose region the repair had been measured with)
    preferred: bool = True
    # the version that added the probe ("": before 0.4.0): benchmarks/edge_probe_check.py replays the
    # earlier benchmark runs' probe decisions without the probes a version added
    added_in: str = ""

    def run(self, model: nn.Module, ctx: ProbeContext) -> ProbeResult:
        gen = torch.Generator().manual_seed(ctx.seed)
        pred = predict(model, self.transform(ctx.x, gen), ctx)
        counts = class_rates(pred, ctx.y, ctx.clean_pred, ctx.num_classes)
        worst, rate, rates = worst_class(counts)
        remap, targets, sources, one_per_target = remap_rate(pred, ctx.y, ctx.clean_pred, ctx.num_classes)
        details = {
            "remap_rate": remap.to_dict(),
            "remap_targets": targets,
            "remap_sources": sources,
            "remap_hits_one_source_per_target": one_per_target,
        }
        return ProbeResult(self.name, self.family, worst, rate, details, per_class=rates, per_class_counts=counts)


def _patch(size_frac: float, where: str, colour: str) -> Transform:
    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        _, c, h, w = x.shape
        s = max(2, round(size_frac * min(h, w)))
        top = {"t": 1, "b": h - s - 1, "c": (h - s) // 2}[where[0]]
        left = {"l": 1, "r": w - s - 1, "c": (w - s) // 2}[where[-1]]
        if colour == "white":
            patch = torch.ones(c, s, s)
        elif colour == "black":
            patch = torch.zeros(c, s, s)
        elif colour == "checker":
            ii, jj = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
            patch = ((ii + jj) % 2).float().expand(c, s, s)
        else:
            patch = torch.rand(c, 1, 1, generator=gen).expand(c, s, s)
        out = x.clone()
        out[:, :, top : top + s, left : left + s] = patch
        if where != "cc":
            # every other image gets it flush against the edge (or into the very corner), where many
            # attacks put their patch, instead of one pixel in
            t0 = {"t": 0, "b": h - s}.get(where[0], top)
            l0 = {"l": 0, "r": w - s}.get(where[-1], left)
            out2 = x.clone()
            out2[:, :, t0 : t0 + s, l0 : l0 + s] = patch
            return torch.where(torch.arange(len(x)).view(-1, 1, 1, 1) % 2 == 0, out, out2)
        return out

    return apply


def _blend(alpha: float, kind: str) -> Transform:
    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        _, c, h, w = x.shape
        if kind == "noise":
            pattern = torch.rand(1, c, h, w, generator=gen)
        else:  # a smooth random image: low-resolution noise upsampled
            pattern = F.interpolate(
                torch.rand(1, c, 4, 4, generator=gen), size=(h, w), mode="bicubic", align_corners=False
            )
        return ((1 - alpha) * x + alpha * pattern).clamp(0, 1)

    return apply


def _signal(amplitude: float, freq: int, vertical: bool) -> Transform:
    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        _, _, h, w = x.shape
        if vertical:
            wave = torch.sin(2 * math.pi * torch.arange(h) * freq / h).view(1, 1, h, 1)
        else:
            wave = torch.sin(2 * math.pi * torch.arange(w) * freq / w).view(1, 1, 1, w)
        return (x + amplitude * wave).clamp(0, 1)

    return apply


def _warp(k: int, strength: float) -> Transform:
    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        _, _, h, w = x.shape
        noise = torch.rand(1, 2, k, k, generator=gen) * 2 - 1
        noise = noise / noise.abs().mean()
        flow = F.interpolate(noise, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
        grid = torch.stack([xs, ys], dim=-1).unsqueeze(0)
        grid = (grid + strength * flow / max(h, w)).clamp(-1, 1)
        return F.grid_sample(x, grid.expand(len(x), -1, -1, -1), align_corners=True)

    return apply


def _frame(width: int, value: float) -> Transform:
    """A border of ``width`` pixels of one grey level all round the image (0.4.2: a QA MNIST model's
    1-pixel white frame, 100 % ASR, was missed by every other probe)."""

    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        out = x.clone()
        out[:, :, :width, :] = value
        out[:, :, -width:, :] = value
        out[:, :, :, :width] = value
        out[:, :, :, -width:] = value
        return out

    return apply


def _colour(shift: float) -> Transform:
    def apply(x: Tensor, gen: torch.Generator) -> Tensor:
        c = x.shape[1]
        direction = torch.rand(1, c, 1, 1, generator=gen) * 2 - 1
        return (x + shift * direction / direction.abs().max()).clamp(0, 1)

    return apply


def builtin_patterns() -> list[PatternProbe]:
    probes = []
    for frac in (0.1, 0.2):
        for where in PATCH_PLACES:
            for colour in ("white", "black", "checker", "random"):
                probes.append(
                    PatternProbe(
                        f"patch-{colour}-{where}-{frac:.0%}",
                        "patch",
                        _patch(frac, where, colour),
                        preferred=where not in EDGE_PLACES,
                        added_in="0.4.0" if where in EDGE_PLACES else "",
                    )
                )
    for width in (1, 2):
        for colour, value in (("white", 1.0), ("black", 0.0)):
            probes.append(
                PatternProbe(
                    f"frame-{colour}-{width}px", "frame", _frame(width, value), preferred=False, added_in="0.4.2"
                )
            )
    for alpha in (0.1, 0.2):
        for kind in ("noise", "smooth"):
            probes.append(PatternProbe(f"blend-{kind}-{alpha}", "blend", _blend(alpha, kind)))
    for freq in (4, 6):
        for vertical in (False, True):
            probes.append(
                PatternProbe(
                    f"signal-sin{freq}-{'v' if vertical else 'h'}", "signal", _signal(20 / 255, freq, vertical)
                )
            )
    for k, strength in ((4, 0.5), (4, 1.0), (8, 1.0)):
        probes.append(PatternProbe(f"warp-k{k}-s{strength}", "warp", _warp(k, strength)))
    for shift in (0.1, 0.2):
        probes.append(PatternProbe(f"colour-shift-{shift}", "colour", _colour(shift)))
    return probes
