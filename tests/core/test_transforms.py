"""vmap, jacrev, jacfwd, double backward and torch.compile."""
import pytest
import torch
from torch.autograd import gradgradcheck

import torchddn as ddn
from tests.core import problems as P

D = torch.float64


@pytest.fixture
def ball_input():
    x = torch.randn(6, 3, dtype=D, generator=torch.Generator().manual_seed(1))
    x[:3] *= 3
    x[3:] *= 0.1
    return x


def test_vmap_matches_batched_call():
    layer = ddn.DeclarativeLayer(P.RobustAverage())
    X = torch.randn(3, 4, 7, dtype=D)
    torch.testing.assert_close(torch.func.vmap(layer)(X), layer(X.reshape(12, 7)).reshape(3, 4, 1))


def test_vmap_with_unbatched_second_input():
    layer = ddn.DeclarativeLayer(P.InputHessianQuadratic())
    A = torch.randn(2, 3, 4, dtype=D)
    c = torch.randn(3, 4, dtype=D)
    out = torch.func.vmap(layer, in_dims=(0, None))(A, c)
    torch.testing.assert_close(out, c / torch.exp(A))


@pytest.mark.parametrize("node,closed", [(P.BallProjection, P.ball_projection),
                                         (P.LinearOnCircle, P.linear_on_circle)])
def test_jacrev_jacfwd(node, closed, ball_input):
    layer = ddn.DeclarativeLayer(node())
    ref = torch.func.jacrev(closed)(ball_input)
    torch.testing.assert_close(torch.func.jacrev(layer)(ball_input), ref)
    torch.testing.assert_close(torch.func.jacfwd(layer)(ball_input), ref)


def test_jacrev_unconstrained_closed_form():
    x = torch.randn(4, 7, dtype=D)
    layer = ddn.DeclarativeLayer(P.RobustAverage())
    J = torch.func.jacrev(layer)(x)  # (4, 1, 4, 7)
    with torch.no_grad():
        w = (1 + (layer(x) - x) ** 2) ** -1.5
    torch.testing.assert_close(torch.diagonal(J[:, 0], dim1=0, dim2=1).T, w / w.sum(-1, keepdim=True))
    assert J[0, 0, 1].abs().max() == 0  # elements are independent


@pytest.mark.parametrize("mode", ["dense", "cg", "minres"])
def test_gradgradcheck_unconstrained(mode):
    a = torch.randn(2, 3, dtype=D, requires_grad=True)
    c = torch.randn(2, 3, dtype=D, requires_grad=True)
    assert gradgradcheck(ddn.DeclarativeLayer(P.InputHessianQuadratic(backward=mode)), (a, c))


def test_gradgradcheck_builtin_solver():
    x = torch.randn(3, 5, dtype=D, requires_grad=True)
    assert gradgradcheck(ddn.DeclarativeLayer(P.RobustAverage()), (x,))


@pytest.mark.parametrize("node,inputs", [
    (P.BallProjection, lambda: (torch.tensor([[2.0, 1.0, 0.5], [0.1, 0.2, 0.3]], dtype=D),)),
    (P.QuadraticOnSphere, lambda: (torch.randn(3, 3, dtype=D), torch.rand(3, 1, dtype=D) + 0.5)),
])
def test_gradgradcheck_constrained(node, inputs):
    xs = tuple(t.requires_grad_(True) for t in inputs())
    assert gradgradcheck(ddn.DeclarativeLayer(node()), xs)


def test_hypergradient_through_gradient():
    """d/dx of a gradient (create_graph) equals the closed form's."""
    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    layer = ddn.DeclarativeLayer(P.QuadraticOnSphere())
    r = torch.ones(3, 1, dtype=D)
    (g,) = torch.autograd.grad((layer(x, r) ** 3).sum(), x, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (g2,) = torch.autograd.grad((P.quadratic_on_sphere(x2, r) ** 3).sum(), x2, create_graph=True)
    (gg2,) = torch.autograd.grad(g2.square().sum(), x2)
    torch.testing.assert_close(gg, gg2)


def test_torch_compile_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), ddn.DeclarativeLayer(P.RobustAverage())).double()
    compiled = torch.compile(model, backend="eager")
    x = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(compiled(x), model(x))
    compiled(x).sum().backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x).sum().backward()
    for a, b in zip(g1, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(a, b)


@pytest.mark.slow
def test_torch_compile_inductor():
    model = torch.nn.Sequential(torch.nn.Linear(5, 5), ddn.DeclarativeLayer(P.RobustAverage())).double()
    x = torch.randn(3, 5, dtype=D)
    torch.testing.assert_close(torch.compile(model)(x), model(x))
