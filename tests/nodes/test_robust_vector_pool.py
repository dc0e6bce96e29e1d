"""Robust vector pooling: optimality, gradients vs gradcheck and the generic core node, degenerate inputs."""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

import torchddn as ddn
from torchddn.diagnostics import DDNError, NonRegularWarning
from torchddn.nodes import RobustVectorPool, get_penalty, robust_vector_pool
from torchddn.nodes.robust_pool import robust_pool

PENALTIES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]
D = torch.float64


def clustered(b, n, d, seed, dtype=D):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 3, d, generator=gen, dtype=dtype) * 3
    which = torch.randint(0, 3, (b, n), generator=gen)
    x = centres.gather(1, which[..., None].expand(b, n, d)) + 0.3 * torch.randn(b, n, d, generator=gen, dtype=dtype)
    out = torch.rand(b, n, 1, generator=gen, dtype=dtype) < 0.2
    return torch.where(out, 5 * torch.randn(b, n, d, generator=gen, dtype=dtype), x)


def objective(pen, x, u, a):
    """sum_i rho(|u - x_i|^2) for x (B, n, d), u (B, G, d) -> (B, G)."""
    s = ((u[:, :, None, :] - x[:, None, :, :]) ** 2).sum(-1)
    return pen.rho(s, torch.as_tensor(a, dtype=x.dtype)).sum(-1)


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_forward_beats_dense_grid_2d(name, alpha):
    """No point of a dense 2D grid has a lower objective (global for the convex penalties and, on these
    inputs, for the multi-start nonconvex solver)."""
    pen = get_penalty(name)
    x = clustered(6, 10, 2, seed=1)
    y = robust_vector_pool(x, name, alpha)
    fy = objective(pen, x, y[:, None], alpha)[:, 0]
    lin = torch.linspace(-12, 12, 241, dtype=D)
    grid = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), -1).reshape(-1, 2)
    fg = objective(pen, x, grid.expand(6, -1, -1), alpha).amin(-1)
    assert (fy <= fg + 1e-9).all()


@pytest.mark.parametrize("name", ["pseudo_huber", "huber", "welsch"])
def test_first_order_condition(name):
    pen = get_penalty(name)
    x = clustered(8, 12, 3, seed=2)
    y = robust_vector_pool(x, name, 1.0)
    z = y[:, None, :] - x
    g = 2 * (pen.drho((z * z).sum(-1), torch.tensor(1.0, dtype=D))[..., None] * z).sum(1)
    assert g.abs().max() < 1e-9


@pytest.mark.parametrize("name", ["quadratic", "pseudo_huber", "huber", "welsch"])
def test_d1_matches_scalar_pooling(name):
    x = clustered(5, 9, 1, seed=3)
    assert torch.allclose(robust_vector_pool(x, name, 0.8)[:, 0], robust_pool(x[..., 0], name, 0.8), atol=1e-9)


@pytest.mark.parametrize("name", PENALTIES)
@pytest.mark.parametrize("alpha", [0.5, 1.0, 3.0])
def test_gradcheck(name, alpha):
    x = clustered(3, 6, 2, seed=4).requires_grad_()
    a = torch.full((3,), alpha, dtype=D, requires_grad=True)
    assert gradcheck(lambda x, a: robust_vector_pool(x, name, a), (x, a))


class _VecNode(ddn.DeclarativeNode):
    def __init__(self, name):
        super().__init__(backward="dense")
        self.name = name
        self.pen = get_penalty(name)

    def objective(self, x, a, y):
        s = ((y[:, None, :] - x) ** 2).sum(-1)
        a = a[:, None]
        if self.name == "quadratic":
            return (0.5 * s).sum(-1)
        if self.name == "pseudo_huber":
            return (a * a * (torch.sqrt(1 + s / (a * a)) - 1)).sum(-1)
        if self.name == "huber":
            r = torch.sqrt(torch.where(s <= a * a, torch.ones_like(s), s))
            return torch.where(s <= a * a, 0.5 * s, a * (r - 0.5 * a)).sum(-1)
        if self.name == "welsch":
            return (1 - torch.exp(-0.5 * s / (a * a))).sum(-1)
        return (0.5 * torch.minimum(s, a * a)).sum(-1)

    def solve(self, x, a):
        return robust_vector_pool(x, self.name, a), None


