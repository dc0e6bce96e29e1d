"""Scalar robust pooling: global optimality, closed-form gradients vs gradcheck and the generic core node,
degenerate and non-regular inputs, bad input."""
from __future__ import annotations


import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.autograd import gradcheck

import torchddn as ddn
from torchddn.diagnostics import DDNError, NonRegularWarning
from torchddn.nodes import RobustPool, get_penalty
from torchddn.nodes.robust_pool import robust_pool
from torchddn.nodes.penalties import Huber, Penalty, PseudoHuber, Quadratic, TruncatedQuadratic, Welsch

PENALTIES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]
ALPHAS = [0.2, 1.0, 4.0]
D = torch.float64


def objective(pen: Penalty, x: torch.Tensor, u: torch.Tensor, a) -> torch.Tensor:
    """sum_i phi(u - x_i) for x (B, n), u (B, G) -> (B, G)."""
    a = torch.as_tensor(a, dtype=x.dtype).reshape(-1, 1, 1) if torch.is_tensor(a) else torch.tensor(a, dtype=x.dtype)
    return pen.phi(u[:, :, None] - x[:, None, :], a).sum(-1)


def grid_min(pen, x, a, points=20001):
    lo, hi = float(x.min()) - 1, float(x.max()) + 1
    g = torch.linspace(lo, hi, points, dtype=x.dtype).expand(x.shape[0], points)
    return objective(pen, x, g, a).amin(-1)


