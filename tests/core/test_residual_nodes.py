"""Nodes declared by residuals: objective 1/2 ||r||^2, Levenberg-Marquardt forward, exact implicit backward."""
from __future__ import annotations

import pytest
import torch

import torchddn as ddn
import torchddn.solvers.least_squares as lsq

D = torch.float64


class ExpFit(ddn.DeclarativeNode):
    """(a, k) = argmin 1/2 sum_j (a exp(-k t_j) - obs_j)^2; inputs obs (b, n) and t (b, n)."""

    def initial_guess(self, obs, t):
        return torch.ones(obs.shape[0], 2, dtype=obs.dtype)

    def residuals(self, obs, t, y):
        return y[:, :1] * torch.exp(-y[:, 1:] * t) - obs


def _data(b=3, n=12, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 3, n, dtype=D).expand(b, n).clone()
    y = torch.stack([0.5 + torch.rand(b, generator=g, dtype=D), 0.3 + torch.rand(b, generator=g, dtype=D)], 1)
    obs = y[:, :1] * torch.exp(-y[:, 1:] * t) + noise * torch.randn(b, n, generator=g, dtype=D)
    return obs, t


def _fd_gradient(node, obs, t, v, h=1e-6):
    """Central finite differences of re-solves of <y(obs), v> with respect to obs."""
    out = torch.zeros_like(obs)
    for i in range(obs.shape[0]):
        for j in range(obs.shape[1]):
            e = torch.zeros_like(obs)
            e[i, j] = h
            yp, _ = node.solve(obs + e, t)
            ym, _ = node.solve(obs - e, t)
            out[i, j] = ((yp - ym) * v).sum() / (2 * h)
    return out


def test_objective_is_half_squared_norm_and_default_solver_is_lm(monkeypatch):
    obs, t = _data()
    node = ExpFit()
    y = torch.rand(3, 2, dtype=D)
    r = node.residuals(obs, t, y=y)
    torch.testing.assert_close(node.objective(obs, t, y=y), 0.5 * (r * r).sum(1))
    calls = []
    real = lsq.levenberg_marquardt
    monkeypatch.setattr(lsq, "levenberg_marquardt", lambda *a, **k: calls.append(1) or real(*a, **k))
    y_star = ddn.DeclarativeLayer(node)(obs, t)
    assert calls, "the default solver of a residuals node is levenberg_marquardt"
    assert bool(node.diagnostics.converged.all())
    # first-order condition J^T r = 0 (independent Jacobian)
    J = torch.func.vmap(torch.func.jacrev(lambda yi, oi, ti: yi[0] * torch.exp(-yi[1] * ti) - oi))(y_star, obs, t)
    g = (J * node.residuals(obs, t, y=y_star).unsqueeze(-1)).sum(1)
    assert float(g.abs().max()) < 1e-8


def test_exact_gradient_matches_finite_differences_of_resolves():
    obs, t = _data()
    node = ExpFit()
    v = torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(1))
    o = obs.clone().requires_grad_(True)
    (g,) = torch.autograd.grad((ddn.DeclarativeLayer(node)(o, t) * v).sum(), o)
    fd = _fd_gradient(ExpFit(tol=1e-15), obs, t, v)
    torch.testing.assert_close(g, fd, atol=1e-7, rtol=1e-6)
    # t is differentiable too
    tt = t.clone().requires_grad_(True)
    inputs = (obs[:2, :5].clone().requires_grad_(True), tt[:2, :5].detach().requires_grad_(True))
    assert torch.autograd.gradcheck(lambda oo, ttt: ddn.DeclarativeLayer(ExpFit())(oo, ttt), inputs)


def test_gauss_newton_option_is_the_approximation():
    obs, t = _data(noise=0.2)
    v = torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(2))
    o = obs.clone().requires_grad_(True)
    y = ddn.DeclarativeLayer(ExpFit())(o, t)
    (g_exact,) = torch.autograd.grad((y * v).sum(), o)
    (g_gn,) = torch.autograd.grad((ddn.DeclarativeLayer(ExpFit(hessian="gauss_newton"))(o, t) * v).sum(), o)
    # independent Gauss-Newton formula: obs_bar = J (J^T J)^{-1} v  (dr/dobs = -I, B = -J^T exactly)
    yd = y.detach()
    J = torch.func.vmap(torch.func.jacrev(lambda yi, oi, ti: yi[0] * torch.exp(-yi[1] * ti) - oi))(yd, obs, t)
    ref = (J @ torch.linalg.solve(J.mT @ J, v.unsqueeze(-1))).squeeze(-1)
    torch.testing.assert_close(g_gn, ref, atol=1e-10, rtol=1e-8)
    assert float((g_gn - g_exact).abs().max()) > 1e-3 * float(g_exact.abs().max())


