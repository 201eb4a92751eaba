"""The universal perturbations the inner problem maximises over.

I-BAU's inner variable is one universal additive perturbation in pixel space. Some backdoors are not
additive: a WaNet trigger is a fixed, smooth, sub-pixel warp whose pixel change differs from image
to image, so no single additive delta reproduces it. ``Warp`` is a second family: one universal
displacement field on a k x k control grid, upsampled bicubically and applied by bilinear
sampling. ``Masked`` is a third: an additive perturbation confined to a region (where a patch
probe points), free to take any value there. All are differentiable twice (the implicit
hypergradient needs that) and are bounded by an L2 ball in their own parameter space, so the
projected solver and the hypergradient through the projection (``hypergrad.py``) apply to each
unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor


class Perturbation(Protocol):
    """A family of universal perturbations: ``apply(x, p)`` maps images in [0, 1] to perturbed
    ones, differentiably in ``p``; ``p`` starts at ``zeros`` and stays in the L2 ball ``radius``."""

    name: str
    radius: float

    def zeros(self, image_shape: tuple[int, ...], device: torch.device) -> Tensor: ...

    def apply(self, x: Tensor, p: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class Additive:
    """x -> clip(x + delta); delta has the image's shape; ``radius``: L2 bound in [0, 1] pixels."""

    radius: float
    name: str = "additive"

    def zeros(self, image_shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.zeros((1, *image_shape), device=device)

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        return (x + p).clamp(0, 1)


@dataclass(frozen=True, eq=False)
class Masked:
    """x -> clip(x + region * delta): an additive perturbation confined to a region of the image
    (``region``: [1, 1, H, W], 1 inside), the inner problem of a patch trigger. Outside the region
    nothing moves, so the ball can be large enough for every pixel inside to take any value: a
    dense perturbation of I-BAU's radius fools a model without the trigger's help, a patch this
    size cannot, except through the trigger."""

    radius: float
    region: Tensor
    name: str = "patch"

    @classmethod
    def covering(cls, region: Tensor, channels: int) -> Masked:
        """The ball in which each pixel inside ``region`` can move by 1 (its whole range)."""
        return cls(radius=math.sqrt(channels * float(region.sum())), region=region)

    def zeros(self, image_shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.zeros((1, *image_shape), device=device)

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        return (x + self.region.to(x.device, x.dtype) * p).clamp(0, 1)


@dataclass(frozen=True)
class Warp:
    """x -> x sampled at (identity + flow); flow = bicubic upsampling of a (1, 2, k, k) grid of
    displacements in pixels (x then y). ``radius``: L2 bound on those k*k*2 control values."""

    radius: float
    k: int = 4
    name: str = "warp"

    @classmethod
    def with_rms_pixels(cls, rms_pixels: float, image_shape: tuple[int, ...], k: int = 4) -> Warp:
        """The ball whose control points move ``rms_pixels`` on average (root mean square) for a
        32-pixel image, scaled with the image's size."""
        scale = max(image_shape[-2:]) / 32.0
        return cls(radius=rms_pixels * scale * math.sqrt(2 * k * k), k=k)

    def zeros(self, image_shape: tuple[int, ...], device: torch.device) -> Tensor:
        return torch.zeros((1, 2, self.k, self.k), device=device)

    def apply(self, x: Tensor, p: Tensor) -> Tensor:
        _, _, h, w = x.shape
        flow = F.interpolate(p, size=(h, w), mode="bicubic", align_corners=True)
        ys = torch.linspace(-1, 1, h, device=x.device, dtype=x.dtype)
        xs = torch.linspace(-1, 1, w, device=x.device, dtype=x.dtype)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        grid = torch.stack((gx + flow[:, 0] * (2.0 / max(w - 1, 1)), gy + flow[:, 1] * (2.0 / max(h - 1, 1))), dim=-1)
        return bilinear_border_sample(x, grid.to(x.dtype))


def bilinear_border_sample(x: Tensor, grid: Tensor) -> Tensor:
    """``F.grid_sample(x, grid, "bilinear", padding_mode="border", align_corners=True)`` written with
    gathers, so that it is differentiable twice on every device: the implicit hypergradient of a warp
    differentiates the gradient with respect to the flow again, and CUDA's grid_sampler (and a CPU's
    before torch 2.13) has no derivative for its own backward. ``grid``: [1 or N, H', W', 2], (x, y)
    in [-1, 1]; one grid for all images when its first dimension is 1."""
    n, c, h, w = x.shape
    gx = ((grid[..., 0] + 1) * ((w - 1) / 2)).clamp(0, w - 1)
    gy = ((grid[..., 1] + 1) * ((h - 1) / 2)).clamp(0, h - 1)
    x0 = gx.detach().floor().clamp(max=max(w - 2, 0))
    y0 = gy.detach().floor().clamp(max=max(h - 2, 0))
    wx, wy = (gx - x0).unsqueeze(1), (gy - y0).unsqueeze(1)
    x0, y0 = x0.long(), y0.long()
    x1, y1 = (x0 + 1).clamp(max=w - 1), (y0 + 1).clamp(max=h - 1)
    flat = x.reshape(n, c, h * w)
    out_hw = grid.shape[1:3]

    def at(yi: Tensor, xi: Tensor) -> Tensor:
        idx = (yi * w + xi).reshape(len(yi), 1, -1).expand(n, c, -1)
        return flat.gather(2, idx).reshape(n, c, *out_hw)

    top = at(y0, x0) * (1 - wx) + at(y0, x1) * wx
    bottom = at(y1, x0) * (1 - wx) + at(y1, x1) * wx
    return top * (1 - wy) + bottom * wy
