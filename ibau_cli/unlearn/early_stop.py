"""Stopping the repair once the backdoor is gone, judged by a trigger that worked before it.

The rounds of the I-BAU loop keep adversarially training against universal perturbations after the
backdoor is removed, and on a small clean set that costs accuracy with nothing left to remove (on
the GTSRB blend model with 80 unlearning images the ASR is 0 after round 2 of 10 and the accuracy
falls from 95 % to 87 % over the eight later rounds: docs/algorithm.md). The loop's own
perturbations are no signal (an L2 ball of radius 10 always holds one that fools most images), so
the signal is a stand-in trigger: a fixed probe pattern that sent most held-out images to the
suspected class before the repair. Once it sends at most ``threshold`` of the unlearning images of
the other classes there for ``patience`` rounds in a row, the repair stops.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..device import autocast


@dataclass
class ProxyTriggerStop:
    """``stop(round, model) -> bool`` for ``unlearn``: the proxy trigger's flip rate toward ``target``
    on ``images`` (labels other than ``target``), measured after every round and kept in ``rates``."""

    name: str  # the proxy trigger (a probe's name), for the report
    apply: Callable[[Tensor], Tensor]  # the trigger on a batch of [0, 1] CPU images, applied once
    images: Tensor
    labels: Tensor
    target: int
    threshold: float
    patience: int
    device: torch.device
    amp: torch.dtype | None = None
    batch_size: int = 256
    rates: list[float] = field(default_factory=list)
    measured_after: list[int] = field(default_factory=list)  # the round after which each rate was taken
    stopped_after: int | None = None

    def __post_init__(self) -> None:
        if self.patience < 1:
            raise ValueError(f"patience must be >= 1, not {self.patience}")
        self._x = self.images[self.labels != self.target].cpu()
        self._x_trig = self.apply(self._x)

    def rate(self, model: nn.Module) -> float:
        """Fraction of the images of the other classes, not already called ``target`` without the
        trigger, that the model calls ``target`` with it."""
        hits = eligible = 0
        with torch.no_grad(), autocast(self.device, self.amp):
            for s in range(0, len(self._x), self.batch_size):
                clean = model(self._x[s : s + self.batch_size].to(self.device)).argmax(1)
                triggered = model(self._x_trig[s : s + self.batch_size].to(self.device)).argmax(1)
                ok = clean != self.target
                eligible += int(ok.sum())
                hits += int(((triggered == self.target) & ok).sum())
        return hits / eligible if eligible else 0.0

    def record(self, round_number: int, model: nn.Module) -> float:
        """The rate after ``round_number``, kept in ``rates``."""
        rate = self.rate(model)
        self.rates.append(rate)
        self.measured_after.append(round_number)
        return rate

    def __call__(self, round_number: int, model: nn.Module) -> bool:
        self.record(round_number, model)
        recent = self.rates[-self.patience :]
        if len(recent) == self.patience and all(r <= self.threshold for r in recent):
            self.stopped_after = round_number
            return True
        return False

    def to_dict(self) -> dict:
        return {
            "proxy_trigger": self.name,
            "target": self.target,
            "threshold": self.threshold,
            "patience": self.patience,
            "n_images": len(self._x),
            "rates": self.rates,
            "measured_after_rounds": self.measured_after,
            "stopped_after_round": self.stopped_after,
        }
