"""The inner problem's perturbation families: what they do to an image, their bounds, and that the
implicit hypergradient can differentiate through them twice."""

from __future__ import annotations

import math

import torch

from ibau_cli.unlearn import fixed_point_hypergradient
from ibau_cli.unlearn.perturbations import Additive, Warp


def _images(n: int = 3, h: int = 12, w: int = 10) -> torch.Tensor:
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))


def test_zero_warp_is_the_identity_and_a_one_pixel_flow_shifts_the_image():
    x = _images()
    warp = Warp(radius=1.0)
    p = warp.zeros(tuple(x.shape[1:]), torch.device("cpu"))
    assert p.shape == (1, 2, 4, 4)
    torch.testing.assert_close(warp.apply(x, p), x, atol=1e-5, rtol=0)
    right = p.clone()
    right[:, 0] = 1.0  # sample one pixel to the right everywhere
    shifted = warp.apply(x, right)
    torch.testing.assert_close(shifted[..., :-1], x[..., 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(shifted[..., -1], x[..., -1], atol=1e-5, rtol=0)  # border replicated
    down = p.clone()
    down[:, 1] = 2.0
    torch.testing.assert_close(warp.apply(x, down)[..., :-2, :], x[..., 2:, :], atol=1e-5, rtol=0)


def test_warp_bound_is_a_root_mean_square_displacement_scaled_with_the_image():
    assert math.isclose(Warp.with_rms_pixels(1.0, (3, 32, 32)).radius, math.sqrt(32))
    assert math.isclose(Warp.with_rms_pixels(1.0, (3, 224, 224)).radius, 7 * math.sqrt(32))
    p = torch.full((1, 2, 4, 4), 0.5)  # every control point moves 0.5 px each way
    assert math.isclose(float(p.norm()), Warp.with_rms_pixels(0.5, (3, 32, 32)).radius, rel_tol=1e-6)


def test_additive_family_clips_to_the_pixel_range():
    x = _images()
    fam = Additive(radius=10.0)
    p = fam.zeros(tuple(x.shape[1:]), torch.device("cpu")) + 0.7
    out = fam.apply(x, p)
    assert out.max() <= 1 and torch.equal(out, (x + 0.7).clamp(0, 1))


def test_warp_is_twice_differentiable_for_the_hypergradient():
    x = _images(2, 8, 8).double()
    p = (0.3 * torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1))).double().requires_grad_()
    warp = Warp(radius=5.0)
    assert torch.autograd.gradgradcheck(lambda q: warp.apply(x, q).pow(2).sum(), (p,))
    # the fixed-point hypergradient through a warp-parameterised inner problem: finite, non-zero
    conv = torch.nn.Conv2d(3, 4, 3).double()
    params = list(conv.parameters())
    loss_in = -conv(warp.apply(x, p)).tanh().pow(2).mean()
    (inner_grad,) = torch.autograd.grad(loss_in, p, create_graph=True)
    outer_grad = torch.ones_like(p)
    implicit, info = fixed_point_hypergradient(inner_grad, p, params, outer_grad, eta=0.1, terms=5, radius=5.0)
    assert info.terms_used >= 1
    assert all(g is not None and torch.isfinite(g).all() for g in implicit)
    assert sum(float(g.abs().sum()) for g in implicit) > 0
