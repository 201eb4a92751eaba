"""The implicit hypergradient against closed forms on a quadratic bilevel problem.

L_in(delta, theta) = 1/2 delta^T A delta - delta^T B theta  ->  delta*(theta) = A^-1 B theta
L_out(delta, theta) = 1/2 |theta|^2 + c^T delta            ->  dL/dtheta = theta + B^T A^-1 c
With Phi = delta - eta grad L_in, the K-term Neumann estimate is eta B^T sum_{k<K} (I - eta A)^k c.
"""

from __future__ import annotations

import torch

from ibau_cli.unlearn import fixed_point_hypergradient


def _problem(seed: int = 0, d: int = 6, p: int = 4):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    A = m @ m.T / d + torch.eye(d, dtype=torch.float64)  # SPD, eigenvalues in about [1, 5]
    B = torch.randn(d, p, generator=g, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(p, generator=g, dtype=torch.float64, requires_grad=True)
    return A, B, c, theta


def _implicit(A, B, c, theta, eta, K):
    delta_star = torch.linalg.solve(A, B @ theta.detach())
    delta = delta_star.clone().requires_grad_(True)
    loss_in = 0.5 * delta @ A @ delta - delta @ (B @ theta)
    (g,) = torch.autograd.grad(loss_in, delta, create_graph=True)
    (implicit,), info = fixed_point_hypergradient(g, delta, [theta], c, eta=eta, terms=K)
    return implicit, info


def test_converges_to_closed_form_total_derivative():
    A, B, c, theta = _problem()
    eta = 1.0 / float(torch.linalg.eigvalsh(A).max())  # a contraction
    implicit, info = _implicit(A, B, c, theta, eta, K=400)
    exact = B.T @ torch.linalg.solve(A, c)
    assert not info.stopped_diverging
    torch.testing.assert_close(implicit, exact, rtol=1e-8, atol=1e-8)
    total = theta.detach() + implicit
    torch.testing.assert_close(total, theta.detach() + exact)


def test_truncated_series_matches_its_closed_form():
    A, B, c, theta = _problem(seed=1)
    eta, K = 0.1, 5
    implicit, info = _implicit(A, B, c, theta, eta, K)
    J = torch.eye(len(c), dtype=torch.float64) - eta * A
    v = sum(torch.linalg.matrix_power(J, k) @ c for k in range(K))
    torch.testing.assert_close(implicit, eta * B.T @ v, rtol=1e-10, atol=1e-12)
    assert info.terms_used == K


def test_series_stops_when_not_a_contraction():
    A, B, c, theta = _problem(seed=2)
    eta = 3.0 / float(torch.linalg.eigvalsh(A).max())  # |1 - eta*lambda_max| = 2 > 1
    implicit, info = _implicit(A, B, c, theta, eta, K=10)
    assert info.stopped_diverging and info.terms_used < 10
    assert torch.isfinite(implicit).all()


def test_through_the_projection_matches_the_constrained_solution():
    """Linear inner objective on an L2 ball: delta*(theta) = C a / |a| with a = B theta, so
    d delta*/d theta = C / |a| (I - a a^T / |a|^2) B. The unconstrained formula gets it wrong."""
    g = torch.Generator().manual_seed(3)
    d, p, C, eta = 5, 3, 2.0, 0.5
    B = torch.randn(d, p, generator=g, dtype=torch.float64)
    c = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(p, generator=g, dtype=torch.float64, requires_grad=True)
    a = (B @ theta).detach()
    delta = (C * a / a.norm()).clone().requires_grad_(True)

    def grad_in():  # of min_delta -a.delta on |delta| <= C; a fresh graph per call
        loss_in = -delta @ (B @ theta) + 0.0 * delta.pow(2).sum()
        return torch.autograd.grad(loss_in, delta, create_graph=True)[0]

    (implicit,), info = fixed_point_hypergradient(grad_in(), delta, [theta], c, eta=eta, terms=300, radius=C)
    a_hat = a / a.norm()
    exact = (C / a.norm() * (torch.eye(d, dtype=torch.float64) - torch.outer(a_hat, a_hat)) @ B).T @ c
    assert not info.stopped_diverging
    torch.testing.assert_close(implicit, exact, rtol=1e-8, atol=1e-10)
    (unconstrained,), _ = fixed_point_hypergradient(grad_in(), delta, [theta], c, eta=eta, terms=300)
    assert (unconstrained - exact).norm() > 0.5 * exact.norm()


def test_projection_inactive_inside_the_ball_changes_nothing():
    A, B, c, theta = _problem(seed=4)
    delta_star = torch.linalg.solve(A, B @ theta.detach())
    delta = delta_star.clone().requires_grad_(True)

    def g():
        loss_in = 0.5 * delta @ A @ delta - delta @ (B @ theta)
        return torch.autograd.grad(loss_in, delta, create_graph=True)[0]

    big = float(delta_star.norm()) * 10
    (with_ball,), _ = fixed_point_hypergradient(g(), delta, [theta], c, eta=0.1, terms=5, radius=big)
    (without,), _ = fixed_point_hypergradient(g(), delta, [theta], c, eta=0.1, terms=5)
    torch.testing.assert_close(with_ball, without)
