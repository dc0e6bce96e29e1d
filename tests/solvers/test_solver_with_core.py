"""The built-in solvers as forward solvers of the generic core nodes: gradcheck and closed-form Jacobians."""
import pytest
import torch

ddn = pytest.importorskip("torchddn")
if not hasattr(ddn, "DeclarativeNode"):  # the core is not importable in this checkout
    pytest.skip("torchddn core nodes not available", allow_module_level=True)

from torchddn.solvers.scipy_adapter import ScipySolver  # noqa: E402


class Robust(ddn.DeclarativeNode):
    """Pseudo-Huber mean of each row: unconstrained, non-quadratic."""

    def initial_guess(self, x):
        return x.mean(-1, keepdim=True)

    def objective(self, x, y):
        return (torch.sqrt(1 + (y - x) ** 2) - 1).sum(-1)


class Sphere(ddn.EqConstDeclarativeNode):
    def initial_guess(self, x):
        return torch.ones_like(x)

    def objective(self, x, y):
        return ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y ** 2).sum(-1) - 1


class Ball(ddn.IneqConstDeclarativeNode):
    def initial_guess(self, x):
        return torch.zeros_like(x)

    def objective(self, x, y):
        return ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y ** 2).sum(-1) - 1


def _x():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, generator=g, dtype=torch.float64)
    x[0] *= 0.2  # inside the unit ball
    x[1] = 2 * x[1] / x[1].norm()  # outside
    return x.requires_grad_(True)


def _sphere_jacobian(x):
    n = x.norm(dim=-1, keepdim=True)
    u = x / n
    eye = torch.eye(x.shape[-1], dtype=x.dtype)
    return (eye - u[:, :, None] * u[:, None, :]) / n[:, :, None]


@pytest.mark.parametrize("solver", ["newton", "newton_cg", "lbfgs"])
def test_unconstrained_node_gradcheck(solver):
    layer = ddn.DeclarativeLayer(Robust(solver=solver))
    x = torch.randn(2, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("solver", ["sqp", "interior_point", "augmented_lagrangian", ScipySolver("SLSQP")],
                         ids=str)
def test_sphere_node_matches_closed_form(solver):
    layer = ddn.DeclarativeLayer(Sphere(solver=solver))
    x = _x()
    y = layer(x)
    torch.testing.assert_close(y, x.detach() / x.detach().norm(dim=-1, keepdim=True), atol=1e-7, rtol=0)
    v = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, v)
    ref = torch.einsum("bi,bij->bj", v, _sphere_jacobian(x.detach()))
    torch.testing.assert_close(gx, ref, atol=1e-6, rtol=0)
    if solver == "sqp":  # finite differences of re-solves (each a full forward solve: once is enough)
        assert torch.autograd.gradcheck(layer, (x[1:],), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("solver", ["interior_point", "augmented_lagrangian"])
def test_ball_node_mixed_active_set(solver):
    layer = ddn.DeclarativeLayer(Ball(solver=solver))
    x = _x()
    y = layer(x)
    xd = x.detach()
    n = xd.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(y, xd / n.clamp_min(1), atol=1e-8, rtol=0)
    v = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, v)
    J = torch.where((n > 1)[:, :, None], _sphere_jacobian(xd), torch.eye(3, dtype=xd.dtype).expand(3, 3, 3))
    torch.testing.assert_close(gx, torch.einsum("bi,bij->bj", v, J), atol=1e-6, rtol=0)