def test_gauss_newton_option_is_exact_at_zero_residual():
    obs, t = _data(noise=0.0)
    v = torch.randn(3, 2, dtype=D, generator=torch.Generator().manual_seed(3))
    o = obs.clone().requires_grad_(True)
    (g_exact,) = torch.autograd.grad((ddn.DeclarativeLayer(ExpFit())(o, t) * v).sum(), o)
    (g_gn,) = torch.autograd.grad((ddn.DeclarativeLayer(ExpFit(hessian="gauss_newton"))(o, t) * v).sum(), o)
    torch.testing.assert_close(g_gn, g_exact, atol=1e-9, rtol=1e-7)


def test_lm_from_poor_start_in_a_node():
    class FarStart(ExpFit):
        def initial_guess(self, obs, t):
            return torch.tensor([[5.0, 4.0]], dtype=obs.dtype).expand(obs.shape[0], 2).clone()

    obs, t = _data()
    node = FarStart(max_iter=300)
    y_far = ddn.DeclarativeLayer(node)(obs, t)
    assert int(node.diagnostics.iterations.max()) > 5
    y_near = ddn.DeclarativeLayer(ExpFit())(obs, t)
    torch.testing.assert_close(y_far, y_near, atol=1e-8, rtol=0)


class CircleFit(ddn.EqConstDeclarativeNode):
    """Nonlinear residuals r = exp(y) - x on the unit circle ||y||^2 = 1 (solved by the default SQP)."""

    def initial_guess(self, x):
        return torch.tensor([[0.6, 0.8]], dtype=x.dtype).expand(x.shape[0], 2).clone()

    def residuals(self, x, y):
        return torch.exp(y) - x

    def equality_constraints(self, x, y):
        return (y * y).sum(1) - 1


def test_equality_constrained_residual_node():
    g = torch.Generator().manual_seed(4)
    x = 1.0 + torch.rand(3, 2, generator=g, dtype=D)
    node = CircleFit(tol=1e-15)
    y = ddn.DeclarativeLayer(node)(x)
    assert bool(node.diagnostics.converged.all())
    torch.testing.assert_close((y * y).sum(1), torch.ones(3, dtype=D), atol=1e-10, rtol=0)
    v = torch.randn(3, 2, generator=g, dtype=D)
    xx = x.clone().requires_grad_(True)
    (gr,) = torch.autograd.grad((ddn.DeclarativeLayer(node)(xx) * v).sum(), xx)
    fd = torch.zeros_like(x)
    h = 1e-6
    for i in range(3):
        for j in range(2):
            e = torch.zeros_like(x)
            e[i, j] = h
            fd[i, j] = ((node.solve(x + e)[0] - node.solve(x - e)[0]) * v).sum() / (2 * h)
    torch.testing.assert_close(gr, fd, atol=1e-7, rtol=1e-6)
    assert torch.autograd.gradcheck(ddn.DeclarativeLayer(CircleFit()), (x[:2].clone().requires_grad_(True),))


def test_explicit_solver_choice_and_errors():
    obs, t = _data()
    y_gn = ddn.DeclarativeLayer(ExpFit(solver="gauss_newton"))(obs, t)
    y_newton = ddn.DeclarativeLayer(ExpFit(solver="newton"))(obs, t)
    torch.testing.assert_close(y_gn, y_newton, atol=1e-8, rtol=0)

    class Nothing(ddn.DeclarativeNode):
        def initial_guess(self, x):
            return x

    with pytest.raises(NotImplementedError, match="residuals"):
        ddn.DeclarativeLayer(Nothing())(torch.ones(2, 2, dtype=D))

    class BadShape(ExpFit):
        def residuals(self, obs, t, y):
            return (y * y).sum()

    with pytest.raises(ddn.DDNError, match="residuals must return"):
        ddn.DeclarativeLayer(BadShape())(obs, t)
    with pytest.raises(ValueError, match="hessian"):
        ExpFit(hessian="bfgs")
