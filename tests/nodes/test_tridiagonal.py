"""Tridiagonal and block-tridiagonal solves: both methods against dense solves, gradcheck, the dense autograd
gradient, zero pivots and bad input."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
import torch
from torch.autograd import gradcheck

from torchddn.diagnostics import DDNError, NonRegularWarning
from torchddn.nodes.tridiagonal import (BlockTridiagonalSolve, TridiagonalSolve, block_tridiagonal_solve,
                                        tridiagonal_solve)

D = torch.float64
METHODS = ["thomas", "cyclic"]


def bands(b, n, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    lo = torch.randn(b, n - 1, generator=g, dtype=dtype)
    up = torch.randn(b, n - 1, generator=g, dtype=dtype)
    di = 3 + torch.rand(b, n, generator=g, dtype=dtype)
    return lo, di, up


def dense(lo, di, up):
    return torch.diag_embed(di) + torch.diag_embed(lo, -1) + torch.diag_embed(up, 1)


def blocks(b, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(b, n - 1, k, k, generator=g, dtype=D)
    C = torch.randn(b, n - 1, k, k, generator=g, dtype=D)
    B = torch.randn(b, n, k, k, generator=g, dtype=D) + 2 * k * torch.eye(k, dtype=D)
    return A, B, C


def block_dense(A, B, C):
    b, n, k, _ = B.shape
    T = torch.zeros(b, n * k, n * k, dtype=B.dtype)
    for i in range(n):
        T[:, i * k:(i + 1) * k, i * k:(i + 1) * k] = B[:, i]
        if i < n - 1:
            T[:, (i + 1) * k:(i + 2) * k, i * k:(i + 1) * k] = A[:, i]
            T[:, i * k:(i + 1) * k, (i + 1) * k:(i + 2) * k] = C[:, i]
    return T


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 3, 4, 7, 8, 17])
def test_matches_dense_solve(method, n):
    lo, di, up = bands(3, n, seed=n)
    d = torch.randn(3, n, dtype=D)
    ref = torch.linalg.solve(dense(lo, di, up), d)
    assert torch.allclose(tridiagonal_solve(lo, di, up, d, method=method), ref, atol=1e-12)
    d2 = torch.randn(3, n, 2, dtype=D)
    assert torch.allclose(tridiagonal_solve(lo, di, up, d2, method=method), torch.linalg.solve(dense(lo, di, up), d2),
                          atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("rhs", [(), (2,)])
def test_gradcheck(method, rhs):
    lo, di, up = bands(2, 5, seed=1)
    d = torch.randn(2, 5, *rhs, dtype=D)
    args = [t.clone().requires_grad_() for t in (lo, di, up, d)]
    assert gradcheck(lambda *a: tridiagonal_solve(*a, method=method), args)


@pytest.mark.parametrize("method", METHODS)
def test_gradient_matches_dense_autograd(method):
    lo, di, up = bands(2, 6, seed=2)
    d = torch.randn(2, 6, dtype=D)
    args = [t.clone().requires_grad_() for t in (lo, di, up, d)]
    ref_args = [t.clone().requires_grad_() for t in (lo, di, up, d)]
    v = torch.randn(2, 6, dtype=D)
    g = torch.autograd.grad((tridiagonal_solve(*args, method=method) * v).sum(), args)
    y_ref = torch.linalg.solve(dense(*ref_args[:3]), ref_args[3])
    g_ref = torch.autograd.grad((y_ref * v).sum(), ref_args)
    for a, r in zip(g, g_ref):
        assert torch.allclose(a, r, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [1, 2, 5, 8])
def test_block_matches_dense_and_gradcheck(method, n):
    A, B, C = blocks(2, n, 2, seed=n)
    d = torch.randn(2, n, 2, dtype=D)
    T = block_dense(A, B, C)
    y = block_tridiagonal_solve(A, B, C, d, method=method)
    assert torch.allclose(y.reshape(2, -1), torch.linalg.solve(T, d.reshape(2, -1)), atol=1e-12)
    dr = torch.randn(2, n, 2, 3, dtype=D)
    yr = block_tridiagonal_solve(A, B, C, dr, method=method)
    assert torch.allclose(yr.reshape(2, -1, 3), torch.linalg.solve(T, dr.reshape(2, -1, 3)), atol=1e-12)
    if n in (2, 5):
        args = [t.clone().requires_grad_() for t in (A, B, C, d)]
        # full Jacobian check for n = 2; a random-projection check (fast_mode) for the larger system
        assert gradcheck(lambda *a: block_tridiagonal_solve(*a, method=method), args, fast_mode=n > 2)


def test_modules_and_float32():
    lo, di, up = bands(2, 6, dtype=torch.float32)
    d = torch.randn(2, 6)
    for method in METHODS:
        y = TridiagonalSolve(method)(lo, di, up, d)
        assert y.dtype == torch.float32
        assert torch.allclose(y, torch.linalg.solve(dense(lo, di, up), d), atol=1e-5)
    A, B, C = blocks(2, 4, 3)
    y = BlockTridiagonalSolve("cyclic")(A.float(), B.float(), C.float(), torch.randn(2, 4, 3))
    assert y.shape == (2, 4, 3)


@pytest.mark.parametrize("method", METHODS)
def test_zero_pivot_is_reported_per_element(method):
    lo, di, up = bands(3, 4)
    di[1] = 0.0
    lo[1] = 0.0  # element 1: first column is zero -> singular
    d = torch.randn(3, 4, dtype=D)
    with pytest.raises(DDNError, match=r"zero or non-finite pivot.*elements \[1\];"):
        tridiagonal_solve(lo, di, up, d, method=method)
    with pytest.warns(NonRegularWarning, match=r"elements \[1\];"):
        y = tridiagonal_solve(lo, di, up, d, method=method, on_failure="warn")
    assert torch.isfinite(y[[0, 2]]).all()
    A, B, C = blocks(2, 3, 2)
    B[0, 1] = 0.0
    A[0, 0] = 0.0
    C[0, 1] = 0.0  # block column 1 of element 0 is zero -> singular
    with pytest.raises(DDNError, match=r"elements \[0\];"):
        block_tridiagonal_solve(A, B, C, torch.randn(2, 3, 2, dtype=D), method=method)


def test_bad_input():
    lo, di, up = bands(2, 4)
    d = torch.randn(2, 4, dtype=D)
    with pytest.raises(DDNError, match="lower must have shape"):
        tridiagonal_solve(lo[:, :2], di, up, d)
    with pytest.raises(DDNError, match="d must have shape"):
        tridiagonal_solve(lo, di, up, d[:, :3])
    dn = d.clone()
    dn[1, 2] = float("nan")
    with pytest.raises(DDNError, match=r"d contains NaN or Inf at batch elements \[1\]"):
        tridiagonal_solve(lo, di, up, dn)
    with pytest.raises(DDNError, match="method"):
        tridiagonal_solve(lo, di, up, d, method="lu")
    A, B, C = blocks(2, 3, 2)
    with pytest.raises(DDNError, match="upper must have shape"):
        block_tridiagonal_solve(A, B, C[:, :, :1], torch.randn(2, 3, 2, dtype=D))


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 40), r=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_property_methods_agree_with_dense(n, r, seed):
    lo, di, up = bands(2, n, seed=seed)
    d = torch.randn(2, n, r, dtype=D, generator=torch.Generator().manual_seed(seed))
    ref = torch.linalg.solve(dense(lo, di, up), d)
    for method in METHODS:
        assert torch.allclose(tridiagonal_solve(lo, di, up, d, method=method), ref, atol=1e-11)
