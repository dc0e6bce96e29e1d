"""Sinkhorn: marginals, implicit gradient vs gradcheck and unrolled Sinkhorn, shared cost matrices, the truncated
backward, non-convergence and bad input."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from torchddn.diagnostics import ConvergenceWarning, DDNError
from torchddn.nodes.optimal_transport import Sinkhorn, sinkhorn

D = torch.float64


def problem(b=2, m=4, n=3, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(b, m, n, generator=g, dtype=dtype)
    r = torch.softmax(torch.randn(b, m, generator=g, dtype=dtype), 1)
    c = torch.softmax(torch.randn(b, n, generator=g, dtype=dtype), 1)
    return M, r, c


def unrolled(M, r, c, gamma, iters):
    """Autograd through plain log-domain Sinkhorn iterations from zero potentials."""
    logk = -gamma * M
    alpha = torch.zeros_like(r)
    beta = torch.zeros_like(c)
    for _ in range(iters):
        alpha = r.log() - torch.logsumexp(logk + beta[:, None, :], 2)
        beta = c.log() - torch.logsumexp(logk + alpha[:, :, None], 1)
    return torch.exp(logk + alpha[:, :, None] + beta[:, None, :])


def tangent(gr, gc):
    """Project (r_bar, c_bar) orthogonally to (1, -1): the part seen by mass-preserving perturbations."""
    t = (gr.sum(1) - gc.sum(1)) / (gr.shape[1] + gc.shape[1])
    return gr - t[:, None], gc + t[:, None]


@pytest.mark.parametrize("shape", [(4, 3), (3, 5), (4, 4)])
@pytest.mark.parametrize("gamma", [0.5, 5.0])
def test_marginals_hold(shape, gamma):
    M, r, c = problem(3, *shape)
    P = sinkhorn(M, r, c, gamma=gamma)
    assert (P.sum(2) - r).abs().max() < 1e-9
    assert (P.sum(1) - c).abs().max() < 1e-9
    # the plan has the Gibbs form diag(u) exp(-gamma M) diag(v)
    logq = P.log() + gamma * M
    assert torch.allclose(logq - logq[:, :, :1] - logq[:, :1, :] + logq[:, :1, :1], torch.zeros_like(logq),
                          atol=1e-9)


def test_default_marginals_are_uniform():
    M, _, _ = problem(2, 4, 5)
    P = sinkhorn(M)
    assert torch.allclose(P.sum(2), torch.full((2, 4), 0.25, dtype=D), atol=1e-9)
    assert torch.allclose(P.sum(1), torch.full((2, 5), 0.2, dtype=D), atol=1e-9)


@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_gradcheck_M_and_marginals(shape):
    M, r, c = problem(2, *shape)
    a, b = r.log().requires_grad_(), c.log().requires_grad_()
    M = M.requires_grad_()
    # normalised marginals keep sum(r) = sum(c) under gradcheck's perturbations
    norm = lambda t: t.exp() / t.exp().sum(1, keepdim=True)  # noqa: E731
    assert gradcheck(lambda M, a, b: sinkhorn(M, norm(a), norm(b), gamma=1.0), (M, a, b))


@pytest.mark.parametrize("shape", [(4, 3), (3, 5)])
def test_implicit_gradient_matches_unrolled_sinkhorn(shape):
    M, r, c = problem(2, *shape, seed=1)
    W = torch.randn(2, *shape, dtype=D, generator=torch.Generator().manual_seed(5))
    args = [t.clone().requires_grad_() for t in (M, r, c)]
    g = torch.autograd.grad((sinkhorn(*args, gamma=3.0) * W).sum(), args)
    ref_args = [t.clone().requires_grad_() for t in (M, r, c)]
    g_ref = torch.autograd.grad((unrolled(*ref_args, 3.0, 500) * W).sum(), ref_args)
    assert torch.allclose(g[0], g_ref[0], atol=1e-9)
    for a, b in zip(tangent(g[1], g[2]), tangent(g_ref[1], g_ref[2])):
        assert torch.allclose(a, b, atol=1e-9)
    # our (r_bar, c_bar) is itself the representative orthogonal to (1, -1)
    assert torch.allclose(g[1].sum(1), g[2].sum(1), atol=1e-12)


def test_shared_cost_matrix_with_batched_marginals():
    M, r, c = problem(3, 4, 5)
    M0 = M[0].clone().requires_grad_()
    P = sinkhorn(M0, r, c)
    assert P.shape == (3, 4, 5)
    P_ref = sinkhorn(M[0].expand(3, 4, 5), r, c)
    assert torch.allclose(P, P_ref, atol=1e-12)
    assert gradcheck(lambda M0: sinkhorn(M0, r, c, gamma=1.0), (M0,))
    # unbatched everything: (m, n) in, (m, n) out
    assert sinkhorn(M[0], r[0], c[0]).shape == (4, 5)


def test_truncated_backward_is_close_at_convergence():
    M, r, c = problem(2, 5, 4, seed=2)
    W = torch.randn(2, 5, 4, dtype=D, generator=torch.Generator().manual_seed(1))
    Mi = M.clone().requires_grad_()
    Mt = M.clone().requires_grad_()
    gi = torch.autograd.grad((sinkhorn(Mi, r, c, gamma=1.0) * W).sum(), Mi)[0]
    gt = torch.autograd.grad((sinkhorn(Mt, r, c, gamma=1.0, backward="truncated", truncate=30) * W).sum(), Mt)[0]
    g1 = torch.autograd.grad((sinkhorn(Mt, r, c, gamma=1.0, backward="truncated", truncate=1) * W).sum(), Mt)[0]
    assert torch.allclose(gi, gt, atol=1e-8)
    assert (g1 - gi).abs().max() > (gt - gi).abs().max()  # more iterations, closer to the exact gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    M, r, c = problem(2, 3, 3, dtype=dtype)
    M.requires_grad_()
    P = Sinkhorn(gamma=2.0)(M, r, c)
    assert P.dtype == dtype
    P.sum().backward()
    assert M.grad.dtype == dtype and torch.isfinite(M.grad).all()


def test_non_convergence_names_elements():
    M, r, c = problem(3, 6, 6)
    M[1] = 50 * torch.rand(6, 6, dtype=D, generator=torch.Generator().manual_seed(3))
    with pytest.warns(ConvergenceWarning, match=r"elements \[1\];"):
        sinkhorn(M, r, c, gamma=1.0, max_iter=30)
    with pytest.raises(DDNError, match=r"did not converge.*elements \[1\];"):
        sinkhorn(M, r, c, gamma=1.0, max_iter=30, on_failure="raise")


def test_bad_input():
    M, r, c = problem(2, 3, 4)
    with pytest.raises(DDNError, match="M must have shape"):
        sinkhorn(M[None])
    with pytest.raises(DDNError, match="r must have 3"):
        sinkhorn(M, r[:, :2].softmax(1), c)
    with pytest.raises(DDNError, match="batch size"):
        sinkhorn(M, r[:1], c)
    Mn = M.clone()
    Mn[1, 0, 0] = float("inf")
    with pytest.raises(DDNError, match=r"M contains NaN or Inf at batch elements \[1\]"):
        sinkhorn(Mn, r, c)
    with pytest.raises(DDNError, match=r"sum\(r\) must equal sum\(c\).*\[0\]"):
        sinkhorn(M, torch.stack([2 * r[0], r[1]]), c)
    r0 = r.clone()
    r0[1, 0] = 0
    with pytest.raises(DDNError, match=r"strictly positive.*\[1\]"):
        sinkhorn(M, r0, c)
    with pytest.raises(DDNError, match="gamma"):
        sinkhorn(M, gamma=0.0)
    with pytest.raises(DDNError, match="backward"):
        sinkhorn(M, backward="unrolled")


def test_matches_generic_core_node():
    import torchddn as ddn

    m, n, gamma = 3, 4, 2.0

    class EntropicOT(ddn.EqConstDeclarativeNode):
        """min_P <P, M> + (1/gamma) sum P (log P - 1)  s.t.  P 1 = r, (P^T 1 = c) without its redundant last row."""

        def __init__(self):
            super().__init__(backward="dense")

        def objective(self, M, r, c, y):
            P = y.reshape(-1, m, n)
            return (P * M).sum((1, 2)) + (P * (P.log() - 1)).sum((1, 2)) / gamma

        def equality_constraints(self, M, r, c, y):
            P = y.reshape(-1, m, n)
            return torch.cat([P.sum(2) - r, (P.sum(1) - c)[:, :-1]], 1)

        def solve(self, M, r, c):
            return sinkhorn(M.detach(), r.detach(), c.detach(), gamma=gamma).reshape(-1, m * n), None

    M, r, c = problem(2, m, n, seed=4)
    W = torch.randn(2, m, n, dtype=D, generator=torch.Generator().manual_seed(6))
    args = [t.clone().requires_grad_() for t in (M, r, c)]
    ref_args = [t.clone().requires_grad_() for t in (M, r, c)]
    g = torch.autograd.grad((sinkhorn(*args, gamma=gamma) * W).sum(), args)
    P_ref = ddn.DeclarativeLayer(EntropicOT())(*ref_args).reshape(-1, m, n)
    g_ref = torch.autograd.grad((P_ref * W).sum(), ref_args)
    assert torch.allclose(g[0], g_ref[0], atol=1e-10)
    # the core fixes the last column multiplier; compare the parts seen by mass-preserving perturbations
    for a, b in zip(tangent(g[1], g[2]), tangent(g_ref[1], g_ref[2])):
        assert torch.allclose(a, b, atol=1e-10)
