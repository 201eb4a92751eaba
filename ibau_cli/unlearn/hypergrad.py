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


def fixed_point_hypergradient(
    inner_grad: Tensor,
    delta: Tensor,
    params: list[Tensor],
    outer_grad_delta: Tensor,
    *,
    eta: float,
    terms: int,
) -> tuple[list[Tensor | None], HypergradInfo]:
    """Return the implicit part (dPhi/dtheta)^T v of the hypergradient, one entry per param.

    ``inner_grad`` is dL_in/d delta computed with ``create_graph=True`` so that it is
    differentiable in both ``delta`` and ``params``. ``outer_grad_delta`` is dL_out/d delta.
    ``terms`` is K, the number of Neumann-series terms (K >= 1).

    The series is cut short if a term grows instead of shrinking (the fixed-point map is not a
    contraction there, so further terms would only add noise); ``HypergradInfo`` says so.
    """
    if terms < 1:
        raise ValueError("terms must be >= 1")
    b = outer_grad_delta.detach()
    v = b.clone()
    term = b.clone()
    used = 1
    diverging = False
    for _ in range(terms - 1):
        (hv,) = torch.autograd.grad(inner_grad, delta, grad_outputs=term, retain_graph=True)
        next_term = term - eta * hv.detach()
        if next_term.norm() > term.norm():
            diverging = True
            break
        term = next_term
        v = v + term
        used += 1
    grads = torch.autograd.grad(inner_grad, params, grad_outputs=v, retain_graph=False, allow_unused=True)
    implicit = [None if g is None else -eta * g for g in grads]
    return implicit, HypergradInfo(terms_used=used, stopped_diverging=diverging, v_norm=float(v.norm()))
