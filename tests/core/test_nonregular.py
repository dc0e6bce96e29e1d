"""Non-regular points: minimum-norm gradients with a warning that names the condition, never NaN."""
import pytest
import torch

import torchddn as ddn
from tests.core import problems as P

D = torch.float64


def _grad(layer, *inputs, v=None):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = layer(*inputs)
    v = torch.ones_like(y) if v is None else v
    return torch.autograd.grad((y * v).sum(), inputs)


class FlatDirection(ddn.DeclarativeNode):
    """f = 1/2 (y1 - x1)^2 : H = diag(1, 0) is singular; y2 is undetermined (the solver keeps y2 = 0)."""

    def objective(self, x, y):
        return 0.5 * (y[:, 0] - x[:, 0]) ** 2 + 0 * y[:, 1]

    def solve(self, x):
        return torch.stack([x[:, 0], torch.zeros_like(x[:, 0])], -1), None


@pytest.mark.parametrize("mode", ["dense", "cg", "minres"])
def test_singular_hessian_min_norm(mode):
    x = torch.randn(3, 2, dtype=D)
    v = torch.tensor([[1.0, 1.0]], dtype=D).expand(3, 2)
    layer = ddn.DeclarativeLayer(FlatDirection(backward=mode))
    with pytest.warns(ddn.NonRegularWarning, match="singular"):
        (g,) = _grad(layer, x, v=v)
    assert torch.isfinite(g).all()
    # minimum-norm solution of H u = v is u = (1, 0): dy/dx1 = 1 for y1, nothing for y2
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0]], dtype=D).expand(3, 2))


def test_singular_diagnostics_flag():
    layer = ddn.DeclarativeLayer(FlatDirection(backward="dense"))
    with pytest.warns(ddn.NonRegularWarning):
        _grad(layer, torch.randn(2, 2, dtype=D))
    assert layer.diagnostics.nonregular.all()


class DuplicatedSphere(P.QuadraticOnSphere):
    """The sphere constraint written twice: dependent constraints."""

    def equality_constraints(self, x, r, y):
        h = super().equality_constraints(x, r, y)
        return torch.stack([h, 2 * h], -1)


def test_dependent_constraints_warn_and_match_single():
    x = torch.randn(4, 3, dtype=D)
    r = torch.ones(4, 1, dtype=D)
    v = torch.randn(4, 3, dtype=D)
    with pytest.warns(ddn.NonRegularWarning, match="dependent"):
        g_dup = _grad(ddn.DeclarativeLayer(DuplicatedSphere()), x, r, v=v)
    g_one = _grad(ddn.DeclarativeLayer(P.QuadraticOnSphere()), x, r, v=v)
    for a, b in zip(g_dup, g_one):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


class SquaredSphere(ddn.EqConstDeclarativeNode):
    """h = (||y||^2 - 1)^2 has a vanishing gradient on the solution set."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return ((y ** 2).sum(-1) - 1) ** 2

    def solve(self, x):
        return x / x.norm(dim=-1, keepdim=True), None


def test_vanishing_constraint_gradient_warns_no_nan():
    layer = ddn.DeclarativeLayer(SquaredSphere(on_failure="ignore"))
    node_warn = ddn.DeclarativeLayer(SquaredSphere())
    x = torch.randn(3, 2, dtype=D) * 2
    with pytest.warns(ddn.NonRegularWarning, match="vanishing constraint gradient"):
        (g,) = _grad(node_warn, x)
    assert torch.isfinite(g).all()
    (g2,) = _grad(layer, x)
    assert torch.isfinite(g2).all()


def test_weakly_active_constraint_warns_one_sided():
    x = torch.randn(3, 3, dtype=D)
    x = x / x.norm(dim=-1, keepdim=True)  # exactly on the sphere: multiplier zero
    v = torch.randn(3, 3, dtype=D)
    with pytest.warns(ddn.NonRegularWarning, match="weakly active"):
        (g,) = _grad(ddn.DeclarativeLayer(P.BallProjection()), x, v=v)
    # one-sided gradient with the constraint held active: the tangent projection (I - y y^T) v
    expected = v - x * (x * v).sum(-1, keepdim=True)
    torch.testing.assert_close(g, expected)


class Saddle(ddn.DeclarativeNode):
    """f = 1/2 (y1 - x1)^2 - 1/2 (y2 - x2)^2 : the returned stationary point is a saddle."""

    def objective(self, x, y):
        return 0.5 * (y[:, 0] - x[:, 0]) ** 2 - 0.5 * (y[:, 1] - x[:, 1]) ** 2

    def solve(self, x):
        return x.clone(), None


@pytest.mark.parametrize("mode", ["dense", "cg"])
def test_indefinite_hessian_warns(mode):
    v = torch.tensor([[1.0, 2.0], [0.5, 3.0]], dtype=D)  # v^T H v < 0: CG meets the negative curvature at once
    with pytest.warns(ddn.NonRegularWarning, match="indefinite"):
        (g,) = _grad(ddn.DeclarativeLayer(Saddle(backward=mode)), torch.randn(2, 2, dtype=D), v=v)
    torch.testing.assert_close(g, v)  # y = x exactly; the formula still holds
