"""1D total-variation denoising: forward against scipy, fused-group gradient vs gradcheck and finite differences of
re-solves, lambda gradient, the weakly active case, and bad input."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch.autograd import gradcheck

from torchddn.diagnostics import ConvergenceWarning, DDNError, NonRegularWarning
from torchddn.nodes.tv import TVDenoise, tv_denoise

scipy_optimize = pytest.importorskip("scipy.optimize")

D = torch.float64


def signals(b=4, n=12, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(0, 3, (b, n), generator=g).to(dtype).cumsum(1) * (torch.rand(b, 1, generator=g) > 0.5)
    return (steps + 0.3 * torch.randn(b, n, generator=g, dtype=dtype)).to(dtype)


def scipy_tv(x: np.ndarray, lam: float) -> np.ndarray:
    """Reference: the dual box-constrained least squares min ||x - D^T z|| s.t. |z| <= lam (scipy BVLS)."""
    n = len(x)
    if lam == 0 or n == 1:
        return x.copy()
    Dm = np.zeros((n - 1, n))
    Dm[np.arange(n - 1), np.arange(n - 1)] = 1
    Dm[np.arange(n - 1), np.arange(1, n)] = -1
    res = scipy_optimize.lsq_linear(Dm.T, x, bounds=(-lam, lam), method="bvls", tol=1e-14)
    return x - Dm.T @ res.x


def objective(x, y, lam):
    return 0.5 * ((y - x) ** 2).sum(-1) + lam * (y[..., 1:] - y[..., :-1]).abs().sum(-1)


@pytest.mark.parametrize("lam", [0.0, 0.05, 0.4, 1.5, 100.0])
def test_forward_matches_scipy(lam):
    x = signals(5, 15, seed=1)
    y = tv_denoise(x, lam)
    for i in range(5):
        ref = scipy_tv(x[i].numpy(), lam)
        assert np.abs(y[i].numpy() - ref).max() < 1e-9
    # optimality: no random perturbation lowers the objective
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        yp = y + 1e-3 * torch.randn(y.shape, generator=g, dtype=D)
        assert (objective(x, yp, lam) >= objective(x, y, lam) - 1e-12).all()


def test_large_lambda_gives_the_mean_and_zero_lambda_the_identity():
    x = signals(3, 10, seed=3)
    assert torch.allclose(tv_denoise(x, 1e6), x.mean(1, keepdim=True).expand_as(x), atol=1e-9)
    assert torch.equal(tv_denoise(x, 0.0), x)


def test_gradcheck_x_and_lambda():
    x = signals(4, 10, seed=4).requires_grad_()
    lam = torch.tensor([0.05, 0.3, 0.8, 2.0], dtype=D, requires_grad=True)
    assert gradcheck(lambda x, lam: tv_denoise(x, lam), (x, lam))
    lam0 = torch.tensor(0.4, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, lam: tv_denoise(x, lam), (x, lam0))


def test_jacobian_is_group_averaging_not_identity():
    x = torch.tensor([[0.0, 0.1, 0.05, 3.0, 3.1, 2.9, 3.05]], dtype=D, requires_grad=True)
    lam = 0.2
    y = tv_denoise(x, lam)
    J = torch.stack([torch.autograd.grad(y[0, i], x, retain_graph=True)[0][0] for i in range(7)])
    groups = [[0, 1, 2], [3, 4, 5, 6]]
    expected = torch.zeros(7, 7, dtype=D)
    for grp in groups:
        for i in grp:
            expected[i, grp] = 1.0 / len(grp)
    assert torch.allclose(J, expected)
    assert not torch.allclose(J, torch.eye(7, dtype=D))
    # finite differences of re-solves agree
    h = 1e-6
    for j in range(7):
        e = torch.zeros(1, 7, dtype=D)
        e[0, j] = h
        fd = (tv_denoise(x.detach() + e, lam) - tv_denoise(x.detach() - e, lam))[0] / (2 * h)
        assert torch.allclose(J[:, j], fd, atol=1e-7)


def test_lambda_gradient_matches_finite_differences():
    x = signals(3, 14, seed=5)
    lam = torch.tensor([0.1, 0.5, 1.0], dtype=D, requires_grad=True)
    v = torch.randn(3, 14, dtype=D, generator=torch.Generator().manual_seed(6))
    g = torch.autograd.grad((tv_denoise(x, lam) * v).sum(), lam)[0]
    h = 1e-6
    fd = ((tv_denoise(x, lam.detach() + h) - tv_denoise(x, lam.detach() - h)) * v).sum(1) / (2 * h)
    assert torch.allclose(g, fd, atol=1e-7)


@pytest.mark.parametrize("n", [60, pytest.param(300, marks=pytest.mark.slow)])
def test_longer_signals_converge_and_match_scipy(n):
    x = signals(4, n, seed=7)
    lam = torch.tensor([0.05, 0.5, 2.0, 20.0], dtype=D)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = tv_denoise(x, lam)
    for i in range(4):
        assert np.abs(y[i].numpy() - scipy_tv(x[i].numpy(), float(lam[i]))).max() < 1e-8


def test_weakly_active_edge_warns_and_stays_finite():
    # x = (0, 2), lam = 1: the two values meet exactly at 1 (jump 0 with |z| = lam)
    x = torch.tensor([[0.0, 2.0], [0.0, 5.0]], dtype=D, requires_grad=True)
    y = tv_denoise(x, 1.0)
    assert torch.allclose(y, torch.tensor([[1.0, 1.0], [1.0, 4.0]], dtype=D))
    with pytest.warns(NonRegularWarning, match=r"elements \[0\];"):
        g = torch.autograd.grad(y[:, 0].sum(), x)[0]
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_dtypes_and_1d_input(dtype):
    x = signals(2, 8, dtype=dtype).requires_grad_()
    mod = TVDenoise(0.3, learn_lam=True).to(dtype)
    y = mod(x)
    assert y.dtype == dtype
    y.square().sum().backward()
    assert torch.isfinite(mod.raw_lam.grad) and torch.isfinite(x.grad).all()
    assert torch.allclose(tv_denoise(x.detach()[0], 0.3), tv_denoise(x.detach(), 0.3)[0])
    assert tv_denoise(torch.tensor([[1.5]], dtype=dtype), 1.0).item() == 1.5


def test_non_convergence_is_reported():
    x = signals(2, 40, seed=8)
    with pytest.warns(ConvergenceWarning, match="did not settle"):
        tv_denoise(x, 0.3, max_iter=1)
    with pytest.raises(DDNError, match="did not settle"):
        tv_denoise(x, 0.3, max_iter=1, on_failure="raise")


def test_bad_input():
    x = signals(3, 6)
    with pytest.raises(DDNError, match="shape"):
        tv_denoise(x[None], 1.0)
    xn = x.clone()
    xn[2, 1] = float("nan")
    with pytest.raises(DDNError, match=r"x contains NaN or Inf at batch elements \[2\]"):
        tv_denoise(xn, 1.0)
    with pytest.raises(DDNError, match=r"non-negative.*\[1\]"):
        tv_denoise(x, torch.tensor([1.0, -1.0, 1.0], dtype=D))
    with pytest.raises(DDNError, match="lam must be a scalar"):
        tv_denoise(x, torch.ones(2, dtype=D))


def test_zero_lambda_with_tied_neighbours_is_the_identity():
    x = torch.tensor([[1.0, 1.0, 2.0, 2.0, 0.5]], dtype=D, requires_grad=True)
    v = torch.randn(1, 5, dtype=D, generator=torch.Generator().manual_seed(9))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.autograd.grad((tv_denoise(x, 0.0) * v).sum(), x)[0]
    assert torch.allclose(g, v)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 12), lam=st.floats(0.0, 3.0), seed=st.integers(0, 2**16))
def test_property_matches_scipy(n, lam, seed):
    x = signals(1, n, seed=seed)
    y = tv_denoise(x, lam)[0].numpy()
    assert np.abs(y - scipy_tv(x[0].numpy(), lam)).max() < 1e-8
