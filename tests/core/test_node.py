"""Exactness of the implicit gradients (Props. 4.4-4.6) against closed forms, gradcheck and each other."""
import pytest
import torch
from torch.autograd import gradcheck

import torchddn as ddn
from tests.core import problems as P

D = torch.float64


def _grads(fn, inputs, v):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    return out, torch.autograd.grad((out * v).sum(), inputs)


def _cases():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 5, dtype=D, generator=g)
    c = torch.randn(4, 5, dtype=D, generator=g)
    x = torch.randn(4, 3, dtype=D, generator=g)
    r = torch.rand(4, 1, dtype=D, generator=g) + 0.5
    xb = torch.randn(6, 3, dtype=D, generator=g)
    xb[:3] *= 3  # outside the ball
    xb[3:] *= 0.1  # inside
    xx = torch.randn(5, 4, dtype=D, generator=g) * 1.5
    lo = -torch.rand(5, 4, dtype=D, generator=g) - 0.2
    hi = torch.rand(5, 4, dtype=D, generator=g) + 0.2
    w = torch.rand(4, 5, dtype=D, generator=g) + 0.5
    return {
        "input_hessian_quadratic": (P.InputHessianQuadratic, P.input_hessian_quadratic, (a, c)),
        "linear_on_circle": (P.LinearOnCircle, P.linear_on_circle, (x,)),
        "quadratic_on_sphere": (P.QuadraticOnSphere, P.quadratic_on_sphere, (x, r)),
        "ball_mixed_inside_outside": (P.BallProjection, P.ball_projection, (xb,)),
        "box_mixed_active_counts": (P.BoxProjection, P.box_projection, (xx, lo, hi)),
        "weighted_hyperplane": (P.WeightedHyperplane, P.weighted_hyperplane, (c, w)),
    }


CASES = _cases()
MODES = ["dense", "cg", "minres"]


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", MODES)
def test_gradcheck(name, mode):
    cls, _, inputs = CASES[name]
    layer = ddn.DeclarativeLayer(cls(backward=mode))
    inputs = tuple(t.clone().requires_grad_(True) for t in inputs)
    assert gradcheck(layer, inputs, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("mode", ["auto"] + MODES)
def test_matches_closed_form(name, mode):
    cls, closed, inputs = CASES[name]
    layer = ddn.DeclarativeLayer(cls(backward=mode))
    v = torch.randn_like(closed(*inputs))
    y1, g1 = _grads(layer, inputs, v)
    y2, g2 = _grads(closed, inputs, v)
    torch.testing.assert_close(y1, y2, atol=1e-12, rtol=0)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("name", list(CASES))
def test_modes_agree(name):
    cls, closed, inputs = CASES[name]
    v = torch.randn_like(closed(*inputs))
    grads = [_grads(ddn.DeclarativeLayer(cls(backward=m)), inputs, v)[1] for m in MODES]
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert (a - b).abs().max() <= 1e-8


def test_box_active_sets_differ_per_element():
    cls, _, inputs = CASES["box_mixed_active_counts"]
    layer = ddn.DeclarativeLayer(cls())
    layer(*inputs)
    counts = layer.diagnostics.active.sum(-1)
    assert len(set(counts.tolist())) >= 3, counts  # one batched computation, several active-set sizes


def test_ball_active_set_is_reported():
    _, _, (xb,) = CASES["ball_mixed_inside_outside"]
    layer = ddn.DeclarativeLayer(P.BallProjection())
    layer(xb)
    assert layer.diagnostics.active.squeeze(-1).tolist() == [True] * 3 + [False] * 3


def test_linear_equality_includes_constraint_correction():
    """The reference code's linear-equality node returns the unconstrained gradient; ours must not."""
    _, closed, (x, w) = CASES["weighted_hyperplane"]
    v = torch.randn_like(x)
    _, (gx, _) = _grads(ddn.DeclarativeLayer(P.WeightedHyperplane()), (x, w), v)
    # unconstrained formula: y = x locally, so dy/dx = I would give gx = v
    assert (gx - v).abs().max() > 1e-2
    _, (gx_ref, _) = _grads(closed, (x, w), v)
    torch.testing.assert_close(gx, gx_ref)


def test_multipliers_from_ctx_match_recovered():
    class SphereWithNu(P.QuadraticOnSphere):
        def solve(self, x, r):
            y = r * x / x.norm(dim=-1, keepdim=True)
            # grad f = y - x = nu * 2y  ->  nu = (1 - |x|/r) / 2
            nu = 0.5 * (1 - x.norm(dim=-1, keepdim=True) / r)
            return y, {"nu": nu}

    _, _, (x, r) = CASES["quadratic_on_sphere"]
    v = torch.randn_like(x)
    _, g1 = _grads(ddn.DeclarativeLayer(SphereWithNu()), (x, r), v)
    _, g2 = _grads(ddn.DeclarativeLayer(P.QuadraticOnSphere()), (x, r), v)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)


