"""Probe interface: how backdoored does a model look, from held-out clean images alone."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from ..config import cuda_class_batch
from ..device import autocast
from ..metrics import Rate


@dataclass
class ProbeContext:
    x: Tensor  # held-out clean images, pixel space [0, 1], on the CPU
    y: Tensor
    num_classes: int
    device: torch.device
    amp: torch.dtype | None
    seed: int
    clean_pred: Tensor  # the model's predictions on x (CPU)
    budget_steps: int  # optimisation steps per synthesised probe, shared by all classes
    radius: float  # L2 bound for synthesised universal perturbations (pixel space)
    batch_size: int = 256
    class_batch: int | None = None  # classes whose triggers are fitted in one batch; None: resolved_class_batch
    tick: Callable[[int], None] = field(default=lambda n: None)  # a synthesised probe's optimisation steps, as done


def resolved_class_batch(
    class_batch: int | None, device: torch.device, image_shape: tuple[int, ...], per_class: int
) -> int:
    """How many classes' triggers a synthesised probe fits at once (``probes.class_batch``; unset:
    one on a CPU, ``config.cuda_class_batch`` on CUDA)."""
    if class_batch is not None:
        return max(1, class_batch)
    return cuda_class_batch(image_shape, per_class) if device.type == "cuda" else 1


@dataclass
class ProbeResult:
    name: str
    family: str  # "patch", "frame", "blend", "signal", "warp", "colour", "synthesised"
    worst_class: int
    flip: Rate  # non-target images, not already predicted as the class, flipped to it
    details: dict = field(default_factory=dict)
    per_class: list[float] = field(default_factory=list)  # flip rate toward every class
    per_class_counts: list[Rate] = field(default_factory=list)  # the same as hits of n, where the probe has them
    seconds: float | None = None  # wall time of the probe (run_probes sets it)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "family": self.family,
            "worst_class": self.worst_class,
            "flip_rate": self.flip.to_dict(),
            **({"details": self.details} if self.details else {}),
            **({"seconds": self.seconds} if self.seconds is not None else {}),
        }


class Probe(Protocol):
    """``run`` measures the model. A probe that optimises may also define ``units(ctx) -> int``, its
    steps, and call ``ctx.tick(n)`` as it does them: the progress bar and its time estimate then
    count steps, not probes (one unit otherwise)."""

    name: str
    family: str

    def run(self, model: nn.Module, ctx: ProbeContext) -> ProbeResult: ...


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, ctx: ProbeContext) -> Tensor:
    out = []
    for s in range(0, len(x), ctx.batch_size):
        with autocast(ctx.device, ctx.amp):
            out.append(model(x[s : s + ctx.batch_size].to(ctx.device)).argmax(1).cpu())
    return torch.cat(out)


def class_rates(pred: Tensor, y: Tensor, clean_pred: Tensor, num_classes: int) -> list[Rate]:
    """Per class t: among images with label != t that the model did not already call t, how many
    are now called t (hits of n)."""
    out = []
    for t in range(num_classes):
        eligible = (y != t) & (clean_pred != t)
        out.append(Rate(int(((pred == t) & eligible).sum()), int(eligible.sum())))
    return out


def worst_class(counts: list[Rate]) -> tuple[int, Rate, list[float]]:
    """The class with the highest rate, that rate, and every class's rate (0 where n is 0)."""
    best, best_rate = 0, Rate(0, 0)
    for t, r in enumerate(counts):
        if r.n and (best_rate.n == 0 or r.hits / r.n > best_rate.hits / best_rate.n):
            best, best_rate = t, r
    return best, best_rate, [r.hits / r.n if r.n else 0.0 for r in counts]


MIN_REMAP_AGREEMENT = 2  # images of one class that must agree on a new label to count as remapped


def remap_rate(
    pred: Tensor, y: Tensor, clean_pred: Tensor, num_classes: int, agreement: int = MIN_REMAP_AGREEMENT
) -> tuple[Rate, int, int, int]:
    """All-to-all evidence: among images the model classifies correctly, the fraction sent to their
    class's most common new label (a class-dependent target). Returns that rate, how many distinct
    targets the classes go to, how many classes had a changed image, and the hits counted once per
    target: a target that several classes go to (a sink class, not a remapping) counts the images of
    its largest source class only.

    A class counts only when at least ``agreement`` (two) of its images agree on the new label: one changed image
    is always its class's "most common" new label, so on a small set (under two images per class)
    any pattern that moves images would otherwise look like a class-dependent remapping."""
    ok = clean_pred == y
    hits, sources = 0, 0
    largest_source: dict[int, int] = {}  # target -> the most images one class sent there
    for c in range(num_classes):
        changed = pred[ok & (y == c) & (pred != c)]
        if len(changed) == 0:
            continue
        sources += 1
        counts = torch.bincount(changed, minlength=num_classes)
        top = int(counts.argmax())
        if int(counts[top]) < agreement:
            continue
        hits += int(counts[top])
        largest_source[top] = max(largest_source.get(top, 0), int(counts[top]))
    return Rate(hits, int(ok.sum())), len(largest_source), sources, sum(largest_source.values())
