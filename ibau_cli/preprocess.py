"""Preprocessing: how pixels become the model's input, and a wrapper that applies it.

ibau works in pixel space: images are float tensors in [0, 1], NCHW. The wrapper maps them to
the range the model was trained on and normalises them, so a universal perturbation, a trigger
and the [0, 1] clamp all live where an attacker's trigger lives: in the image.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

MAX_SIDE = 4096  # a larger input side is a typo (one 100,000-pixel square image is 120 GB of floats)


@dataclass(frozen=True)
class Preprocess:
    input_size: tuple[int, int] = (32, 32)
    channels: int = 3
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    value_range: tuple[float, float] = (0.0, 1.0)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def check(self) -> list[str]:
        """Return a list of problems (empty when consistent)."""
        problems = []
        if self.channels not in (1, 3):
            problems.append(f"preprocess.channels must be 1 or 3, not {self.channels}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                problems.append(f"preprocess.{name} has {len(values)} values for {self.channels} channel(s)")
        if any(s <= 0 for s in self.std):
            problems.append("preprocess.std values must be > 0")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            problems.append(f"preprocess.input_size must be [height, width], not {list(self.input_size)}")
        elif max(self.input_size) > MAX_SIDE:
            problems.append(
                f"preprocess.input_size {list(self.input_size)} is past {MAX_SIDE} pixels a side: an image "
                "classifier takes far smaller inputs (give the model's own, e.g. --input-size 224)"
            )
        lo, hi = self.value_range
        if not hi > lo:
            problems.append(f"preprocess.value_range must be [low, high] with high > low, not {[lo, hi]}")
        return problems


class Normalized(nn.Module):
    """``model(normalise(x))`` for pixel inputs x in [0, 1]."""

    def __init__(self, model: nn.Module, pre: Preprocess) -> None:
        super().__init__()
        self.model = model
        lo, hi = pre.value_range
        mean = torch.tensor(pre.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32).view(1, -1, 1, 1)
        # pixel p in [0,1] -> (lo + (hi - lo) p - mean) / std  ==  p * scale + shift
        self.register_buffer("scale", (hi - lo) / std, persistent=False)
        self.register_buffer("shift", (lo - mean) / std, persistent=False)

        # True for a model whose outputs are probabilities (a softmax inside it): the loss and the
        # probes then see their logarithm, a logit up to a constant (see output_kind)
        self.log_outputs = False

    def normalize(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(self.normalize(x))
        if self.log_outputs:
            # float32 keeps probabilities down to 1e-38; the floor only guards exact zeros
            return out.float().clamp_min(1e-30).log()
        return out


def output_kind(outputs: Tensor) -> str:
    """``"probabilities"`` when every row lies in [0, 1] and sums to 1 (a softmax), ``"scores"``
    when every value lies in [0, 1] but rows do not sum to 1 (sigmoids), else ``"logits"``. The
    cross-entropy of the unlearning treats outputs as logits: on probabilities its gradient all but
    vanishes and the repair does nothing."""
    out = outputs.detach().float()
    if out.numel() == 0 or out.min() < -1e-5 or out.max() > 1 + 1e-5:
        return "logits"
    return "probabilities" if bool(((out.sum(1) - 1).abs() < 1e-3).all()) else "scores"