def test_wrong_multipliers_from_ctx_change_the_gradient():
    """A test that could fail: the multipliers in ctx are really used."""
    class SphereWrongNu(P.QuadraticOnSphere):
        def solve(self, x, r):
            y, _ = super().solve(x, r)
            return y, {"nu": torch.zeros(x.shape[0], 1, dtype=x.dtype)}

    _, _, (x, r) = CASES["quadratic_on_sphere"]
    v = torch.randn_like(x)
    node = SphereWrongNu(on_failure="ignore")
    with torch.no_grad():  # as in a first-order backward
        y, ctx = node.solve(x, r)
        g_wrong = node.gradient(x, r, y=y, v=v, ctx=ctx)[0]
    _, (g_ok, _) = _grads(ddn.DeclarativeLayer(P.QuadraticOnSphere()), (x, r), v)
    assert (g_wrong - g_ok).abs().max() > 1e-3


def test_builtin_solver_robust_average_closed_form():
    x = torch.randn(5, 9, dtype=D)
    layer = ddn.DeclarativeLayer(P.RobustAverage())
    v = torch.randn(5, 1, dtype=D)
    y, (g,) = _grads(layer, (x,), v)
    z = y.detach() - x
    wts = (1 + z ** 2) ** -1.5
    torch.testing.assert_close(g, v * wts / wts.sum(-1, keepdim=True))
    assert layer.diagnostics.converged.all()
    # the solver's rule is relative (|g| L / max(|f|, |f0|, |g0| L) <= 1e-10, L = |y|): with y near 0 the absolute
    # gradient can end a little above 1e-9
    assert (layer.diagnostics.residual < 1e-8).all()


def test_gradient_and_jacobian_methods():
    node = P.InputHessianQuadratic()
    a, c = CASES["input_hessian_quadratic"][2]
    ja, jc = node.jacobian(a, c)
    assert ja.shape == (4, 5, 5) and jc.shape == (4, 5, 5)
    torch.testing.assert_close(jc, torch.diag_embed(torch.exp(-a)))
    torch.testing.assert_close(ja, torch.diag_embed(-c * torch.exp(-a)))
    ga, gc = node.gradient(a, c)  # solves itself, v = ones
    torch.testing.assert_close(gc, torch.exp(-a))


def test_inputs_without_grad_get_none_and_nontensor_args():
    class Scaled(ddn.DeclarativeNode):
        def objective(self, x, w, scale, y):
            return 0.5 * scale * (w * (y - x) ** 2).sum(-1)

        def solve(self, x, w, scale):
            return x.clone(), None

    x = torch.randn(3, 4, dtype=D, requires_grad=True)
    w = torch.rand(3, 4, dtype=D) + 1
    y = ddn.DeclarativeLayer(Scaled())(x, w, 2.0)
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones_like(x))
    assert w.grad is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes_and_sequential(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), ddn.DeclarativeLayer(P.RobustAverage()),
                                torch.nn.Linear(1, 2)).to(dtype)
    x = torch.randn(4, 6, dtype=dtype)
    out = model(x)
    assert out.dtype == dtype and out.shape == (4, 2)
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_y_of_any_shape():
    class MatrixNode(ddn.DeclarativeNode):
        def objective(self, x, y):  # x (b, 2, 3), y (b, 2, 3)
            return 0.5 * ((y - x) ** 2).sum((-1, -2)) + 0.25 * (y ** 4).sum((-1, -2))

        def initial_guess(self, x):
            return torch.zeros_like(x)

    x = torch.randn(3, 2, 3, dtype=D, requires_grad=True)
    layer = ddn.DeclarativeLayer(MatrixNode())
    assert gradcheck(layer, (x,))
    y = layer(x)
    torch.testing.assert_close(y + y ** 3, x.detach(), atol=1e-9, rtol=0)


@pytest.mark.parametrize("mode", MODES)
def test_gamma_damping(mode):
    """backward with H + gamma I: for the diagonal quadratic, dy/dc becomes 1 / (exp(a) + gamma)."""
    a, c = CASES["input_hessian_quadratic"][2]
    v = torch.randn_like(c)
    _, (_, gc) = _grads(ddn.DeclarativeLayer(P.InputHessianQuadratic(backward=mode, gamma=0.5)), (a, c), v)
    torch.testing.assert_close(gc, v / (torch.exp(a) + 0.5))
