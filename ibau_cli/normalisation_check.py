"""Is the preprocessing right? Clean accuracy under the usual alternatives, on the same images.

The accuracy floor (``gate.min_clean_acc``) catches a preprocessing so wrong that the model is near
chance. A QA run found the milder case: a model trained with mean = std = 0.5 given ibau's default
(no normalisation) still scored above the floor, so ibau measured, probed and repaired a model that
was seeing shifted images. Here the model's accuracy under its given preprocessing is compared with
its accuracy under the presets' statistics, none and 0.5 / 0.5 on the same held-out images; an
alternative that is clearly better (paired: the images only it gets right outnumber the images only
the given one gets right by a sign test at p < 0.001, and by at least ``MIN_GAIN`` of the images)
is what the caller reports. An alternative that sends most images to one class is skipped (saturated
inputs, not a fit), and so is the whole check on fewer than three classes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor, nn

from .evaluate import predictions
from .preprocess import Normalized, Preprocess

MIN_GAIN = 0.10  # an alternative must get at least this share of the images more right
P_VALUE = 1e-3  # ... and the paired sign test must give at most this
MIN_CLASSES = 3  # the held-out images must hold this many classes for the comparison to mean anything


@dataclass(frozen=True)
class BetterPreprocess:
    preprocess: Preprocess
    name: str  # where the alternative's statistics come from ("preset cifar10", "none", "0.5 / 0.5")
    accuracy_given: float
    accuracy_better: float
    n: int
    p_value: float


def candidates(pre: Preprocess) -> list[tuple[str, Preprocess]]:
    """The alternatives tried: every preset's mean and std for this channel count, none, 0.5 / 0.5,
    each on [0, 1] pixels, and the given statistics on [0, 255] pixels; the given one left out."""
    from .config import load_preset, preset_names

    stats: list[tuple[str, tuple[float, ...], tuple[float, ...], tuple[float, float]]] = []
    c = pre.channels
    for name in preset_names():
        p = load_preset(name).get("preprocess", {})
        mean, std = p.get("mean"), p.get("std")
        if p.get("channels", 3) == c and mean and std and len(mean) in (1, c) and len(std) in (1, c):
            stats.append((f"preset {name}", tuple(mean), tuple(std), tuple(p.get("value_range", (0.0, 1.0)))))
    stats.append(("none", (0.0,) * c, (1.0,) * c, (0.0, 1.0)))
    stats.append(("0.5 / 0.5", (0.5,) * c, (0.5,) * c, (0.0, 1.0)))
    stats.append(("pixels in [0, 255]", pre.mean, pre.std, (0.0, 255.0)))
    given = (_per_channel(pre.mean, c), _per_channel(pre.std, c), tuple(pre.value_range))
    out, seen = [], {given}
    for name, mean, std, value_range in stats:
        key = (_per_channel(mean, c), _per_channel(std, c), tuple(value_range))
        if key not in seen:
            seen.add(key)
            out.append((name, replace(pre, mean=mean, std=std, value_range=value_range)))
    return out


def _per_channel(values: tuple[float, ...], c: int) -> tuple[float, ...]:
    values = tuple(round(float(v), 4) for v in values)
    return values * c if len(values) == 1 else values


def sign_test(wins: int, losses: int) -> float:
    """One-sided exact sign test: P(at least ``wins`` of ``wins + losses`` fair coin flips)."""
    n = wins + losses
    if n == 0:
        return 1.0
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / (1 << n)  # exact integers: no overflow


def better_preprocess(
    model: nn.Module, pre: Preprocess, x: Tensor, y: Tensor, right_given: Tensor | None = None, **eval_kw
) -> BetterPreprocess | None:
    """The alternative preprocessing under which ``model`` (the raw model, taking normalised inputs)
    is clearly more accurate on pixel images ``x`` in [0, 1] than under ``pre``; None when none is.
    ``right_given``: which images the model gets right under ``pre``, when the caller measured it."""
    if len(torch.unique(y)) < MIN_CLASSES:
        return None  # on one or two classes an input that pins the model to one of them wins by chance
    if right_given is None:
        right_given, _ = _correct(Normalized(model, pre), x, y, eval_kw)
    best: BetterPreprocess | None = None
    for name, alt in candidates(pre):
        right, pred = _correct(Normalized(model, alt), x, y, eval_kw)
        if int(torch.bincount(pred).max()) > len(pred) / 2:
            continue  # most images to one class: saturated inputs, not a better preprocessing
        wins, losses = int((right & ~right_given).sum()), int((~right & right_given).sum())
        p = sign_test(wins, losses)
        gain = (wins - losses) / len(y)
        if gain >= MIN_GAIN and p <= P_VALUE and (best is None or gain > best.accuracy_better - best.accuracy_given):
            best = BetterPreprocess(
                alt, name, float(right_given.float().mean()), float(right.float().mean()), len(y), p
            )
    return best


def _correct(model: nn.Module, x: Tensor, y: Tensor, eval_kw: dict) -> tuple[Tensor, Tensor]:
    """Per image, whether ``model`` is right, and its predictions."""
    model.to(eval_kw.get("device", "cpu")).eval()
    pred = predictions(model, x, **eval_kw)
    return pred == y, pred
