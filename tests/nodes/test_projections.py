"""Euclidean projections: exactness against independent references (bisection, brute force over faces),
gradients against gradcheck and the generic constrained core nodes, non-differentiable points, bad input."""
from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.autograd import gradcheck

import torchddn as ddn
from torchddn.diagnostics import DDNError, NonRegularWarning
from torchddn.nodes import EuclideanProjection, project
from torchddn.nodes.projections import KINDS

D = torch.float64
RADII = [0.3, 1.0, 4.0]


def simplex_ref(v: torch.Tensor, r: float) -> torch.Tensor:
    """Projection onto {u >= 0, sum u = r} by bisection on the threshold (independent of the sort-based one)."""
    lo = (v.amin(-1, keepdim=True) - r)
    hi = v.amax(-1, keepdim=True)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        s = (v - mid).clamp_min(0).sum(-1, keepdim=True)
        lo = torch.where(s > r, mid, lo)
        hi = torch.where(s > r, hi, mid)
    return (v - 0.5 * (lo + hi)).clamp_min(0)


def reference(x: torch.Tensor, kind: str, r: float) -> torch.Tensor:
    """Brute-force nearest points for small n: enumerate orthants / faces."""
    n = x.shape[-1]
    if kind == "simplex":
        return simplex_ref(x, r)
    if kind == "l2_ball":
        return x * (r / x.norm(dim=-1, keepdim=True)).clamp(max=1)
    if kind == "l2_sphere":
        return x * (r / x.norm(dim=-1, keepdim=True))
    if kind == "linf_ball":
        return x.clamp(-r, r)
    cands = []
    if kind in ("l1_ball", "l1_sphere"):
        for signs in itertools.product([-1.0, 1.0], repeat=n):
            sg = torch.tensor(signs, dtype=x.dtype)
            cands.append(sg * simplex_ref(sg * x, r))  # nearest point of the face in orthant sg
        if kind == "l1_ball":
            cands.append(torch.where(x.abs().sum(-1, keepdim=True) <= r, x, cands[0]))
    if kind == "linf_sphere":
        for k in range(n):
            for s in (-1.0, 1.0):
                c = x.clamp(-r, r).clone()
                c[:, k] = s * r
                cands.append(c)
    c = torch.stack(cands, 1)  # (b, C, n)
    dist = ((c - x[:, None]) ** 2).sum(-1)
    return c[torch.arange(x.shape[0]), dist.argmin(1)]


