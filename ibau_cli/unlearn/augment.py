"""Label-free views of the clean images for the outer loss's teacher term.

With ``clean_loss = "teacher"`` the clean part of the outer loss matches the input model's own
outputs, so its images need no labels and any view of them is as good a constraint as the image
itself: flipping a traffic sign changes its meaning, not the fact that the repaired model should
answer what the input model answers. Fresh views at every step keep a 100-image clean set from
being memorised (docs/algorithm.md, "Teacher views").
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import TEACHER_VIEWS


def clean_views(x: Tensor, kind: str, gen: torch.Generator, max_shift: int = 4) -> Tensor:
    """A random view of each image in ``x`` ([B, C, H, W] in [0, 1]); ``gen`` is a CPU generator.

    ``shift``: translate by up to ``max_shift`` pixels each way (edges replicated);
    ``shift-flip``: the same, then a left-right flip for half the images;
    ``mix``: ``shift-flip``, then each image blended with another of the batch (weight uniform in
    [0, 1]); ``off``: ``x`` itself.
    """
    if kind not in TEACHER_VIEWS or kind == "auto":
        raise ValueError(f"unknown augmentation {kind!r}; one of {', '.join(TEACHER_VIEWS)}")
    if kind == "off" or len(x) == 0:
        return x
    b, _, h, w = x.shape
    s = max(0, min(max_shift, h - 1, w - 1))
    if s > 0:
        padded = torch.nn.functional.pad(x, (s, s, s, s), mode="replicate")
        oy = torch.randint(0, 2 * s + 1, (b,), generator=gen).to(x.device)
        ox = torch.randint(0, 2 * s + 1, (b,), generator=gen).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]
    if kind in ("shift-flip", "mix"):
        flip = (torch.rand(b, generator=gen) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    if kind == "mix" and b > 1:
        lam = torch.rand(b, generator=gen).to(x.device, x.dtype)[:, None, None, None]
        other = torch.randperm(b, generator=gen).to(x.device)
        x = lam * x + (1 - lam) * x[other]
    return x
