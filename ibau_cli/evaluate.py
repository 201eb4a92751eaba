"""Forward-only evaluation: predictions, accuracy and attack success rate on pixel tensors."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .device import autocast
from .metrics import Rate
from .triggers import KnownTrigger


@torch.no_grad()
def logits(model: nn.Module, x: Tensor, *, device: torch.device, batch_size: int = 256, amp=None) -> Tensor:
    model.eval()
    out = []
    for s in range(0, len(x), batch_size):
        with autocast(device, amp):
            out.append(model(x[s : s + batch_size].to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def predictions(model: nn.Module, x: Tensor, **kw) -> Tensor:
    """The class ``model`` gives each image (on the CPU)."""
    return logits(model, x, **kw).argmax(1)


def attack_success(model: nn.Module, x: Tensor, y: Tensor, trigger: KnownTrigger, **kw) -> Rate:
    """Fraction of triggered images, whose true label is not the target, classified as the target."""
    keep = y != trigger.target
    xs = trigger.apply(x[keep])
    pred = logits(model, xs, **kw).argmax(1)
    return Rate(int((pred == trigger.target).sum()), int(keep.sum()))
