"""Stepping a finished repair back toward the input model's weights while the backdoor stays gone.

On a small clean set the accuracy a repair costs is spread along the whole way from the input
weights to the repaired ones, while the backdoor goes in a stretch of it: on the GTSRB blend model
with 80 unlearning images the true ASR is 0.1 % a quarter of the way and the accuracy 95 %, against
87 % at the end (docs/algorithm.md). The signal is the early stop's: a trigger that worked before the
repair (a fixed probe pattern that named the guided class, or the user's own trigger). It is
measured on the unlearning images at fixed fractions of the way; the weights kept are the first
fraction at which it has stayed gone ``patience`` points in a row, as the early stop asks it to
stay gone rounds in a row (a pattern that just stopped working can leave the true trigger at 10-40 %:
the point before is not enough). When no fraction qualifies, the repaired weights are kept. Nothing
moves when the repaired model itself still fails the test, nor when the input model already passes
it on these images (then the test says nothing about the way between).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .early_stop import ProxyTriggerStop

FRACTIONS = (0.25, 0.5, 0.75)  # of the way from the input weights to the repaired ones; 1.0 is the repair


def _set_between(params: Sequence[nn.Parameter], start: Sequence[Tensor], end: Sequence[Tensor], a: float) -> None:
    """``params`` = start + a (end - start); ``start`` may be kept on the CPU (moved one tensor at a time)."""
    with torch.no_grad():
        for p, p0, p1 in zip(params, start, end, strict=True):
            p0 = p0.to(p.device, non_blocking=True)
            p.copy_(p0 + a * (p1 - p0))


def step_back(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    start: Sequence[Tensor],
    proxy: ProxyTriggerStop,
    fractions: Sequence[float] = FRACTIONS,
) -> dict:
    """Move ``params`` (now the repaired weights; ``start`` holds their values before the repair) to
    the first of ``fractions`` at which ``proxy`` has sent at most ``proxy.threshold`` of its images
    to its class there and at the ``proxy.patience - 1`` fractions before it; leave them where they
    are when none does, when the repaired weights fail that test, or when the input weights pass it.
    Returns what was measured: the fractions (0, those tried, and 1.0), the proxy's rate at each
    and the ``kept_fraction``."""
    end = [p.detach().clone() for p in params]
    final_rate = proxy.rate(model)
    measured: list[float] = []
    rates: list[float] = []
    kept = 1.0
    if final_rate <= proxy.threshold:
        _set_between(params, start, end, 0.0)
        measured.append(0.0)
        rates.append(proxy.rate(model))
    if rates and rates[0] > proxy.threshold:  # the proxy worked on the input model: a signal to follow
        streak = 0
        for a in fractions:
            _set_between(params, start, end, a)
            rate = proxy.rate(model)
            measured.append(a)
            rates.append(rate)
            streak = streak + 1 if rate <= proxy.threshold else 0
            if streak >= proxy.patience:
                kept = a
                break
    if kept == 1.0:  # the repaired weights exactly, not p0 + (p1 - p0) rounded
        with torch.no_grad():
            for p, p1 in zip(params, end, strict=True):
                p.copy_(p1)
    return {
        "proxy_trigger": proxy.name,
        "threshold": proxy.threshold,
        "patience": proxy.patience,
        "fractions": [*measured, 1.0],
        "rates": [*rates, final_rate],
        "kept_fraction": kept,
    }