@pytest.mark.parametrize("name", PENALTIES)
def test_matches_generic_core_node(name):
    x = clustered(4, 8, 3, seed=5).requires_grad_()
    a = torch.tensor([0.5, 1.0, 1.5, 3.0], dtype=D, requires_grad=True)
    v = torch.randn(4, 3, dtype=D)
    y = robust_vector_pool(x, name, a)
    gx, ga = torch.autograd.grad((y * v).sum(), (x, a))
    y_ref = ddn.DeclarativeLayer(_VecNode(name))(x, a)
    gx_ref, ga_ref = torch.autograd.grad((y_ref * v).sum(), (x, a))
    assert torch.allclose(y, y_ref)
    assert torch.allclose(gx, gx_ref, atol=1e-9)
    assert torch.allclose(ga, ga_ref, atol=1e-9)


@pytest.mark.parametrize("name", PENALTIES)
def test_float32_and_shapes(name):
    x = clustered(2 * 3, 7, 4, seed=6).reshape(2, 3, 7, 4)
    y = robust_vector_pool(x.float(), name, 1.0)
    assert y.shape == (2, 3, 4) and y.dtype == torch.float32
    assert torch.allclose(y.double(), robust_vector_pool(x, name, 1.0), atol=1e-4)
    # set dimension elsewhere than -2
    y2 = robust_vector_pool(x.movedim(2, 0), name, 1.0, dim=0)
    assert y2.shape == (2, 3, 4)
    assert torch.allclose(y2, robust_vector_pool(x, name, 1.0), atol=1e-12)


@pytest.mark.parametrize("name", PENALTIES)
def test_solution_at_a_data_point_has_finite_gradient(name):
    """All points equal (|u - x_i| = 0 for every i): no NaN from the norm."""
    x = torch.ones(2, 5, 3, dtype=D).requires_grad_()
    y = robust_vector_pool(x, name, 0.7)
    assert torch.allclose(y, torch.ones(2, 3, dtype=D))
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.isfinite(gx).all()
    assert torch.allclose(gx, torch.full_like(gx, 1 / 5))


def test_nonregular_warns_with_pseudo_inverse():
    """Two points 2 alpha apart with Welsch: the Hessian is singular along their axis at the midpoint."""
    x = torch.tensor([[[-1.0, 0.0], [1.0, 0.0]]], dtype=D, requires_grad=True)
    y = robust_vector_pool(x, "welsch", 1.0)
    assert torch.allclose(y, torch.zeros(1, 2, dtype=D), atol=1e-3)
    with pytest.warns(NonRegularWarning, match=r"elements \[0\]"):
        (gx,) = torch.autograd.grad(y[:, 0].sum() + y[:, 1].sum(), x)
    assert torch.isfinite(gx).all()
    assert torch.allclose(gx[..., 0], torch.zeros(1, 2, dtype=D), atol=1e-8)  # null direction: zero


def test_bad_input():
    x = torch.randn(2, 5, 3, dtype=D)
    with pytest.raises(DDNError, match="feature"):
        robust_vector_pool(x, "huber", dim=-1)
    xn = x.clone()
    xn[1, 0, 0] = float("inf")
    with pytest.raises(DDNError, match=r"NaN or Inf .*\[1\]"):
        robust_vector_pool(xn, "huber")
    with pytest.raises(DDNError, match="at least 2"):
        robust_vector_pool(torch.randn(4), "huber")
    with pytest.raises(DDNError, match="alpha"):
        robust_vector_pool(x, "huber", 0.0)


def test_module():
    alpha = torch.nn.Parameter(torch.tensor(1.0, dtype=D))
    pool = RobustVectorPool("welsch", alpha)
    pool(clustered(3, 6, 2, seed=7)).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad)
