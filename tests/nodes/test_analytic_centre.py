"""Tests of the analytic centre node: closed forms, scipy, gradcheck, finite differences of re-solves, the generic
core node and bad inputs."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from torchddn.diagnostics import DDNError
from torchddn.nodes.analytic_centre import AnalyticCentre, analytic_centre

D = torch.float64


def random_polytope(B, n, m, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(n, dtype=dtype)
    G = torch.randn(B, m - 2 * n, n, generator=g, dtype=dtype)
    G = torch.cat([G, torch.cat([eye, -eye]).expand(B, 2 * n, n)], 1)  # a box keeps the polytope bounded
    h = torch.rand(B, m, generator=g, dtype=dtype) + 0.5  # 0 is interior
    return G, h


def test_box_closed_form():
    # Box lo <= y <= hi: the centre is the midpoint; d y / d hi = d y / d lo = 1/2.
    lo = torch.tensor([[-1.0, 2.0], [0.5, -3.0]], dtype=D, requires_grad=True)
    hi = torch.tensor([[3.0, 5.0], [1.5, 1.0]], dtype=D, requires_grad=True)
    eye = torch.eye(2, dtype=D)
    G = torch.cat([eye, -eye]).expand(2, 4, 2)
    h = torch.cat([hi, -lo], -1)  # y_0 = +/-... shifted box: not interior at 0 for element 0 -> phase 1
    y = analytic_centre(G, h)
    assert torch.allclose(y, 0.5 * (lo + hi), atol=1e-10)
    y.sum().backward()
    assert torch.allclose(hi.grad, torch.full_like(hi, 0.5)) and torch.allclose(lo.grad, torch.full_like(lo, 0.5))


def test_matches_scipy_and_gradcheck():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    G, h = random_polytope(3, 3, 9, seed=1)
    y = analytic_centre(G, h)
    for i in range(3):
        Gi, hi = G[i].numpy(), h[i].numpy()
        f = lambda u: -np.sum(np.log(np.maximum(hi - Gi @ u, 1e-300)))
        jac = lambda u: Gi.T @ (1.0 / (hi - Gi @ u))
        ref = scipy_optimize.minimize(f, np.zeros(3), jac=jac, method="BFGS", options={"gtol": 1e-12}).x
        assert np.allclose(y[i].numpy(), ref, atol=1e-6)
    args = (G.clone().requires_grad_(), h.clone().requires_grad_())
    assert torch.autograd.gradcheck(lambda G, h: analytic_centre(G, h), args)


def test_gradient_matches_finite_differences_of_resolves():
    G, h = random_polytope(1, 2, 6, seed=2)
    w = torch.tensor([[0.3, -1.2]], dtype=D)
    Gr, hr = G.clone().requires_grad_(), h.clone().requires_grad_()
    (analytic_centre(Gr, hr) * w).sum().backward()
    eps = 1e-6
    for j in range(6):
        e = torch.zeros_like(h)
        e[0, j] = eps
        fd = ((analytic_centre(G, h + e) - analytic_centre(G, h - e)) * w).sum() / (2 * eps)
        assert abs(float(fd - hr.grad[0, j])) < 1e-7


def test_shared_G_float32_module():
    G, h = random_polytope(1, 2, 7, seed=3)
    hb = h.expand(4, 7) + 0.1 * torch.arange(4, dtype=D)[:, None]
    Gs = G[0].clone().requires_grad_()
    y = analytic_centre(Gs, hb)
    y.sum().backward()
    assert Gs.grad.shape == (7, 2)
    ref = sum(torch.autograd.grad(analytic_centre(Gs, hb[i]).sum(), Gs)[0] for i in range(4))
    assert torch.allclose(Gs.grad, ref, atol=1e-10)  # broadcast gradients are summed
    layer = AnalyticCentre()
    y32 = layer(G.float(), hb.float())
    assert y32.dtype == torch.float32 and torch.allclose(y32.double(), y.detach(), atol=1e-4)
    assert layer.diagnostics.converged.all()


def test_matches_generic_core_node():
    ddn = pytest.importorskip("torchddn")
    if not hasattr(ddn, "DeclarativeNode"):
        pytest.skip("core nodes unavailable")

    class Centre(ddn.DeclarativeNode):
        def initial_guess(self, G, h):
            return G.new_zeros(G.shape[0], G.shape[-1])

        def objective(self, G, h, y):
            return -torch.log(h - (G @ y.unsqueeze(-1)).squeeze(-1)).sum(-1)

        def solve(self, G, h):
            return analytic_centre(G.detach(), h.detach()), None

    G, h = random_polytope(3, 3, 8, seed=4)
    w = torch.randn(3, 3, generator=torch.Generator().manual_seed(0), dtype=D)
    a = [G.clone().requires_grad_(), h.clone().requires_grad_()]
    c = [G.clone().requires_grad_(), h.clone().requires_grad_()]
    (analytic_centre(*a) * w).sum().backward()
    (ddn.DeclarativeLayer(Centre())(*c) * w).sum().backward()
    for x, y in zip(a, c):
        assert torch.allclose(x.grad, y.grad, atol=1e-8)


def test_bad_inputs():
    G, h = random_polytope(2, 2, 5, seed=5)
    with pytest.raises(DDNError, match="h must have shape"):
        analytic_centre(G, h[:, :4])
    with pytest.raises(DDNError, match="more than 2 constraints"):
        analytic_centre(G[:, :2], h[:, :2])
    bad = h.clone()
    bad[1, 0] = math.nan
    with pytest.raises(DDNError, match=r"h contains NaN or Inf at batch elements \[1\]"):
        analytic_centre(G, bad)
    # Empty interior in element 1: y_0 <= -1 and -y_0 <= -1.
    Ge, he = G.clone(), h.clone()
    Ge[1, :2] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    he[1, :2] = -1.0
    with pytest.raises(DDNError, match=r"empty interior at batch elements \[1\]"):
        analytic_centre(Ge, he)
    # Unbounded in element 0: every constraint has a non-positive first coefficient, so y_0 -> +inf is feasible.
    Gu = G.clone()
    Gu[0, :, 0] = -Gu[0, :, 0].abs()
    Gu[0, :, 0][Gu[0, :, 0] == 0] = -1.0
    with pytest.raises(DDNError, match=r"unbounded .* at batch elements \[0\]"):
        analytic_centre(Gu, h)
