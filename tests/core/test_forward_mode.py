"""Forward mode (torch.func.jvp / jacfwd) through every core node kind, against finite differences of re-solves;
None positional inputs and gamma=None."""
from __future__ import annotations

import pytest
import torch

import torchddn as ddn
from torchddn.fixed_point import FixedPointNode
from torchddn.root import RootNode, custom_root

DT = torch.float64


class TanhDEQ(FixedPointNode):
    def T(self, x, y):
        return torch.tanh(0.5 * y + x)

    def initial_guess(self, x):
        return torch.zeros_like(x)


class CubicRoot(RootNode):
    def optimality(self, x, y):
        return y ** 3 + y - x

    def initial_guess(self, x):
        return torch.zeros_like(x)


class Quartic(ddn.DeclarativeNode):
    def initial_guess(self, x, K):
        return torch.zeros_like(x)

    def objective(self, x, K, y):
        return 0.5 * ((y - x) ** 2).sum(-1) + 0.25 * (y ** 4).sum(-1)


def fd_jvp(f, x, dx, eps=1e-6):
    with torch.no_grad():
        return (f(x + eps * dx) - f(x - eps * dx)) / (2 * eps)


@pytest.mark.parametrize("make", [lambda: TanhDEQ(tol=1e-13), lambda: TanhDEQ(tol=1e-13, backward_solver="dense"),
                                  lambda: CubicRoot(), lambda: CubicRoot(backward="gmres")])
def test_jvp_and_jacfwd_fixed_point_and_root(make):
    node = make()
    f = lambda x: ddn.DeclarativeLayer(node)(x)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, generator=g, dtype=DT)
    dx = torch.randn(3, 4, generator=g, dtype=DT)
    _, t = torch.func.jvp(f, (x,), (dx,))
    assert torch.allclose(t, fd_jvp(f, x, dx), rtol=1e-6, atol=1e-8)
    assert torch.allclose(torch.func.jacfwd(f)(x), torch.func.jacrev(f)(x), atol=1e-9)
    assert torch.autograd.gradgradcheck(f, (x.clone().requires_grad_(True),))


def test_custom_root_jvp():
    sqrt = custom_root(lambda x, y: y * y - x)(lambda x: torch.sqrt(x))
    x = torch.tensor([[1.0, 4.0, 2.0]], dtype=DT)
    _, t = torch.func.jvp(sqrt, (x,), (torch.ones_like(x),))
    assert torch.allclose(t, 0.5 / torch.sqrt(x), atol=1e-10)


def test_none_positional_input_and_gamma_none():
    x = torch.randn(3, 4, dtype=DT, requires_grad=True)
    layer = ddn.DeclarativeLayer(Quartic(gamma=None))
    assert layer.node.gamma == 0.0
    assert torch.autograd.gradcheck(lambda x: layer(x, None), (x,))
    _, t = torch.func.jvp(lambda x: layer(x, None), (x.detach(),), (torch.ones_like(x),))
    assert torch.allclose(t, fd_jvp(lambda x: layer(x, None), x.detach(), torch.ones_like(x)), atol=1e-7)
    with pytest.raises(ValueError, match="gamma"):
        Quartic(gamma=-1.0)


def test_custom_root_tuple_solution_kkt_pair():
    """min 1/2 |u - x|^2 s.t. a^T u = 1 as the KKT pair (u, nu): F = (u - x - nu a, a^T u - 1)."""
    a = torch.tensor([1.0, 2.0, -1.0], dtype=DT)

    def F(x, y):
        u, nu = y
        return u - x - nu * a, (u * a).sum(-1, keepdim=True) - 1

    @custom_root(F)
    def kkt(x):
        nu = (1 - (x * a).sum(-1, keepdim=True)) / (a @ a)
        return x + nu * a, nu

    x = torch.randn(4, 3, dtype=DT, generator=torch.Generator().manual_seed(3), requires_grad=True)
    u, nu = kkt(x)
    assert u.shape == (4, 3) and nu.shape == (4, 1)
    P = torch.eye(3, dtype=DT) - torch.outer(a, a) / (a @ a)
    gu = torch.autograd.grad(u.sum(), x, retain_graph=True)[0]
    assert torch.allclose(gu, P.sum(0).expand(4, 3), atol=1e-10)
    gnu = torch.autograd.grad(nu.sum(), x)[0]
    assert torch.allclose(gnu, -(a / (a @ a)).expand(4, 3), atol=1e-10)
    assert torch.autograd.gradcheck(lambda x: kkt(x)[1], (x,))


def test_root_node_tuple_initial_guess():
    class Pair(RootNode):
        """y1 = sqrt(x), y2 = y1^3."""

        def optimality(self, x, y):
            y1, y2 = y
            return y1 * y1 - x, y2 - y1 ** 3

        def initial_guess(self, x):
            return torch.ones_like(x), torch.ones_like(x)

    x = torch.tensor([[1.0, 4.0], [9.0, 2.0]], dtype=DT, requires_grad=True)
    y1, y2 = ddn.DeclarativeLayer(Pair())(x)
    assert torch.allclose(y1, x.detach().sqrt()) and torch.allclose(y2, x.detach() ** 1.5)
    g = torch.autograd.grad(y2.sum(), x)[0]
    assert torch.allclose(g, 1.5 * x.detach().sqrt(), atol=1e-9)
