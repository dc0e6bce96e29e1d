"""Tests of the QP layer: scipy solutions, exact active-set KKT gradients, gradcheck, the generic core node,
property-based random convex QPs and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from torchddn.diagnostics import DDNError, Diagnostics, InfeasibleError, NonRegularWarning
from torchddn.nodes.qp import QPLayer, qp

scipy_optimize = pytest.importorskip("scipy.optimize")

D = torch.float64


def random_qp(B, n, m, k=0, seed=0, psd_rank=None, dtype=D):
    """Random strictly feasible convex QP (feasible point z0 with slack drawn so some constraints are active)."""
    g = torch.Generator().manual_seed(seed)
    r = n if psd_rank is None else psd_rank
    L = torch.randn(B, n, r, generator=g, dtype=dtype)
    Q = L @ L.mT / r + 0.1 * torch.eye(n, dtype=dtype)
    p = torch.randn(B, n, generator=g, dtype=dtype)
    G = torch.randn(B, m, n, generator=g, dtype=dtype)
    z0 = torch.randn(B, n, generator=g, dtype=dtype)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=dtype)
    A = torch.randn(B, k, n, generator=g, dtype=dtype) if k else None
    b = (A @ z0.unsqueeze(-1)).squeeze(-1) if k else None
    return Q, p, G, h, A, b


def scipy_qp(Q, p, G, h, A=None, b=None):
    """Reference solution by scipy SLSQP (one element, numpy)."""
    Q, p, G, h = (t.detach().numpy() for t in (Q, p, G, h))
    cons = [{"type": "ineq", "fun": lambda z: h - G @ z, "jac": lambda z: -G}]
    if A is not None:
        A, b = A.detach().numpy(), b.detach().numpy()
        cons.append({"type": "eq", "fun": lambda z: A @ z - b, "jac": lambda z: A})
    res = scipy_optimize.minimize(lambda z: 0.5 * z @ Q @ z + p @ z, np.zeros(len(p)), jac=lambda z: Q @ z + p,
                                  constraints=cons, method="SLSQP", options={"ftol": 1e-14, "maxiter": 500})
    assert res.status in (0, 8), res.message  # 8: no further descent possible at the optimum
    return torch.from_numpy(res.x)


def active_set_solution(Q, p, G, h, A, b, active):
    """z of the equality-constrained QP on the active set, as a differentiable function of all data (one element).

    Solving the active-set KKT system with torch.linalg.lstsq (minimum norm for redundant constraints) and
    differentiating it by autograd gives the exact active-set gradient, independently of the layer."""
    n = Q.shape[-1]
    Ga, ha = G[active], h[active]
    rows = [Ga] + ([A] if A is not None else [])
    rhs = [ha] + ([b] if A is not None else [])
    C = torch.cat(rows, 0)
    c = torch.cat(rhs, 0)
    K = torch.cat([torch.cat([0.5 * (Q + Q.mT), C.mT], 1), torch.cat([C, C.new_zeros(C.shape[0], C.shape[0])], 1)], 0)
    r = torch.cat([-p, c])
    sol = torch.linalg.pinv(K, hermitian=True) @ r
    return sol[:n]


def grads_of(fn, inputs, w):
    inputs = [t.detach().clone().requires_grad_(True) if t is not None else None for t in inputs]
    z = fn(*inputs)
    z.backward(w)
    return z.detach(), [t.grad if t is not None else None for t in inputs]


@pytest.mark.parametrize("k", [0, 2])
def test_matches_scipy_and_active_set_gradient(k):
    B, n, m = 4, 6, 8
    Q, p, G, h, A, b = random_qp(B, n, m, k, seed=1)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(5), dtype=D)
    z, gr = grads_of(lambda *a: qp(*a), (Q, p, G, h, A, b), w)
    for i in range(B):
        ref = scipy_qp(Q[i], p[i], G[i], h[i], None if A is None else A[i], None if b is None else b[i])
        assert torch.allclose(z[i], ref, atol=1e-6), (z[i] - ref).abs().max()
        active = (G[i] @ z[i] - h[i]).abs() < 1e-7
        assert 0 < int(active.sum()) < m  # a mixed case: some active, some inactive
        args = (Q[i], p[i], G[i], h[i], None if A is None else A[i], None if b is None else b[i])
        zr, gref = grads_of(lambda *a: active_set_solution(*a, active), args, w[i])
        assert torch.allclose(z[i], zr, atol=1e-9)
        for got, exp in zip(gr, gref):
            if exp is not None:
                assert torch.allclose(got[i], exp, atol=1e-6, rtol=1e-6), (got[i] - exp).abs().max()


def test_multipliers_and_kkt():
    Q, p, G, h, A, b = random_qp(3, 5, 7, 2, seed=2)
    dg = Diagnostics()
    z, lam, nu = qp(Q, p, G, h, A, b, return_multipliers=True, diagnostics=dg)
    assert (lam >= 0).all()
    stat = (Q @ z.unsqueeze(-1)).squeeze(-1) + p + (G.mT @ lam.unsqueeze(-1)).squeeze(-1) \
        + (A.mT @ nu.unsqueeze(-1)).squeeze(-1)
    assert stat.abs().max() < 1e-9
    slack = h - (G @ z.unsqueeze(-1)).squeeze(-1)
    assert slack.min() > -1e-10 and (lam * slack).abs().max() < 1e-9
    assert dg.converged.all() and dg.residual.max() < 1e-9


def test_redundant_constraints_gradient():
    # Each constraint duplicated: the active-set KKT matrix is singular, z and its gradient are still unique.
    Q, p, G, h, _, _ = random_qp(2, 4, 5, seed=3)
    G2, h2 = torch.cat([G, G], 1), torch.cat([h, h], 1)
    w = torch.randn(2, 4, generator=torch.Generator().manual_seed(6), dtype=D)
    z, gr = grads_of(lambda *a: qp(*a), (Q, p, G2, h2), w)
    z1, gr1 = grads_of(lambda *a: qp(*a), (Q, p, G, h), w)
    assert torch.allclose(z, z1, atol=1e-9)
    assert torch.allclose(gr[0], gr1[0], atol=1e-6) and torch.allclose(gr[1], gr1[1], atol=1e-6)
    # The two copies share the sensitivity of the single constraint.
    assert torch.allclose(gr[3][:, :5] + gr[3][:, 5:], gr1[3], atol=1e-6)
    assert torch.allclose(gr[2][:, :5] + gr[2][:, 5:], gr1[2], atol=1e-6)
    for i in range(2):
        active = (G2[i] @ z[i] - h2[i]).abs() < 1e-7
        _, gref = grads_of(lambda *a: active_set_solution(*a, None, None, active), (Q[i], p[i], G2[i], h2[i]), w[i])
        assert torch.allclose(gr[0][i], gref[0], atol=1e-6) and torch.allclose(gr[1][i], gref[1], atol=1e-6)


def test_weakly_active_constraint_warns():
    # min 1/2 |z|^2 - z_0 subject to z_0 <= 1: the unconstrained minimiser z_0 = 1 touches the bound.
    Q = torch.eye(2, dtype=D)
    p = torch.tensor([-1.0, 0.0], dtype=D, requires_grad=True)
    G = torch.tensor([[1.0, 0.0]], dtype=D)
    h = torch.tensor([1.0], dtype=D)
    z = qp(Q, p, G, h)
    assert torch.allclose(z, torch.tensor([1.0, 0.0], dtype=D), atol=1e-6)
    with pytest.warns(NonRegularWarning, match="weakly active"):
        z.sum().backward()
    assert torch.isfinite(p.grad).all()
    # The one-sided derivatives are -1 (inactive) and 0 (active); the central path's lies between.
    assert -1 - 1e-9 <= p.grad[0] <= 1e-9 and torch.allclose(p.grad[1], torch.tensor(-1.0, dtype=D))


def test_gradcheck():
    Q, p, G, h, A, b = random_qp(2, 3, 4, 1, seed=4)
    L = torch.randn(2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=D)

    def fn(L, p, G, h, A, b):
        Q = L @ L.mT + 0.5 * torch.eye(3, dtype=D)
        z, lam, nu = qp(Q, p, G, h, A, b, return_multipliers=True, tol=1e-13)
        return z, lam, nu

    args = tuple(t.clone().requires_grad_() for t in (L, p, G, h, A, b))
    assert torch.autograd.gradcheck(fn, args, atol=1e-5, rtol=1e-4)


def test_broadcast_gradients_are_summed():
    Q, p, G, h, _, _ = random_qp(3, 4, 5, seed=7)
    Qs, Gs, hs = Q[0], G[0], h[0]
    _, g_shared = grads_of(lambda Q, p, G, h: qp(Q, p, G, h), (Qs, p, Gs, hs),
                           torch.ones(3, 4, dtype=D))
    _, g_full = grads_of(lambda Q, p, G, h: qp(Q, p, G, h), (Qs.expand(3, 4, 4), p, Gs.expand(3, 5, 4),
                                                            hs.expand(3, 5)), torch.ones(3, 4, dtype=D))
    assert g_shared[0].shape == (4, 4) and g_shared[2].shape == (5, 4) and g_shared[3].shape == (5,)
    assert torch.allclose(g_shared[0], g_full[0].sum(0)) and torch.allclose(g_shared[2], g_full[2].sum(0))
    assert torch.allclose(g_shared[3], g_full[3].sum(0))
    z = qp(Qs, p[0], Gs, hs)
    assert z.shape == (4,)


def test_float32_and_module():
    Q, p, G, h, A, b = random_qp(3, 5, 6, 1, seed=8, dtype=torch.float32)
    layer = QPLayer()
    z = layer(Q, p, G, h, A, b)
    z64 = qp(*(t.double() for t in (Q, p, G, h, A, b)))
    assert z.dtype == torch.float32 and torch.allclose(z.double(), z64, atol=1e-3)
    assert layer.diagnostics.converged.all()


def test_mixed_batch_lp_like():
    # A nearly-LP element (tiny Q) next to a well-conditioned element in one batch.
    Q, p, G, h, _, _ = random_qp(2, 3, 8, seed=9)
    Q = Q.clone()
    Q[0] = 1e-4 * torch.eye(3, dtype=D)
    G[0] = torch.cat([torch.eye(3, dtype=D), -torch.eye(3, dtype=D), torch.ones(2, 3, dtype=D)])
    h[0] = torch.ones(8, dtype=D)
    z = qp(Q, p, G, h)
    for i in range(2):
        assert torch.allclose(z[i], scipy_qp(Q[i], p[i], G[i], h[i]), atol=1e-6)


def test_matches_generic_core_node():
    ddn = pytest.importorskip("torchddn")
    if not hasattr(ddn, "IneqConstDeclarativeNode"):
        pytest.skip("core nodes unavailable")
    Q, p, G, h, _, _ = random_qp(3, 4, 6, seed=10)

    class QPNode(ddn.IneqConstDeclarativeNode):
        def initial_guess(self, Q, p, G, h):
            return p.new_zeros(p.shape)

        def objective(self, Q, p, G, h, y):
            return 0.5 * (y.unsqueeze(-2) @ Q @ y.unsqueeze(-1)).reshape(-1) + (p * y).sum(-1)

        def inequality_constraints(self, Q, p, G, h, y):
            return (G @ y.unsqueeze(-1)).squeeze(-1) - h

        def solve(self, Q, p, G, h):
            z, lam, _ = qp(Q.detach(), p.detach(), G.detach(), h.detach(), return_multipliers=True)
            return z, {"nu": -lam}

    w = torch.randn(3, 4, generator=torch.Generator().manual_seed(11), dtype=D)
    layer = ddn.DeclarativeLayer(QPNode())
    _, g_core = grads_of(lambda *a: layer(*a), (Q, p, G, h), w)
    _, g_ours = grads_of(lambda *a: qp(*a), (Q, p, G, h), w)
    for a, c in zip(g_ours[1:], g_core[1:]):
        assert torch.allclose(a, c, atol=1e-6), (a - c).abs().max()
    # Q enters the objective unsymmetrised in the core node: compare the symmetric parts.
    sym = lambda M: 0.5 * (M + M.mT)
    assert torch.allclose(sym(g_ours[0]), sym(g_core[0]), atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5), m=st.integers(1, 8), k=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_property_random_convex_qps(n, m, k, seed):
    k = min(k, n)
    Q, p, G, h, A, b = random_qp(2, n, m, k, seed=seed, psd_rank=max(n - 1, 1))
    z, lam, nu = qp(Q, p, G, h, A, b, return_multipliers=True)
    slack = h - (G @ z.unsqueeze(-1)).squeeze(-1)
    assert slack.min() > -1e-8 and lam.min() >= 0
    stat = (Q @ z.unsqueeze(-1)).squeeze(-1) + p + (G.mT @ lam.unsqueeze(-1)).squeeze(-1)
    if k:
        stat = stat + (A.mT @ nu.unsqueeze(-1)).squeeze(-1)
        assert ((A @ z.unsqueeze(-1)).squeeze(-1) - b).abs().max() < 1e-8
    assert stat.abs().max() < 1e-7 and (lam * slack).abs().max() < 1e-8
    # The objective is no worse than scipy's.
    for i in range(2):
        ref = scipy_qp(Q[i], p[i], G[i], h[i], None if A is None else A[i], None if b is None else b[i])
        f = lambda x: 0.5 * x @ Q[i] @ x + p[i] @ x
        assert f(z[i]) <= f(ref) + 1e-7


def test_infeasible_names_elements():
    Q, p, G, h, _, _ = random_qp(3, 2, 2, seed=12)
    G = G.clone()
    h = h.clone()
    # Element 1: z_0 <= -1 and -z_0 <= -1 (z_0 >= 1).
    G[1] = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=D)
    h[1] = torch.tensor([-1.0, -1.0], dtype=D)
    with pytest.raises(InfeasibleError, match=r"\[1\]"):
        qp(Q, p, G, h)


def test_infeasible_equalities():
    Q = torch.eye(2, dtype=D)
    p = torch.zeros(2, 2, dtype=D)
    G = torch.tensor([[1.0, 1.0]], dtype=D)
    h = torch.tensor([1.0], dtype=D)
    A = torch.tensor([[1.0, 0.0]], dtype=D)
    b = torch.tensor([[0.0], [5.0]], dtype=D)  # element 1: z_0 = 5 and z_0 + z_1 <= 1, z_1 unbounded: feasible
    qp(Q, p, G, h, A, b)
    G2 = torch.tensor([[1.0, 0.0]], dtype=D)
    with pytest.raises(InfeasibleError, match=r"\[1\]"):
        qp(Q, p, G2, h, A, b)


def test_unbounded_or_singular_names_elements():
    Q = torch.zeros(2, 2, 2, dtype=D)
    Q[1] = torch.eye(2, dtype=D)
    p = torch.tensor([[-1.0, 0.0], [-1.0, 0.0]], dtype=D)
    G = torch.tensor([[0.0, 1.0]], dtype=D)
    h = torch.tensor([1.0], dtype=D)
    with pytest.raises(DDNError, match=r"batch elements \[0\]") as info:
        qp(Q, p, G, h)
    assert "unbounded below" in str(info.value) and not isinstance(info.value, InfeasibleError)


def test_equality_only_and_unconstrained():
    Q = torch.eye(3, dtype=D) * 2
    p = torch.randn(2, 3, generator=torch.Generator().manual_seed(14), dtype=D)
    A = torch.ones(1, 3, dtype=D)
    b = torch.ones(1, dtype=D)
    z = qp(Q, p, A=A, b=b)
    ref = -p / 2 + ((1 + p.sum(-1, keepdim=True) / 2) / 3)  # projection of -p/2 onto sum(z) = 1
    assert torch.allclose(z, ref, atol=1e-10)
    assert torch.allclose(qp(Q, p), -p / 2, atol=1e-12)


def test_bad_inputs():
    Q, p, G, h, A, b = random_qp(2, 3, 4, 1, seed=13)
    with pytest.raises(DDNError, match="p must have shape"):
        qp(Q, p[:, :2], G, h)
    with pytest.raises(DDNError, match="h must have shape"):
        qp(Q, p, G, h[:, :3])
    with pytest.raises(DDNError, match="Q must have shape"):
        qp(Q[:, :2], p, G, h)
    with pytest.raises(DDNError, match="batch sizes"):
        qp(Q, p[:1].expand(3, 3), G, h)
    with pytest.raises(DDNError, match="given together"):
        qp(Q, p, G, None)
    bad = p.clone()
    bad[1, 0] = float("nan")
    with pytest.raises(DDNError, match=r"p contains NaN or Inf at batch elements \[1\]"):
        qp(Q, bad, G, h)
    Qn = Q.clone()
    Qn[1] = -torch.eye(3, dtype=D)
    with pytest.raises(DDNError, match=r"positive semidefinite at batch elements \[1\]"):
        qp(Qn, p, G, h)
    Qa = Q.clone()
    Qa[0, 0, 1] += 1.0
    with pytest.raises(DDNError, match=r"symmetric at batch elements \[0\]"):
        qp(Qa, p, G, h)


def _dense_adjoint(Q, G, A, s, lam, gz, glam, gnu):
    """Reference for the backward's linear algebra: the unreduced adjoint system
    [[Q, -G^T, A^T], [G, diag(s / lam), 0], [A, 0, 0]] [w_z; u; w_nu] = [g_z; g_lam; g_nu], its middle rows scaled
    by min(1, lam / s), solved densely."""
    B, n = gz.shape
    m, k = glam.shape[-1], gnu.shape[-1]
    c = torch.minimum(lam / s, torch.ones_like(s))
    K = torch.zeros(B, n + m + k, n + m + k, dtype=gz.dtype)
    K[:, :n, :n] = Q
    K[:, :n, n:n + m] = -G.mT
    K[:, :n, n + m:] = A.mT
    K[:, n:n + m, :n] = c.unsqueeze(-1) * G
    K[:, n:n + m, n:n + m] = torch.diag_embed(c * s / lam)
    K[:, n + m:, :n] = A
    sol = torch.linalg.solve(K, torch.cat([gz, c * glam, gnu], -1))
    return sol[:, :n], sol[:, n:n + m], sol[:, n + m:]


@pytest.mark.parametrize("k,variant", [(0, "psd"), (2, "psd"), (0, "indefinite"), (0, "no_cap"), (2, "no_cap")])
def test_adjoint_solver_matches_dense_solve(k, variant, monkeypatch):
    # Complementary pairs from the end of an interior point run: active constraints with slack ~1e-12 and
    # inactive ones with multiplier ~1e-12, plus a moderate pair. With an indefinite Q the reduced matrix is not
    # positive definite (LU instead of Cholesky); with the cap on D at 1 the refinement cannot converge and the
    # solver must fall back to the LU factorisation of the unreduced matrix.
    import importlib

    from torchddn.nodes.qp import _adjoint

    qp_module = importlib.import_module("torchddn.nodes.qp")  # (torchddn.nodes.qp is also the function's name)

    fallbacks = []
    augmented = qp_module._augmented_kkt
    monkeypatch.setattr(qp_module, "_augmented_kkt", lambda *a: fallbacks.append(1) or augmented(*a))

    B, n, m = 3, 6, 8
    Q, _, G, _, A, _ = random_qp(B, n, m, k, seed=30)
    A = Q.new_zeros(B, 0, n) if A is None else A
    if variant == "indefinite":
        Q = Q - 20.0 * torch.eye(n, dtype=D)
    g = torch.Generator().manual_seed(31)
    small = 10 ** (-12 + 2 * torch.rand(B, m, generator=g, dtype=D))
    big = 0.5 + torch.rand(B, m, generator=g, dtype=D)
    active = torch.arange(m) % 2 == 0
    s = torch.where(active, small, big)
    lam = torch.where(active, big, small)
    s[:, -1], lam[:, -1] = 1e-3, 2e-3  # moderate
    gz, glam, gnu = (torch.randn(B, r, generator=g, dtype=D) for r in (n, m, k))
    M = torch.cat([Q, A, G], -2)
    mags = torch.stack([t.abs().reshape(B, -1).amax(-1) if t.numel() else Q.new_zeros(B) for t in (Q, G, A)], -1)
    if variant == "no_cap":  # D capped at 1: the capped matrix is then far from the true one
        monkeypatch.setattr(qp_module, "_cap", lambda qs, gs: torch.ones_like(qs))
    got = _adjoint(M, s, lam, gz, glam, gnu, mags)
    ref = _dense_adjoint(Q, G, A, s, lam, gz, glam, gnu)
    for a, r in zip(got, ref):
        if r.numel():
            assert torch.allclose(a, r, atol=1e-9 * float(r.abs().max()), rtol=1e-9), (a - r).abs().max()
    assert bool(fallbacks) == (variant == "no_cap")


def test_gradient_matches_active_set_larger_batch():
    # Sizes like the benchmark's, where most constraints end with a multiplier/slack ratio far beyond 1e6.
    B, n, m = 4, 30, 30
    Q, p, G, h, _, _ = random_qp(B, n, m, seed=32)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(33), dtype=D)
    z, gr = grads_of(lambda *a: qp(*a), (Q, p, G, h), w)
    for i in range(B):
        active = (G[i] @ z[i] - h[i]).abs() < 1e-7
        _, gref = grads_of(lambda *a: active_set_solution(*a, None, None, active), (Q[i], p[i], G[i], h[i]), w[i])
        scale = max(float(t.abs().max()) for t in gref)
        for got, exp in zip(gr, gref):
            assert (got[i] - exp).abs().max() <= 1e-7 * scale


def test_lp_like_gradient():
    # Q = 0: the reduced matrix comes only from the constraints (the cap on D is then 1).
    B, n = 3, 3
    _, p, _, _, _, _ = random_qp(B, n, 1, seed=34)
    Q = torch.zeros(B, n, n, dtype=D)
    G = torch.cat([torch.eye(n, dtype=D), -torch.eye(n, dtype=D)]).expand(B, 2 * n, n)
    h = torch.ones(B, 2 * n, dtype=D)
    w = torch.randn(B, n, generator=torch.Generator().manual_seed(35), dtype=D)
    z, gr = grads_of(lambda *a: qp(*a), (Q, p, G, h), w)
    assert torch.allclose(z, -torch.sign(p), atol=1e-8)  # the vertex opposite to p
    for i in range(B):
        active = (G[i] @ z[i] - h[i]).abs() < 1e-7
        _, gref = grads_of(lambda *a: active_set_solution(*a, None, None, active), (Q[i], p[i], G[i], h[i]), w[i])
        for got, exp in zip(gr, gref):
            assert torch.allclose(got[i], exp, atol=1e-8), (got[i] - exp).abs().max()


def test_tight_tolerance_converges():
    Q, p, G, h, A, b = random_qp(8, 20, 30, 3, seed=21)
    dg = Diagnostics()
    z, lam, nu = qp(Q, p, G, h, A, b, tol=1e-13, return_multipliers=True, diagnostics=dg, on_failure="raise")
    assert dg.converged.all()
    stat = (Q @ z.unsqueeze(-1)).squeeze(-1) + p + (G.mT @ lam.unsqueeze(-1)).squeeze(-1) \
        + (A.mT @ nu.unsqueeze(-1)).squeeze(-1)
    assert stat.abs().max() < 1e-11


def test_repeated_and_concurrent_calls_agree():
    # The solver reuses scratch memory across calls (per thread): results must not depend on other calls.
    import threading

    data = [random_qp(4, 6, 9, i % 2, seed=40 + i) for i in range(4)]
    ref = [qp(*d) for d in data]
    first = ref[0].clone()
    out = [None] * len(data)

    def work(i):
        for _ in range(3):
            out[i] = qp(*data[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(data))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(ref[0], first)
    for r, o in zip(ref, out):
        assert torch.allclose(r, o, atol=1e-12, rtol=0)


@pytest.mark.parametrize("k", [0, 2])
def test_backward_reuses_forward_factorisation(k, monkeypatch):
    # The backward preconditions its refinement with each element's last forward factorisation: on a batch with
    # strictly complementary solutions it factorises nothing, and its result equals that of a fresh factorisation
    # and the dense solve of the adjoint system. Elements whose stored factors are unusable (missing, or of a
    # different D) are solved again with a fresh factorisation of those elements only.
    import importlib

    qp_module = importlib.import_module("torchddn.nodes.qp")
    B, n, m = 6, 12, 10
    Q, p, G, h, A, b = random_qp(B, n, m, k, seed=40)
    Qb, Qs, pb, Gb, hb, Ab, bb, _ = qp_module._prepare(Q, p, G, h, A, b, True)
    z, s, lam, nu, conv, *_, mags, M, store = qp_module._ipm(Qs, pb, Gb, hb, Ab, bb, 1e-10, 100)
    assert bool(conv.all()) and bool(store[4].all())
    g = torch.Generator().manual_seed(41)
    gz, glam, gnu = (torch.randn(B, r, generator=g, dtype=D) for r in (n, m, k))
    sizes = []
    factor = qp_module._factor
    monkeypatch.setattr(qp_module, "_factor", lambda Q, *a, **kw: sizes.append(Q.shape[0]) or factor(Q, *a, **kw))
    reused = qp_module._adjoint(M, s, lam, gz, glam, gnu, mags, store)
    assert sizes == []
    fresh = qp_module._adjoint(M, s, lam, gz, glam, gnu, mags)
    assert sizes == [B]
    ref = _dense_adjoint(Q, G, Ab, s, lam, gz, glam, gnu)
    for a, f, r in zip(reused, fresh, ref):
        if r.numel():
            tol = 1e-9 * float(r.abs().max())
            assert torch.allclose(a, r, atol=tol, rtol=0) and torch.allclose(a, f, atol=tol, rtol=0)
    # Unusable stored factors for elements 1 and 4: missing, and formed with a very different D.
    kind, F, piv, dprev, have = store
    have, dprev, F = have.clone(), dprev.clone(), F.clone()
    have[1] = False
    F[1] = float("nan")
    dprev[4] = 1e-3 * dprev[4] + 1.0
    sizes.clear()
    mixed = qp_module._adjoint(M, s, lam, gz, glam, gnu, mags, (kind, F, piv, dprev, have))
    assert sizes == [2]
    for a, r in zip(mixed, ref):
        if r.numel():
            assert torch.allclose(a, r, atol=1e-9 * float(r.abs().max()), rtol=0)
