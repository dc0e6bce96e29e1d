"""Equality and inequality constraints are scale invariant: multiplying a constraint by any positive constant
changes neither the gradient nor the regularity verdict."""
from __future__ import annotations

import warnings

import pytest
import torch

import torchddn as ddn

DT = torch.float64
SCALES = [1e-8, 1e-5, 1e-2, 1.0, 1e3, 1e8]


class LinearOnSphere(ddn.EqConstDeclarativeNode):
    """min x^T y s.t. s (|y|^2 - 1) = 0: y = -x / |x|."""

    def __init__(self, s: float, **kw):
        super().__init__(**kw)
        self.s = s

    def objective(self, x, y):
        return (x * y).sum(-1)

    def equality_constraints(self, x, y):
        return self.s * ((y ** 2).sum(-1) - 1)

    def solve(self, x):
        return -x / x.norm(dim=-1, keepdim=True), None


class BallAndPlane(ddn.IneqConstDeclarativeNode):
    """min 1/2 |y - x|^2 s.t. s1 (|y|^2 - 1) <= 0, s2 (y_0 - 0.5) <= 0 (mixed active sets across the batch)."""

    def __init__(self, s1: float, s2: float, **kw):
        super().__init__(**kw)
        self.s1, self.s2 = s1, s2

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return torch.stack([self.s1 * ((y ** 2).sum(-1) - 1), self.s2 * (y[:, 0] - 0.5)], -1)

    def initial_guess(self, x):
        return torch.zeros_like(x)


def grads(node, x, w):
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ddn.DeclarativeLayer(node)(x)
        g = torch.autograd.grad((y * w).sum(), x)[0]
    nonreg = [c for c in caught if issubclass(c.category, ddn.NonRegularWarning)]
    return y.detach(), g, bool(nonreg)


@pytest.mark.parametrize("s", SCALES)
def test_equality_constraint_scale(s):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, generator=g, dtype=DT)
    w = torch.randn(5, 3, generator=g, dtype=DT)
    _, ref, _ = grads(LinearOnSphere(1.0), x, w)
    _, got, nonreg = grads(LinearOnSphere(s), x, w)
    assert not nonreg
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-10 * ref.abs().max())
    # closed form: dy/dx = -(I - y y^T) / |x| with y = x/|x|
    u = x / x.norm(dim=-1, keepdim=True)
    J = -(torch.eye(3, dtype=DT) - u[:, :, None] * u[:, None, :]) / x.norm(dim=-1)[:, None, None]
    assert torch.allclose(got, (w[:, :, None] * J).sum(1), atol=1e-10)


@pytest.mark.parametrize("s1", [1e-8, 1.0, 1e8])
@pytest.mark.parametrize("s2", [1e-6, 1.0, 1e6])
def test_inequality_constraint_scales(s1, s2):
    x = torch.tensor([[2.0, 0.0, 0.0], [0.1, 0.2, 0.0], [0.3, 2.0, 1.0], [1.0, 1.0, 0.0]], dtype=DT)
    w = torch.tensor([[1.0, 2.0, 3.0], [0.5, -1.0, 2.0], [1.0, 1.0, -1.0], [2.0, 0.3, 1.0]], dtype=DT)
    y_ref, ref, _ = grads(BallAndPlane(1.0, 1.0, tol=1e-12), x, w)

    class Scaled(BallAndPlane):  # the backward is under test: the forward returns the unscaled solution
        def solve(self, x):
            return y_ref.clone(), None

    _, got, nonreg = grads(Scaled(s1, s2), x, w)
    assert not nonreg
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-8)
    # closed forms: element 0 projects onto the plane only, to (0.5, 0, 0); element 1 is interior
    assert torch.allclose(ref[0], torch.tensor([0.0, 2.0, 3.0], dtype=DT), atol=1e-7)
    assert torch.allclose(ref[1], w[1], atol=1e-7)  # interior: dy/dx = I


@pytest.mark.parametrize("s", [1e-8, 1.0, 1e8])
def test_regularity_verdict_does_not_depend_on_scale(s):
    class Twice(ddn.EqConstDeclarativeNode):
        """The sphere written twice at different scales: dependent constraints at every scale."""

        def objective(self, x, y):
            return (x * y).sum(-1)

        def equality_constraints(self, x, y):
            h = (y ** 2).sum(-1) - 1
            return torch.stack([h, s * h], -1)

        def solve(self, x):
            return -x / x.norm(dim=-1, keepdim=True), None

    x = torch.randn(3, 3, dtype=DT, generator=torch.Generator().manual_seed(1))
    with pytest.warns(ddn.NonRegularWarning, match="dependent"):
        y = ddn.DeclarativeLayer(Twice())(x.requires_grad_(True))
        g = torch.autograd.grad(y.sum(), x)[0]
    _, ref, _ = grads(LinearOnSphere(1.0), x.detach(), torch.ones(3, 3, dtype=DT))
    assert torch.allclose(g, ref, atol=1e-8)
