"""Declarative attention: the softmax special case vs torch.softmax, the capped simplex vs scipy and an explicit
active-set formula, gradcheck, masks, the module, and bad input."""
from __future__ import annotations


import numpy as np
import pytest
import torch
from torch.autograd import gradcheck

from torchddn.diagnostics import DDNError, InfeasibleError
from torchddn.nodes.attention import DeclarativeAttention, declarative_attention, entropic_simplex_weights

scipy_optimize = pytest.importorskip("scipy.optimize")

D = torch.float64


def scores(b=3, n=6, seed=0, scale=2.0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, n, generator=g, dtype=dtype)


def qkv(b=2, lq=3, lk=5, d=4, dv=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, lq, d, generator=g, dtype=D), torch.randn(b, lk, d, generator=g, dtype=D),
            torch.randn(b, lk, dv, generator=g, dtype=D))


def scipy_capped(s: np.ndarray, tau: float, cap: float) -> np.ndarray:
    n = len(s)
    f = lambda w: -(w @ s) + tau * np.sum(w * np.log(np.maximum(w, 1e-300)))  # noqa: E731
    jac = lambda w: -s + tau * (np.log(np.maximum(w, 1e-300)) + 1)  # noqa: E731
    res = scipy_optimize.minimize(f, np.full(n, 1.0 / n), jac=jac, method="SLSQP", bounds=[(1e-15, cap)] * n,
                                  constraints=[{"type": "eq", "fun": lambda w: w.sum() - 1,
                                                "jac": lambda w: np.ones_like(w)}],
                                  options={"ftol": 1e-15, "maxiter": 1000})
    return res.x


@pytest.mark.parametrize("tau", [0.3, 1.0])
def test_softmax_special_case_matches_torch_softmax_autograd(tau):
    s1, s2 = scores().requires_grad_(), scores().requires_grad_()
    w = entropic_simplex_weights(s1, tau)
    w_ref = torch.softmax(s2 / tau, -1)
    assert torch.allclose(w, w_ref, atol=1e-14)
    v = torch.randn_like(w)
    g = torch.autograd.grad((w * v).sum(), s1)[0]
    g_ref = torch.autograd.grad((w_ref * v).sum(), s2)[0]
    assert torch.allclose(g, g_ref, atol=1e-13)
    # and the full attention with cap=None, tau=1 is standard scaled dot-product attention
    q, k, val = qkv()
    out = declarative_attention(q, k, val)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, val)
    assert torch.allclose(out, ref, atol=1e-12)


@pytest.mark.parametrize("cap", [0.2, 0.3, 0.5])
def test_capped_forward_matches_scipy(cap):
    s = scores(3, 6, seed=1)
    w = entropic_simplex_weights(s, 0.7, cap)
    assert torch.allclose(w.sum(-1), torch.ones(3, dtype=D), atol=1e-12)
    assert (w <= cap + 1e-15).all() and (w >= 0).all()
    for i in range(3):
        assert np.abs(scipy_capped(s[i].numpy(), 0.7, cap) - w[i].numpy()).max() < 1e-6
    assert (w == cap).any()  # the cap is active somewhere: not the softmax


def test_capped_gradient_matches_explicit_active_set_formula():
    # given the saturated set S: w_S = u and w_F = (1 - |S| u) softmax(s_F / tau); differentiate that by autograd
    s = scores(4, 7, seed=2)
    tau, cap = 0.5, 0.25
    s1 = s.clone().requires_grad_()
    w = entropic_simplex_weights(s1, tau, cap)
    sat = (w == cap).detach()
    assert sat.any(1).all() and (~sat).any(1).all()
    s2 = s.clone().requires_grad_()
    z = (s2 / tau).masked_fill(sat, float("-inf"))
    w_ref = torch.where(sat, torch.full_like(s2, cap), (1 - cap * sat.sum(1, keepdim=True)) * torch.softmax(z, -1))
    assert torch.allclose(w, w_ref, atol=1e-14)
    v = torch.randn_like(w)
    g = torch.autograd.grad((w * v).sum(), s1)[0]
    g_ref = torch.autograd.grad((w_ref * v).sum(), s2)[0]
    assert torch.allclose(g, g_ref, atol=1e-13)


