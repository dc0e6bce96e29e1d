"""The batched least-squares solvers (Levenberg-Marquardt, Gauss-Newton) against scipy and closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize as so
import torch

from torchddn.diagnostics import DDNError
from torchddn.solvers import get_solver
from torchddn.solvers.base import Problem
from torchddn.solvers.least_squares import gauss_newton, levenberg_marquardt, residuals_and_jacobian

D = torch.float64


def _exp_data(b=6, n=40, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 3, n, dtype=D)
    a = 0.5 + torch.rand(b, generator=g, dtype=D)
    k = 0.3 + 1.5 * torch.rand(b, generator=g, dtype=D)
    obs = a[:, None] * torch.exp(-k[:, None] * t) + noise * torch.randn(b, n, generator=g, dtype=D)
    return t, obs


def _exp_problem(t, obs):
    return Problem(objective=None, residuals=lambda y: y[:, :1] * torch.exp(-y[:, 1:] * t) - obs)


def _scipy_exp(t, obs, y0):
    out = []
    for i in range(obs.shape[0]):
        ti, oi = t.numpy(), obs[i].numpy()
        fun = lambda p: p[0] * np.exp(-p[1] * ti) - oi  # noqa: E731
        jac = lambda p: np.stack([np.exp(-p[1] * ti), -ti * p[0] * np.exp(-p[1] * ti)], 1)  # noqa: E731
        out.append(so.least_squares(fun, y0[i].numpy(), jac=jac, xtol=1e-15, ftol=1e-15, gtol=1e-15).x)
    return torch.tensor(np.array(out), dtype=D)


def _rosenbrock(scale=1.0):
    return lambda y: scale * torch.stack([10 * (y[:, 1] - y[:, 0] ** 2), 1 - y[:, 0]], 1)


@pytest.mark.parametrize("solver", [levenberg_marquardt, gauss_newton])
def test_exponential_fit_matches_scipy(solver):
    t, obs = _exp_data()
    y0 = torch.ones(obs.shape[0], 2, dtype=D)
    res = solver(_exp_problem(t, obs), y0)
    ref = _scipy_exp(t, obs, y0)
    assert bool(res.converged.all())
    assert res.nu is None
    torch.testing.assert_close(res.y, ref, atol=1e-9, rtol=0)
    r = res.y[:, :1] * torch.exp(-res.y[:, 1:] * t) - obs
    J = torch.stack([torch.exp(-res.y[:, 1:] * t), -t * res.y[:, :1] * torch.exp(-res.y[:, 1:] * t)], -1)
    grad = (J * r.unsqueeze(-1)).sum(1)
    torch.testing.assert_close(res.residual, grad.abs().amax(1), atol=1e-12, rtol=1e-6)
    assert float(res.residual.max()) < 1e-8


def test_registered_by_name():
    assert get_solver("levenberg_marquardt") is levenberg_marquardt
    assert get_solver("gauss_newton") is gauss_newton


def test_lm_converges_from_poor_starts():
    # Rosenbrock residuals from far-away starts; the minimum is (1, 1) with zero residual
    y0 = torch.tensor([[-1.2, 1.0], [-10.0, 10.0], [30.0, -50.0], [0.0, 0.0], [5.0, 1e3]], dtype=D)
    res = levenberg_marquardt(Problem(None, residuals=_rosenbrock()), y0, max_iter=200)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.y, torch.ones_like(y0), atol=1e-8, rtol=0)


def test_lm_exponential_fit_from_poor_starts():
    t, obs = _exp_data(b=4)
    y0 = torch.tensor([[10.0, 5.0], [0.01, -1.0], [-3.0, 3.0], [100.0, 0.0]], dtype=D)
    res = levenberg_marquardt(_exp_problem(t, obs), y0, max_iter=300)
    ref = _scipy_exp(t, obs, torch.ones(4, 2, dtype=D))
    assert bool(res.converged.all())
    torch.testing.assert_close(res.y, ref, atol=1e-8, rtol=0)


def test_batch_with_different_difficulty_is_per_element():
    # element 0: affine residuals (one step); element 1: Rosenbrock from far; element 2: already optimal
    A = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]], dtype=D)
    c = torch.tensor([1.0, -2.0, 0.3], dtype=D)
    ros = _rosenbrock()

    def residuals(y):
        lin = y[:, None, :] @ A.T[None]  # (b, 1, 3)
        lin = lin.squeeze(1) - c
        rr = torch.cat([ros(y), torch.zeros_like(y[:, :1])], 1)
        use_lin = torch.tensor([True, False, False])[:, None]
        return torch.where(use_lin, lin, rr)

    y_lin = torch.linalg.lstsq(A, c.unsqueeze(-1)).solution.squeeze(-1)
    y0 = torch.stack([torch.zeros(2, dtype=D), torch.tensor([-8.0, 20.0], dtype=D), torch.ones(2, dtype=D)])
    res = levenberg_marquardt(Problem(None, residuals=residuals), y0, max_iter=200)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.y[0], y_lin, atol=1e-10, rtol=0)
    torch.testing.assert_close(res.y[1:], torch.ones(2, 2, dtype=D), atol=1e-8, rtol=0)
    its = res.iterations
    assert int(its[2]) == 0
    assert int(its[0]) <= 5 < int(its[1])


def test_linear_least_squares_closed_form():
    g = torch.Generator().manual_seed(3)
    A = torch.randn(5, 30, 4, generator=g, dtype=D)
    c = torch.randn(5, 30, generator=g, dtype=D)
    prob = Problem(None, residuals=lambda y: (A @ y.unsqueeze(-1)).squeeze(-1) - c)
    res = levenberg_marquardt(prob, torch.zeros(5, 4, dtype=D))
    ref = torch.linalg.lstsq(A, c.unsqueeze(-1)).solution.squeeze(-1)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.y, ref, atol=1e-9, rtol=0)
    tight = levenberg_marquardt(prob, torch.zeros(5, 4, dtype=D), tol=1e-14)
    torch.testing.assert_close(tight.y, ref, atol=1e-12, rtol=0)


def test_stopping_is_scale_invariant():
    t, obs = _exp_data(b=3)
    y0 = torch.ones(3, 2, dtype=D)
    base = levenberg_marquardt(_exp_problem(t, obs), y0)
    for s in (1e-6, 1e6):
        scaled = levenberg_marquardt(Problem(None, residuals=lambda y, s=s: s * (y[:, :1] * torch.exp(-y[:, 1:] * t)
                                                                                 - obs)), y0)
        assert bool(scaled.converged.all())
        torch.testing.assert_close(scaled.y, base.y, atol=1e-9, rtol=0)
        assert (scaled.iterations - base.iterations).abs().max() <= 1


def test_zero_residual_problem():
    t = torch.linspace(0, 2, 20, dtype=D)
    y_true = torch.tensor([[2.0, 0.7], [0.5, 1.5]], dtype=D)
    obs = y_true[:, :1] * torch.exp(-y_true[:, 1:] * t)
    res = levenberg_marquardt(_exp_problem(t, obs), torch.ones(2, 2, dtype=D))
    assert bool(res.converged.all())
    torch.testing.assert_close(res.y, y_true, atol=1e-12, rtol=0)


def test_float32():
    t, obs = _exp_data(b=4)
    res = levenberg_marquardt(_exp_problem(t.float(), obs.float()), torch.ones(4, 2))
    ref = _scipy_exp(t, obs, torch.ones(4, 2, dtype=D))
    assert res.y.dtype == torch.float32
    assert bool(res.converged.all())
    torch.testing.assert_close(res.y.double(), ref, atol=1e-4, rtol=0)


def test_bad_inputs_raise():
    t, obs = _exp_data(b=3)
    prob = _exp_problem(t, obs)
    y0 = torch.ones(3, 2, dtype=D)
    y0[1, 0] = float("nan")
    with pytest.raises(DDNError, match=r"y0.*NaN.*\[1\]"):
        levenberg_marquardt(prob, y0)
    bad = Problem(None, residuals=lambda y: torch.log(y))  # log of a negative start: NaN residuals
    with pytest.raises(DDNError, match=r"starting point.*\[0\]"):
        levenberg_marquardt(bad, torch.tensor([[-1.0, 1.0], [1.0, 2.0]], dtype=D))
    with pytest.raises(DDNError, match="residuals"):
        levenberg_marquardt(Problem(objective=lambda y: (y * y).sum(1)), torch.ones(3, 2, dtype=D))
    with pytest.raises(DDNError, match="unconstrained"):
        levenberg_marquardt(Problem(None, eq=lambda y: y[:, :1], residuals=lambda y: y), torch.ones(3, 2, dtype=D))
    with pytest.raises(DDNError, match="residuals must return"):
        levenberg_marquardt(Problem(None, residuals=lambda y: y.sum()), torch.ones(3, 2, dtype=D))


def test_max_iter_reports_not_converged():
    y0 = torch.tensor([[-10.0, 10.0]], dtype=D)
    res = levenberg_marquardt(Problem(None, residuals=_rosenbrock()), y0, max_iter=2)
    assert not bool(res.converged.any())
    assert int(res.iterations[0]) == 2


class _OnceDifferentiable(torch.autograd.Function):
    """sin(x) whose backward autograd cannot differentiate again (forward mode still works)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.sin(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])
        ctx.x = inputs[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(x)

    @staticmethod
    def jvp(ctx, t):
        return t * torch.cos(ctx.x)


@pytest.mark.parametrize("method", ["auto", "reverse", "forward"])
def test_jacobian_methods_agree_with_jacrev(method):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(3, 7, 4, generator=g, dtype=D)
    fn = lambda y: torch.tanh((W @ y.unsqueeze(-1)).squeeze(-1)) * y[:, :1]  # noqa: E731
    y = torch.randn(3, 4, generator=g, dtype=D)
    r, J = residuals_and_jacobian(fn, y, method)
    ref = torch.func.vmap(torch.func.jacrev(lambda yi, Wi: torch.tanh(Wi @ yi) * yi[:1]))(y, W)
    torch.testing.assert_close(r, fn(y))
    torch.testing.assert_close(J, ref, atol=1e-12, rtol=0)


def test_jacobian_falls_back_to_forward_mode():
    y = torch.tensor([[0.3, -0.2, 1.0], [1.1, 0.4, -2.0]], dtype=D)
    fn = lambda u: _OnceDifferentiable.apply(u) * 2.0  # noqa: E731
    r, J = residuals_and_jacobian(fn, y, "auto")
    torch.testing.assert_close(J, torch.diag_embed(2 * torch.cos(y)))
    with pytest.raises(RuntimeError):
        residuals_and_jacobian(fn, y, "reverse")
