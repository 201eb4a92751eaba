"""Implicit hypergradient by the fixed-point method (truncated Neumann series).

Setting (Zeng et al., ICLR 2022, section 3): the inner problem's solution delta* is a fixed
point of one gradient step on the inner objective, Phi(delta, theta) = delta - eta * g, with
g = dL_in/d delta. The total derivative of the outer loss is

    dL_out/dtheta = dL_out/dtheta (direct) + (dPhi/dtheta)^T v,
    v = sum_{k<K} ((dPhi/d delta)^T)^k dL_out/d delta.

With Phi = delta - eta g:  (dPhi/d delta)^T v = v - eta H v  (H = d2 L_in / d delta2, symmetric)
and (dPhi/dtheta)^T v = -eta d(g . v)/dtheta. Every product is one double backward through g's
graph, so this works for any module whose ops support double backward (plain modules and
TorchScript modules alike), using plain ``torch.autograd.grad`` over the parameters.

**Through the projection.** ibau's inner solver is projected gradient ascent on an L2 ball of
radius C, so its fixed-point map is Phi = P(delta - eta g), with P the projection. When the
solution lies on the sphere and the step leaves the ball (z = delta - eta g, |z| > C), P's
Jacobian there is J = (C / |z|) (I - z z^T / |z|^2): symmetric, it removes the radial direction
and shrinks the rest. Then (dPhi/d delta)^T u = (I - eta H) J u and (dPhi/dtheta)^T v =
-eta d(g . J v)/dtheta. Without J (the authors' unconstrained formula) the series would follow the
radial component of dL_out/d delta, which is mostly what the outer gradient is at a maximiser on
the sphere, although delta cannot move that way: the hypergradient would answer for an
unconstrained delta that the solver never returns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class HypergradInfo:
    terms_used: int
    stopped_diverging: bool
    v_norm: float


def projection_jacobian(delta: Tensor, inner_grad: Tensor, eta: float, radius: float | None):
    """The L2-ball projection's Jacobian at ``z = delta - eta * inner_grad`` as a function u -> J u.

    Identity when there is no radius or ``z`` lies inside the ball (the projection is inactive).
    """
    if radius is None:
        return None
    z = (delta - eta * inner_grad).detach()
    z_norm = float(z.norm())
    if z_norm <= radius or z_norm == 0.0:
        return None
    z_hat = z / z_norm
    scale = radius / z_norm

    def apply(u: Tensor) -> Tensor:
        return scale * (u - z_hat * (z_hat * u).sum())

    return apply


def fixed_point_hypergradient(
    inner_grad: Tensor,
    delta: Tensor,
    params: list[Tensor],
    outer_grad_delta: Tensor,
    *,
    eta: float,
    terms: int,
    radius: float | None = None,
) -> tuple[list[Tensor | None], HypergradInfo]:
    """Return the implicit part (dPhi/dtheta)^T v of the hypergradient, one entry per param.

    ``inner_grad`` is dL_in/d delta computed with ``create_graph=True`` so that it is
    differentiable in both ``delta`` and ``params``. ``outer_grad_delta`` is dL_out/d delta.
    ``terms`` is K, the number of Neumann-series terms (K >= 1). ``radius``: the inner solver
    projects onto the L2 ball of that radius; the map is then differentiated through the
    projection (module docstring). ``None``: an unconstrained inner solver.

    The series is cut short if a term grows instead of shrinking (the fixed-point map is not a
    contraction there, so further terms would only add noise); ``HypergradInfo`` says so.
    """
    if terms < 1:
        raise ValueError("terms must be >= 1")
    project = projection_jacobian(delta, inner_grad, eta, radius)
    b = outer_grad_delta.detach()
    v = b.clone()
    term = b.clone()
    used = 1
    diverging = False
    for _ in range(terms - 1):
        u = term if project is None else project(term)
        (hv,) = torch.autograd.grad(inner_grad, delta, grad_outputs=u, retain_graph=True)
        next_term = u - eta * hv.detach()
        if next_term.norm() > term.norm():
            diverging = True
            break
        term = next_term
        v = v + term
        used += 1
    w = v if project is None else project(v)
    grads = torch.autograd.grad(inner_grad, params, grad_outputs=w, retain_graph=False, allow_unused=True)
    implicit = [None if g is None else -eta * g for g in grads]
    return implicit, HypergradInfo(terms_used=used, stopped_diverging=diverging, v_norm=float(v.norm()))