@pytest.mark.parametrize("cap", [None, 0.3])
def test_gradcheck(cap):
    s = scores(3, 6, seed=3).requires_grad_()
    assert gradcheck(lambda s: entropic_simplex_weights(s, 0.6, cap), (s,))
    q, k, v = (t.requires_grad_() for t in qkv(b=1, lq=2, lk=4, d=2, dv=2, seed=4))
    assert gradcheck(lambda q, k, v: declarative_attention(q, k, v, tau=0.8, cap=cap), (q, k, v))


def test_mask_and_mixed_rows():
    q, k, v = qkv(seed=5)
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, 0] = False
    out, w = declarative_attention(q, k, v, cap=0.6, mask=mask, return_weights=True)
    assert (w[:, 0, 3:] == 0).all() and (w[:, 2, 0] == 0).all()
    assert torch.allclose(w.sum(-1), torch.ones(2, 3, dtype=D), atol=1e-12)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    assert gradcheck(lambda q, k, v: declarative_attention(q, k, v, cap=0.6, mask=mask), (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module(dtype):
    torch.manual_seed(0)
    mod = DeclarativeAttention(8, tau=1.0, cap=0.3).to(dtype)
    x = torch.randn(2, 5, 8, dtype=dtype)
    out, w = mod(x, x, x, return_weights=True)
    assert out.shape == (2, 5, 8) and out.dtype == dtype
    assert (w <= 0.3 + 1e-6).all()
    out.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in mod.parameters())
    assert "cap=0.3" in repr(mod)


def test_bad_input():
    q, k, v = qkv()
    with pytest.raises(DDNError, match="incompatible shapes"):
        declarative_attention(q, k[:, :, :3], v)
    qn = q.clone()
    qn[1, 0, 0] = float("nan")
    with pytest.raises(DDNError, match=r"query contains NaN or Inf at batch elements \[1\]"):
        declarative_attention(qn, k, v)
    with pytest.raises(InfeasibleError, match=r"cap=0.1 is infeasible.*\[0, 1\]"):
        declarative_attention(q, k, v, cap=0.1)  # 5 keys * 0.1 < 1
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[1] = False
    with pytest.raises(DDNError, match="no key"):
        declarative_attention(q, k, v, mask=mask)
    with pytest.raises(DDNError, match="tau"):
        declarative_attention(q, k, v, tau=0.0)
    with pytest.raises(DDNError, match="mask must have shape"):
        declarative_attention(q, k, v, mask=torch.ones(4, 5, dtype=torch.bool))


def test_capped_weights_match_generic_core_node():
    import torchddn as ddn

    tau, cap = 0.5, 0.25

    class Capped(ddn.IneqConstDeclarativeNode):
        """min_w -<w, s> + tau sum w log w  s.t.  sum w = 1, w <= cap; solve() returns our forward."""

        def __init__(self):
            super().__init__(backward="dense")

        def objective(self, s, y):
            return -(y * s).sum(-1) + tau * (y * y.log()).sum(-1)

        def equality_constraints(self, s, y):
            return y.sum(-1) - 1

        def inequality_constraints(self, s, y):
            return y - cap

        def solve(self, s):
            return entropic_simplex_weights(s.detach(), tau, cap), None

    s = scores(4, 7, seed=2)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    w = entropic_simplex_weights(s1, tau, cap)
    assert (w == cap).any()
    w_ref = ddn.DeclarativeLayer(Capped())(s2)
    v = torch.randn(4, 7, dtype=D, generator=torch.Generator().manual_seed(3))
    g = torch.autograd.grad((w * v).sum(), s1)[0]
    g_ref = torch.autograd.grad((w_ref * v).sum(), s2)[0]
    assert torch.allclose(g, g_ref, atol=1e-10)
