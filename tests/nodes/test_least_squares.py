"""Weighted least squares: closed form, gradcheck, the generic core node, modes, bias, bad input."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from torchddn.diagnostics import DDNError, NonRegularWarning
from torchddn.nodes.least_squares import WeightedLeastSquares, weighted_least_squares

D = torch.float64


def data(b=3, n=7, p=3, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(b, n, p, generator=g, dtype=dtype)
    y = torch.randn(b, n, generator=g, dtype=dtype)
    w = torch.rand(b, n, generator=g, dtype=dtype) + 0.2
    beta = torch.tensor([0.0, 0.3, 2.0][:b] + [1.0] * max(0, b - 3), dtype=dtype)
    return A, y, w, beta


def explicit(A, b, w, beta, bias=False):
    """Autograd-differentiable reference: solve the normal equations with torch.linalg.solve."""
    if bias:
        A = torch.cat([A, torch.ones_like(A[..., :1])], -1)
    pen = torch.ones(A.shape[-1], dtype=A.dtype)
    if bias:
        pen[-1] = 0
    G = A.mT @ (w[..., None] * A) + torch.diag_embed(beta[:, None] * pen)
    return torch.linalg.solve(G, A.mT @ (w * b)[..., None])[..., 0]


@pytest.mark.parametrize("mode", ["cholesky", "qr"])
@pytest.mark.parametrize("bias", [False, True])
def test_forward_and_gradients_match_explicit_formula(mode, bias):
    A, b, w, beta = data()
    args = [t.clone().requires_grad_() for t in (A, b, w, beta)]
    out = weighted_least_squares(*args, bias=bias, mode=mode)
    y = torch.cat([out[0], out[1][:, None]], 1) if bias else out
    ref_args = [t.clone().requires_grad_() for t in (A, b, w, beta)]
    ref = explicit(*ref_args, bias=bias)
    assert torch.allclose(y, ref, atol=1e-12)
    v = torch.randn_like(y)
    g = torch.autograd.grad((y * v).sum(), args)
    g_ref = torch.autograd.grad((ref * v).sum(), ref_args)
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, atol=1e-10)


@pytest.mark.parametrize("mode", ["cholesky", "qr"])
@pytest.mark.parametrize("bias", [False, True])
def test_gradcheck(mode, bias):
    A, b, w, beta = data(b=3, n=5, p=2)
    args = [t.clone().requires_grad_() for t in (A, b, w, beta + 0.1)]  # gradcheck steps beta both ways
    assert gradcheck(lambda *a: weighted_least_squares(*a, bias=bias, mode=mode), args)


def test_scalar_beta_and_shared_A_and_float32():
    A, b, w, _ = data(b=4)
    beta = torch.tensor(0.5, dtype=D, requires_grad=True)
    A0 = A[0].clone().requires_grad_()
    assert gradcheck(lambda A0, beta: weighted_least_squares(A0, b, w, beta), (A0, beta))
    y32 = weighted_least_squares(A.float(), b.float(), w.float(), 0.5)
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), explicit(A, b, w, torch.full((4,), 0.5, dtype=D)), atol=1e-4)


def test_bias_is_not_penalised():
    # with a huge beta the coefficients vanish and the intercept becomes the weighted mean of b
    A, b, w, _ = data()
    y, c = weighted_least_squares(A, b, w, 1e12, bias=True)
    assert y.abs().max() < 1e-9
    assert torch.allclose(c, (w * b).sum(1) / w.sum(1), atol=1e-9)


def test_matches_generic_core_node():
    import torchddn as ddn

    class LSNode(ddn.DeclarativeNode):
        def __init__(self):
            super().__init__(backward="dense")

        def objective(self, A, b, w, beta, y):
            r = (A @ y[..., None])[..., 0] - b
            return (w * r * r).sum(-1) + beta * (y * y).sum(-1)

        def solve(self, A, b, w, beta):
            return weighted_least_squares(A, b, w, beta).detach(), None

    A, b, w, beta = data(seed=3)
    beta = beta + 0.1
    args = [t.clone().requires_grad_() for t in (A, b, w, beta)]
    y = weighted_least_squares(*args)
    v = torch.randn_like(y)
    g = torch.autograd.grad((y * v).sum(), args)
    ref_args = [t.clone().requires_grad_() for t in (A, b, w, beta)]
    y_ref = ddn.DeclarativeLayer(LSNode())(*ref_args)
    g_ref = torch.autograd.grad((y_ref * v).sum(), ref_args)
    assert torch.allclose(y, y_ref, atol=1e-12)
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, atol=1e-9)


def test_module():
    A, b, w, _ = data()
    mod = WeightedLeastSquares(beta=0.3, bias=True, learn_beta=True).double()
    y, c = mod(A, b, w)
    (y.sum() + c.sum()).backward()
    assert mod.raw_beta.grad is not None and torch.isfinite(mod.raw_beta.grad)
    assert "bias=True" in repr(mod)


def test_singular_normal_matrix_is_reported_per_element():
    A, b, w, _ = data(b=3, n=4, p=3)
    A[1, :, 2] = A[1, :, 1]  # rank-deficient in element 1, beta = 0
    for mode in ["cholesky", "qr"]:
        with pytest.raises(DDNError, match=r"singular.*\[1\]"):
            weighted_least_squares(A, b, w, 0.0, mode=mode)
        with pytest.warns(NonRegularWarning, match=r"\[1\]"):
            y = weighted_least_squares(A, b, w, 0.0, mode=mode, on_failure="warn")
        assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()
    # a ridge term makes it well posed again
    assert torch.isfinite(weighted_least_squares(A, b, w, 0.1)).all()


def test_bad_input():
    A, b, w, beta = data()
    with pytest.raises(DDNError, match="A must have shape"):
        weighted_least_squares(A[:, :-1], b, w)
    with pytest.raises(DDNError, match="weights must have shape"):
        weighted_least_squares(A, b, w[:, :-1])
    with pytest.raises(DDNError, match="beta must be a scalar"):
        weighted_least_squares(A, b, w, torch.ones(5, dtype=D))
    bn = b.clone()
    bn[2, 0] = float("nan")
    with pytest.raises(DDNError, match=r"b contains NaN or Inf at batch elements \[2\]"):
        weighted_least_squares(A, bn, w)
    wn = w.clone()
    wn[1, 3] = -1
    with pytest.raises(DDNError, match=r"non-negative.*\[1\]"):
        weighted_least_squares(A, b, wn)
    with pytest.raises(DDNError, match="beta must be non-negative"):
        weighted_least_squares(A, b, w, -1.0)
    with pytest.raises(DDNError, match="mode"):
        weighted_least_squares(A, b, w, mode="svd")