def data(b, n, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    return scale * torch.randn(b, n, generator=gen, dtype=D)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", RADII)
def test_forward_matches_reference(kind, r):
    x = torch.cat([data(8, 4, 1, 0.2), data(8, 4, 2, 3.0)])  # points inside and outside
    y = project(x, kind, r)
    ref = reference(x, kind, r)
    assert torch.allclose(((y - x) ** 2).sum(-1), ((ref - x) ** 2).sum(-1), atol=1e-10)
    assert torch.allclose(y, ref, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", RADII)
def test_gradcheck(kind, r):
    x = torch.cat([data(3, 5, 3, 0.15), data(3, 5, 4, 2.0)]).requires_grad_()
    rr = torch.full((6,), r, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, rr: project(x, kind, rr), (x, rr))


# ---- generic core nodes with the same objective and constraints ------------------------------------------------
class _Base:
    def objective(self, x, r, sg, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def solve(self, x, r, sg):
        return project(x, self.kind, r), None


class _Simplex(_Base, ddn.IneqConstDeclarativeNode):
    kind = "simplex"

    def equality_constraints(self, x, r, sg, y):
        return y.sum(-1) - r

    def inequality_constraints(self, x, r, sg, y):
        return -y


class _L1(_Base, ddn.IneqConstDeclarativeNode):
    """Locally, in the orthant sg of x: sg^T y <= r (or = r on the sphere) and sg_i y_i >= 0."""

    def __init__(self, kind):
        super().__init__(backward="dense")
        self.kind = kind

    def equality_constraints(self, x, r, sg, y):
        if self.kind == "l1_sphere":
            return (sg * y).sum(-1) - r
        return torch.zeros(y.shape[0], 0, dtype=y.dtype)

    def inequality_constraints(self, x, r, sg, y):
        g = -sg * y
        if self.kind == "l1_ball":
            g = torch.cat([((sg * y).sum(-1) - r)[:, None], g], -1)
        return g


class _L2Ball(_Base, ddn.IneqConstDeclarativeNode):
    kind = "l2_ball"

    def inequality_constraints(self, x, r, sg, y):
        return (y * y).sum(-1) - r * r


class _L2Sphere(_Base, ddn.EqConstDeclarativeNode):
    kind = "l2_sphere"

    def equality_constraints(self, x, r, sg, y):
        return (y * y).sum(-1) - r * r


class _LinfBall(_Base, ddn.IneqConstDeclarativeNode):
    kind = "linf_ball"

    def inequality_constraints(self, x, r, sg, y):
        return torch.cat([y - r[:, None], -y - r[:, None]], -1)


class _LinfSphere(_Base, ddn.EqConstDeclarativeNode):
    """Locally, inside the ball: the coordinate k (one-hot in sg) sits at sign * r; the box constraints of the
    other coordinates are strictly inactive."""

    kind = "linf_sphere"

    def equality_constraints(self, x, r, sg, y):
        return (sg * y).sum(-1) - r


def _node(kind):
    if kind in ("l1_ball", "l1_sphere"):
        return _L1(kind)
    node = {"simplex": _Simplex, "l2_ball": _L2Ball, "l2_sphere": _L2Sphere, "linf_ball": _LinfBall,
            "linf_sphere": _LinfSphere}[kind]()
    node.backward = "dense"
    return node


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("r", [0.5, 2.0])
def test_matches_generic_core_node(kind, r):
    x = torch.cat([data(4, 5, 5, 0.15), data(4, 5, 6, 2.5)])
    if kind == "linf_ball":
        x = x[4:]  # one-sided choice at points with no clipped entry is the same; test the clipped ones
    x = x.requires_grad_()
    b = x.shape[0]
    rr = torch.full((b,), r, dtype=D, requires_grad=True)
    if kind == "linf_sphere":
        k = x.detach().abs().argmax(-1, keepdim=True)
        inside = x.detach().abs().amax(-1) < r
        sg = torch.zeros_like(x).scatter(-1, k, torch.sign(x.detach().gather(-1, k)))
        x, rr = x[inside].detach().requires_grad_(), rr[inside].detach().requires_grad_()
        sg = sg[inside]
    else:
        sg = torch.sign(x.detach())
    v = torch.randn(x.shape, dtype=D, generator=torch.Generator().manual_seed(0))
    y = project(x, kind, rr)
    gx, gr = torch.autograd.grad((y * v).sum(), (x, rr))
    y_ref = ddn.DeclarativeLayer(_node(kind))(x, rr, sg)
    gx_ref, gr_ref = torch.autograd.grad((y_ref * v).sum(), (x, rr))
    assert torch.allclose(y, y_ref)
    assert torch.allclose(gx, gx_ref, atol=1e-8)
    assert torch.allclose(gr, gr_ref, atol=1e-8)


# ---- hard cases -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["l1_ball", "l2_ball", "linf_ball"])
def test_inside_ball_is_identity(kind):
    x = data(3, 4, 7, 0.05).requires_grad_()
    r = torch.ones(3, dtype=D, requires_grad=True)
    y = project(x, kind, r)
    assert torch.equal(y, x)
    v = torch.randn(3, 4, dtype=D)
    gx, gr = torch.autograd.grad((y * v).sum(), (x, r))
    assert torch.equal(gx, v) and torch.equal(gr, torch.zeros(3, dtype=D))


@pytest.mark.parametrize("kind", KINDS)
def test_zero_vector_is_finite(kind):
    x = torch.zeros(2, 4, dtype=D, requires_grad=True)
    y = project(x, kind, 1.5)
    if not kind.endswith("sphere"):
        assert torch.allclose(y, reference(x.detach(), kind, 1.5))
    feasible = {"simplex": lambda y: y.sum(-1), "l1_sphere": lambda y: y.abs().sum(-1),
                "l2_sphere": lambda y: y.norm(dim=-1), "linf_sphere": lambda y: y.abs().amax(-1)}
    if kind in feasible:
        assert torch.allclose(feasible[kind](y), torch.full((2,), 1.5, dtype=D))
    if kind.endswith("sphere"):
        with pytest.warns(NonRegularWarning, match="not unique"):
            (gx,) = torch.autograd.grad(y.sum(), x)
    else:
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()


def test_l2_sphere_zero_vector_policy():
    x = torch.zeros(1, 3, dtype=D, requires_grad=True)
    r = torch.tensor([2.0], dtype=D, requires_grad=True)
    y = project(x, "l2_sphere", r)
    assert torch.equal(y, torch.tensor([[2.0, 0, 0]], dtype=D))
    with pytest.warns(NonRegularWarning, match="zero vector"):
        gx, gr = torch.autograd.grad((y * torch.tensor([[1.0, 2, 3]], dtype=D)).sum(), (x, r))
    assert torch.equal(gx, torch.zeros_like(gx)) and torch.equal(gr, torch.tensor([1.0], dtype=D))


def test_linf_sphere_tie_warns_and_picks_first():
    x = torch.tensor([[0.5, -0.5, 0.1], [0.2, 0.9, 0.0]], dtype=D, requires_grad=True)
    y = project(x, "linf_sphere", 1.0)
    assert torch.equal(y[0], torch.tensor([1.0, -0.5, 0.1], dtype=D))
    assert torch.equal(y[1], torch.tensor([0.2, 1.0, 0.0], dtype=D))
    with pytest.warns(NonRegularWarning, match=r"tied largest.*elements \[0\]"):
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(gx, torch.tensor([[0, 1, 1], [1, 0, 1]], dtype=D))


def test_boundary_points_warn_and_use_the_active_branch():
    x = torch.tensor([[0.6, 0.8]], dtype=D, requires_grad=True)  # |x|_2 = 1
    y = project(x, "l2_ball", 1.0)
    assert torch.allclose(y, x)
    with pytest.warns(NonRegularWarning, match="boundary"):
        (gx,) = torch.autograd.grad((y * torch.tensor([[1.0, 0.0]], dtype=D)).sum(), x)
    xh = x.detach() / x.detach().norm()
    assert torch.allclose(gx, torch.tensor([[1.0, 0.0]], dtype=D) - xh * xh[0, 0])  # tangent projection
    xs = torch.tensor([[0.5, 0.5, -0.25]], dtype=D, requires_grad=True)  # threshold tie on the simplex
    ys = project(xs, "simplex", 1.0)
    assert torch.allclose(ys, torch.tensor([[0.5, 0.5, 0.0]], dtype=D))
    xs2 = torch.tensor([[1.0, 0.0]], dtype=D, requires_grad=True)  # entry exactly at tau = 0
    ys2 = project(xs2, "simplex", 1.0)
    with pytest.warns(NonRegularWarning, match="threshold"):
        (g2,) = torch.autograd.grad((ys2 * torch.tensor([[1.0, 5.0]], dtype=D)).sum(), xs2)
    assert torch.equal(g2, torch.zeros_like(g2))  # support {0}: a single-entry support has zero Jacobian


def test_l1_sphere_inside_with_zero_entry_warns():
    x = torch.tensor([[0.2, 0.0, -0.1]], dtype=D, requires_grad=True)
    y = project(x, "l1_sphere", 1.0)
    assert torch.allclose(y.abs().sum(), torch.tensor(1.0, dtype=D))
    assert torch.allclose(((y - x) ** 2).sum(), ((reference(x.detach(), "l1_sphere", 1.0) - x) ** 2).sum())
    with pytest.warns(NonRegularWarning, match="not unique"):
        torch.autograd.grad(y.sum(), x)


def test_radius_broadcast_dim_and_float32():
    x = data(6, 5, 8, 2.0).reshape(2, 3, 5).float()
    r = torch.tensor([[0.5], [2.0]])
    for kind in KINDS:
        y = project(x.transpose(1, 2), kind, r, dim=1)
        y_ref = project(x, kind, r)
        assert y.dtype == torch.float32 and y.shape == (2, 5, 3)
        assert torch.allclose(y.transpose(1, 2), y_ref)
        xd = x.double()
        ref = torch.stack([reference(xd[0], kind, 0.5), reference(xd[1], kind, 2.0)])
        assert torch.allclose(y_ref.double(), ref, atol=1e-5)


def test_huge_and_tiny_radius():
    x = data(4, 6, 9)
    assert torch.allclose(project(x, "l2_ball", 1e8), x)
    assert torch.allclose(project(x, "l1_ball", 1e8), x)
    y = project(x, "simplex", 1e-8)
    assert torch.allclose(y.sum(-1), torch.full((4,), 1e-8, dtype=D))
    assert ((y > 0).sum(-1) == 1).all()  # all mass on the largest entry


def test_bad_input():
    x = data(3, 4, 10)
    with pytest.raises(DDNError, match="kind must be one of"):
        project(x, "l3_ball")
    with pytest.raises(DDNError, match=r"radius must be finite and > 0.*\[1\]"):
        project(x, "l2_ball", torch.tensor([1.0, 0.0, 1.0]))
    xn = x.clone()
    xn[2, 1] = float("nan")
    with pytest.raises(DDNError, match=r"NaN or Inf.*\[2\]"):
        project(xn, "simplex")
    with pytest.raises(DDNError, match="out of range"):
        project(x, "simplex", dim=3)
    with pytest.raises(DDNError, match="broadcast"):
        project(x, "simplex", torch.ones(4))
    with pytest.raises(DDNError, match="kind"):
        EuclideanProjection("box")


def test_module():
    r = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
    proj = EuclideanProjection("l2_ball", r)
    proj(data(3, 4, 11, 3.0)).sum().backward()
    assert r.grad is not None and torch.isfinite(r.grad)


@settings(max_examples=30, deadline=None)
@given(kind=st.sampled_from(KINDS), seed=st.integers(0, 10_000), scale=st.floats(0.01, 10), r=st.floats(0.1, 5))
def test_properties(kind, seed, scale, r):
    """Feasible, idempotent, and no feasible point (from the reference's candidates) is closer."""
    x = data(4, 3, seed, scale)
    y = project(x, kind, r)
    tol = 1e-9 * (1 + scale + r)
    norms = {"simplex": y.sum(-1), "l1_ball": y.abs().sum(-1), "l1_sphere": y.abs().sum(-1),
             "l2_ball": y.norm(dim=-1), "l2_sphere": y.norm(dim=-1), "linf_ball": y.abs().amax(-1),
             "linf_sphere": y.abs().amax(-1)}[kind]
    if kind.endswith("ball"):
        assert (norms <= r + tol).all()
    else:
        assert torch.allclose(norms, torch.full_like(norms, r), atol=tol)
    if kind == "simplex":
        assert (y >= 0).all()
    assert torch.allclose(project(y, kind, r), y, atol=tol)
    ref = reference(x, kind, r)
    assert (((y - x) ** 2).sum(-1) <= ((ref - x) ** 2).sum(-1) + tol).all()