def clustered(b, n, seed, dtype=D):
    """Mixtures of two or three clusters with outliers: several local minima for the nonconvex penalties."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 3, generator=gen, dtype=dtype) * 3
    which = torch.randint(0, 3, (b, n), generator=gen)
    x = centres.gather(1, which) + 0.3 * torch.randn(b, n, generator=gen, dtype=dtype)
    out = torch.rand(b, n, generator=gen, dtype=dtype) < 0.2
    return torch.where(out, 6 * torch.randn(b, n, generator=gen, dtype=dtype), x)


# ---------------------------------------------------------------------------------------------------------------
# penalties
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PENALTIES)
def test_penalty_derivatives_match_autograd(name):
    pen = get_penalty(name)
    z = torch.linspace(-3.1, 3.1, 41, dtype=D, requires_grad=True)
    a = torch.tensor(0.7, dtype=D, requires_grad=True)
    d1 = torch.autograd.grad(pen.phi(z, a).sum(), z, create_graph=True)[0] + 0 * a
    assert torch.allclose(d1, pen.dphi(z, a), atol=1e-12)
    d2 = torch.autograd.grad(d1.sum(), z, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
    assert torch.allclose(d2, pen.d2phi(z, a).expand_as(d2), atol=1e-12)
    da = torch.stack([torch.autograd.grad(d1[i], a, retain_graph=True, allow_unused=True,
                                          materialize_grads=True)[0] for i in range(len(z))])
    assert torch.allclose(da, pen.dphi_dalpha(z, a).expand_as(da), atol=1e-12)
    # squared-norm form: rho(s) = phi(sqrt(s))
    s = torch.linspace(0.01, 9.0, 37, dtype=D, requires_grad=True)
    assert torch.allclose(pen.rho(s, a), pen.phi(s.sqrt(), a), atol=1e-12)
    r1 = torch.autograd.grad(pen.rho(s, a).sum(), s, create_graph=True)[0] + 0 * a
    assert torch.allclose(r1, pen.drho(s, a).expand_as(r1), atol=1e-12)
    r2 = torch.autograd.grad(r1.sum(), s, retain_graph=True, allow_unused=True, materialize_grads=True)[0]
    assert torch.allclose(r2, pen.d2rho(s, a).expand_as(r2), atol=1e-12)
    ra = torch.stack([torch.autograd.grad(r1[i], a, retain_graph=True, allow_unused=True,
                                          materialize_grads=True)[0] for i in range(len(s))])
    assert torch.allclose(ra, pen.drho_dalpha(s, a).expand_as(ra), atol=1e-12)


def test_get_penalty_names_and_objects():
    assert isinstance(get_penalty("huber"), Huber)
    assert isinstance(get_penalty("pseudo_huber"), PseudoHuber)
    assert isinstance(get_penalty("welsch"), Welsch)
    assert isinstance(get_penalty("truncated_quadratic"), TruncatedQuadratic)
    q = Quadratic()
    assert get_penalty(q) is q
    with pytest.raises(DDNError, match="penalty must be one of"):
        get_penalty("cauchy")


# ---------------------------------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_forward_is_global_minimum(name, alpha):
    """Dense grid search: no grid point has a lower objective than the returned y."""
    pen = get_penalty(name)
    x = clustered(12, 15, seed=1)
    y = robust_pool(x, name, alpha)
    fy = objective(pen, x, y[:, None], alpha)[:, 0]
    assert (fy <= grid_min(pen, x, alpha) + 1e-9).all()


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_welsch_large_n_heuristic_starts_find_global_minimum(alpha):
    """n above exact_starts: the block-wise density starts still find the global minimum."""
    pen = Welsch()
    x = clustered(8, 100, seed=7)
    y = robust_pool(x, "welsch", alpha)
    fy = objective(pen, x, y[:, None], alpha)[:, 0]
    assert (fy <= grid_min(pen, x, alpha, 8001) + 1e-9).all()
    y_exact = robust_pool(x, "welsch", alpha, exact_starts=100)
    assert torch.allclose(y, y_exact, atol=1e-9)


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_forward_first_order_condition_float64(name):
    pen = get_penalty(name)
    x = clustered(20, 11, seed=2)
    y = robust_pool(x, name, 0.8)
    a = torch.tensor(0.8, dtype=D)
    g = pen.dphi(y[:, None] - x, a).sum(-1)
    assert g.abs().max() < 1e-10


def test_truncated_quadratic_is_inlier_mean():
    x = clustered(20, 11, seed=3)
    y = robust_pool(x, "truncated_quadratic", 0.9)
    inl = (y[:, None] - x).abs() < 0.9
    assert torch.allclose(y, (x * inl).sum(-1) / inl.sum(-1), atol=1e-12)


def test_quadratic_is_mean_and_huge_alpha_is_mean():
    x = clustered(5, 9, seed=4)
    assert torch.allclose(robust_pool(x, "quadratic"), x.mean(-1))
    for name in ["pseudo_huber", "huber", "truncated_quadratic"]:
        assert torch.allclose(robust_pool(x, name, 1e6), x.mean(-1), atol=1e-7)
    assert torch.allclose(robust_pool(x, "welsch", 1e4), x.mean(-1), atol=1e-6)


@pytest.mark.parametrize("name", PENALTIES)
def test_float32_matches_float64(name):
    x = clustered(30, 13, seed=5)
    y64 = robust_pool(x, name, 1.0)
    y32 = robust_pool(x.float(), name, 1.0)
    assert y32.dtype == torch.float32
    assert torch.allclose(y32.double(), y64, atol=2e-5, rtol=1e-5)


def test_dims_tuple_and_shapes():
    x = torch.randn(2, 3, 4, 5, dtype=D)
    y = robust_pool(x, "huber", 0.5, dim=(-2, -1))
    assert y.shape == (2, 3)
    assert torch.allclose(y, robust_pool(x.reshape(2, 3, 20), "huber", 0.5))
    y1 = robust_pool(x, "pseudo_huber", 1.0, dim=1)
    assert y1.shape == (2, 4, 5)
    assert torch.allclose(y1, robust_pool(x.movedim(1, -1), "pseudo_huber", 1.0))
    a = torch.rand(2, 1, dtype=D) + 0.5  # broadcast to the output (2, 3)
    ya = robust_pool(x, "welsch", a, dim=(2, 3))
    assert torch.allclose(ya[1], robust_pool(x[1], "welsch", float(a[1, 0]), dim=(1, 2)))


# ---------------------------------------------------------------------------------------------------------------
# backward
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_gradcheck(name, alpha):
    x = clustered(4, 7, seed=6).requires_grad_()
    a = torch.full((4,), alpha, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, a: robust_pool(x, name, a), (x, a))


@pytest.mark.parametrize("name", PENALTIES)
def test_cpu_chunking_matches_one_chunk_and_gradchecks(name, monkeypatch):
    """On CPU the solvers and the backward work over row chunks; with a tiny chunk (2 rows of 7, a ragged last
    chunk) outputs and gradients (x and alpha) equal the one-chunk computation, and gradcheck passes."""
    import sys

    rp = sys.modules["torchddn.nodes.robust_pool"]
    x = clustered(5, 7, seed=11).requires_grad_()
    a = torch.linspace(0.5, 2.0, 5, dtype=D).requires_grad_()
    w = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(3))

    def run():
        y = robust_pool(x, name, a)
        return (y.detach(), *torch.autograd.grad((w * y).sum(), (x, a)))

    ref = run()
    monkeypatch.setattr(rp, "_CPU_CHUNK_ELEMS", 14)
    assert len(rp._row_chunks(5, 7, x.device)) == 3
    for got, want in zip(run(), ref):
        assert torch.allclose(got, want, rtol=0, atol=1e-12)
    assert gradcheck(lambda x, a: robust_pool(x, name, a), (x, a))


def test_gradcheck_dims_tuple():
    x = torch.randn(2, 3, 4, dtype=D, requires_grad=True)
    a = torch.tensor(0.7, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, a: robust_pool(x, "pseudo_huber", a, dim=(0, 2)), (x, a))


class _PoolNode(ddn.DeclarativeNode):
    """The same objective written directly; solve() returns our forward so the generic backward is compared."""

    def __init__(self, name):
        super().__init__(backward="dense")
        self.name = name

    def objective(self, x, a, y):
        z = y - x
        a = a[:, None]
        if self.name == "quadratic":
            return (0.5 * z * z).sum(-1)
        if self.name == "pseudo_huber":
            return (a * a * (torch.sqrt(1 + (z / a) ** 2) - 1)).sum(-1)
        if self.name == "huber":
            return torch.where(z.abs() <= a, 0.5 * z * z, a * (z.abs() - 0.5 * a)).sum(-1)
        if self.name == "welsch":
            return (1 - torch.exp(-0.5 * (z / a) ** 2)).sum(-1)
        return (0.5 * torch.minimum(z * z, a * a)).sum(-1)

    def solve(self, x, a):
        return robust_pool(x, self.name, a).unsqueeze(-1), None


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_generic_core_node(name, alpha):
    x = clustered(6, 9, seed=8).requires_grad_()
    a = (alpha * (1 + 0.1 * torch.arange(6, dtype=D))).requires_grad_()
    v = torch.randn(6, dtype=D)
    y = robust_pool(x, name, a)
    gx, ga = torch.autograd.grad((y * v).sum(), (x, a))
    layer = ddn.DeclarativeLayer(_PoolNode(name))
    y_ref = layer(x, a)[:, 0]
    gx_ref, ga_ref = torch.autograd.grad((y_ref * v).sum(), (x, a))
    assert torch.allclose(y, y_ref)
    assert torch.allclose(gx, gx_ref, atol=1e-10)
    assert torch.allclose(ga, ga_ref, atol=1e-10)


def test_gradient_matches_finite_differences_of_resolves():
    x = clustered(3, 8, seed=9)
    a = torch.tensor([0.5, 1.0, 2.0], dtype=D)
    for name in ["pseudo_huber", "welsch"]:
        xr = x.clone().requires_grad_()
        gx = torch.autograd.grad(robust_pool(xr, name, a).sum(), xr)[0]
        h = 1e-6
        e = torch.zeros_like(x)
        e[:, 2] = h
        fd = (robust_pool(x + e, name, a) - robust_pool(x - e, name, a)) / (2 * h)
        assert torch.allclose(gx[:, 2], fd, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# degenerate inputs and non-regular points
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PENALTIES)
def test_all_equal_and_ties(name):
    x = torch.full((2, 6), 1.5, dtype=D, requires_grad=True)
    y = robust_pool(x, name, 0.5)
    assert torch.allclose(y, torch.full((2,), 1.5, dtype=D))
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.allclose(gx, torch.full_like(gx, 1 / 6))
    # ties: duplicated points count twice
    xt = torch.tensor([[0.0, 0.0, 0.0, 1.0, 5.0]], dtype=D, requires_grad=True)
    yt = robust_pool(xt, name, 0.7)
    (gt,) = torch.autograd.grad(yt.sum(), xt)
    assert torch.isfinite(gt).all() and torch.allclose(gt.sum(), torch.tensor(1.0, dtype=D))


def test_tiny_alpha():
    x = torch.tensor([[0.0, 0.1, 0.1, 0.3, 2.0]], dtype=D, requires_grad=True)
    # truncated quadratic / Welsch with tiny alpha: the mode (the tied pair)
    for name in ["truncated_quadratic", "welsch"]:
        y = robust_pool(x, name, 1e-3)
        assert torch.allclose(y, torch.tensor([0.1], dtype=D))
        (gx,) = torch.autograd.grad(y.sum(), x)
        assert torch.allclose(gx, torch.tensor([[0, 0.5, 0.5, 0, 0]], dtype=D))
    # Huber / pseudo-Huber with tiny alpha: close to the median
    for name in ["huber", "pseudo_huber"]:
        assert abs(float(robust_pool(x.detach(), name, 1e-6)) - 0.1) < 1e-5


def test_nonregular_welsch_bifurcation_warns_and_returns_zero():
    """Two points 2 alpha apart: the Welsch minimum at the midpoint is degenerate (phi'' sums to 0)."""
    x = torch.tensor([[-1.0, 1.0], [0.0, 0.5]], dtype=D, requires_grad=True)
    y = robust_pool(x, "welsch", 1.0)
    assert abs(float(y[0].detach())) < 1e-3
    with pytest.warns(NonRegularWarning, match=r"elements \[0\]"):
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()
    assert torch.equal(gx[0], torch.zeros(2, dtype=D))
    assert torch.allclose(gx[1], torch.tensor([0.5, 0.5], dtype=D))


def test_huber_flat_minimum_is_a_minimiser_with_finite_gradient():
    """Two far groups with Huber: the minimum is flat on [1.5, 8.5]; any point there is optimal. The solver starts
    from the mean (5.0, inside the flat region, where H = 0), so the minimiser is not isolated: the backward returns
    the minimum-norm (zero) gradient and warns, never NaN. One group moved slightly breaks the flatness and the
    gradient is the inlier average of the group that holds y."""
    x = torch.tensor([[0.0, 0.5, 9.5, 10.0]], dtype=D, requires_grad=True)
    y = robust_pool(x, "huber", 1.0)
    assert 1.5 - 1e-12 <= float(y) <= 8.5 + 1e-12
    pen = Huber()
    assert float(objective(pen, x.detach(), y.detach()[:, None], 1.0)) <= float(grid_min(pen, x.detach(), 1.0)) + 1e-12
    with pytest.warns(NonRegularWarning, match="vanishes"):
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all() and float(gx.abs().max()) == 0.0
    # three points on the left: the left group wins, the minimiser is unique (y = 11/12, within alpha of the three
    # left points) and dy/dx_i = 1/3 on each of them, 0 on the two outliers
    x2 = torch.tensor([[0.0, 0.5, 0.25, 9.5, 10.0]], dtype=D, requires_grad=True)
    y2 = robust_pool(x2, "huber", 1.0)
    assert float(objective(pen, x2.detach(), y2.detach()[:, None], 1.0)) <= float(grid_min(pen, x2.detach(), 1.0)) + 1e-12
    assert abs(float(y2) - 11 / 12) < 1e-12
    (gx2,) = torch.autograd.grad(y2.sum(), x2)
    assert torch.allclose(gx2, torch.tensor([[1 / 3, 1 / 3, 1 / 3, 0.0, 0.0]], dtype=D), atol=1e-12)


# ---------------------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------------------
def test_bad_input():
    x = torch.randn(3, 4, dtype=D)
    xn = x.clone()
    xn[1, 2] = float("nan")
    with pytest.raises(DDNError, match=r"NaN or Inf .*\[1\]"):
        robust_pool(xn, "huber")
    for bad in (float("inf"), -float("inf")):  # +Inf is caught by the row maximum, -Inf by the row minimum
        xi = x.clone()
        xi[2, 0] = bad
        with pytest.raises(DDNError, match=r"NaN or Inf .*\[2\]"):
            robust_pool(xi, "huber")
    with pytest.raises(DDNError, match=r"alpha must be finite and > 0.*\[2\]"):
        robust_pool(x, "huber", torch.tensor([1.0, 1.0, -1.0]))
    with pytest.raises(DDNError, match="does not broadcast"):
        robust_pool(x, "huber", torch.ones(5))
    with pytest.raises(DDNError, match="out of range"):
        robust_pool(x, "huber", dim=2)
    with pytest.raises(DDNError, match="repeats"):
        robust_pool(x, "huber", dim=(1, -1))
    with pytest.raises(DDNError, match="floating-point"):
        robust_pool(torch.ones(3, 4, dtype=torch.int64), "huber")
    with pytest.raises(DDNError, match="empty"):
        robust_pool(torch.ones(3, 0), "huber")
    with pytest.raises(DDNError, match="penalty"):
        robust_pool(x, "l1")


# ---------------------------------------------------------------------------------------------------------------
# module and properties
# ---------------------------------------------------------------------------------------------------------------
def test_module_learns_alpha():
    alpha = torch.nn.Parameter(torch.tensor(0.8, dtype=D))
    pool = RobustPool("pseudo_huber", alpha, dim=-1)
    x = clustered(4, 10, seed=10)
    loss = pool(x).square().sum()
    loss.backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
    assert "pseudo_huber" in repr(pool)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-50, 50), scale=st.floats(0.1, 10), seed=st.integers(0, 1000),
       name=st.sampled_from(PENALTIES))
def test_equivariance(shift, scale, seed, name):
    """y(s x + c; s alpha) = s y(x; alpha) + c (the penalties are scale-covariant up to a constant factor)."""
    x = clustered(3, 9, seed=seed)
    y = robust_pool(x, name, 0.7)
    y2 = robust_pool(scale * x + shift, name, 0.7 * scale)
    assert torch.allclose(y2, scale * y + shift, atol=1e-8 * (1 + abs(shift) + scale))
