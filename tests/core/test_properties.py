"""Property-based tests: random convex QPs written as declarative nodes vs the exact active-set KKT gradient."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchddn as ddn

D = torch.float64


class QP(ddn.IneqConstDeclarativeNode):
    """min_z 1/2 z^T Q z + p^T z  s.t.  G z <= h  (Q, G fixed on the node; p, h inputs)."""

    def __init__(self, Q, G, **kw):
        super().__init__(**kw)
        self.Q, self.G = Q, G

    def objective(self, p, h, y):
        return 0.5 * ((y @ self.Q) * y).sum(-1) + (p * y).sum(-1)

    def inequality_constraints(self, p, h, y):
        return y @ self.G.T - h

    def initial_guess(self, p, h):
        return torch.zeros_like(p)


def random_qp(seed, n, q, b):
    """A batch of QPs with known solutions and mixed active sets (strictly complementary)."""
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(n, n, generator=g, dtype=D)
    Q = L @ L.T + 0.5 * torch.eye(n, dtype=D)
    G = torch.randn(q, n, generator=g, dtype=D)
    z = torch.randn(b, n, generator=g, dtype=D)
    active = torch.rand(b, q, generator=g) < 0.5
    active[:, n:] = False  # at most n active constraints keeps them independent
    lam = torch.where(active, torch.rand(b, q, generator=g, dtype=D) + 0.5, torch.zeros(b, q, dtype=D))
    slack = torch.where(active, torch.zeros(b, q, dtype=D), torch.rand(b, q, generator=g, dtype=D) + 0.5)
    h = z @ G.T + slack
    p = -(z @ Q) - lam @ G
    return Q, G, p, h, z, active


def kkt_gradient(Q, G, z, active, v):
    """p_bar, h_bar from the active-set KKT system [[Q, G_A^T], [G_A, 0]] [u; w] = [v; 0]."""
    b, n = z.shape
    q = G.shape[0]
    m = active.to(D)
    K = torch.zeros(b, n + q, n + q, dtype=D)
    K[:, :n, :n] = Q
    K[:, :n, n:] = G.T * m[:, None, :]
    K[:, n:, :n] = G * m[:, :, None]
    K[:, n:, n:] = torch.diag_embed(1 - m)
    sol = torch.linalg.solve(K, torch.cat([v, torch.zeros(b, q, dtype=D)], -1))
    return -sol[:, :n], sol[:, n:] * m


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 6), q=st.integers(1, 8),
       mode=st.sampled_from(["dense", "minres", "cg"]))
def test_random_qp_gradient_matches_kkt(seed, n, q, mode):
    b = 4
    Q, G, p, h, z, active = random_qp(seed, n, q, b)
    v = torch.randn(b, n, dtype=D, generator=torch.Generator().manual_seed(seed + 1))
    node = QP(Q, G, backward=mode)
    with torch.no_grad():
        gp, gh = node.gradient(p, h, y=z, v=v)
    gp_ref, gh_ref = kkt_gradient(Q, G, z, active, v)
    torch.testing.assert_close(gp, gp_ref, atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(gh, gh_ref, atol=1e-8, rtol=1e-7)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(2, 5), q=st.integers(1, 6))
def test_random_qp_builtin_solver_and_layer(seed, n, q):
    """The default inequality solver finds the known solution and the layer's gradient is the KKT one."""
    b = 3
    Q, G, p, h, z, active = random_qp(seed, n, q, b)
    layer = ddn.DeclarativeLayer(QP(Q, G))
    pg = p.clone().requires_grad_(True)
    hg = h.clone().requires_grad_(True)
    y = layer(pg, hg)
    torch.testing.assert_close(y, z, atol=1e-7, rtol=1e-7)
    v = torch.randn(b, n, dtype=D)
    gp, gh = torch.autograd.grad((y * v).sum(), (pg, hg))
    gp_ref, gh_ref = kkt_gradient(Q, G, z, active, v)
    torch.testing.assert_close(gp, gp_ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gh, gh_ref, atol=1e-6, rtol=1e-6)
