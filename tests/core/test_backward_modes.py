"""The backward switch: implicit (dense/cg/minres), unrolled, truncated and Jacobian-free."""
import pytest
import torch

import torchddn as ddn
from tests.core import problems as P

D = torch.float64


def _grad(node, *inputs, v=None):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y = ddn.DeclarativeLayer(node)(*inputs)
    v = torch.ones_like(y) if v is None else v
    return torch.autograd.grad((y * v).sum(), inputs)


def _fd_resolve(node, x, v, eps=1e-6):
    """Central finite differences of re-solves: an independent check of v^T dy/dx."""
    layer = ddn.DeclarativeLayer(node)
    g = torch.zeros_like(x)
    with torch.no_grad():
        for idx in range(x[0].numel()):
            e = torch.zeros_like(x).reshape(x.shape[0], -1)
            e[:, idx] = eps
            e = e.reshape(x.shape)
            g.reshape(x.shape[0], -1)[:, idx] = ((layer(x + e) - layer(x - e)) * v).reshape(x.shape[0], -1).sum(-1) \
                / (2 * eps)
    return g


@pytest.mark.parametrize("mode", ["auto", "dense", "cg", "minres"])
def test_implicit_matches_finite_differences(mode):
    x = torch.randn(3, 6, dtype=D)
    v = torch.randn(3, 1, dtype=D)
    (g,) = _grad(P.RobustAverage(backward=mode), x, v=v)
    torch.testing.assert_close(g, _fd_resolve(P.RobustAverage(), x, v), atol=1e-7, rtol=1e-6)


def test_unrolled_agrees_with_implicit_at_convergence():
    x = torch.randn(3, 6, dtype=D)
    (g_imp,) = _grad(P.RobustAverage(), x)
    (g_unr,) = _grad(P.RobustAverage(backward="unrolled", unroll_steps=200), x)
    torch.testing.assert_close(g_unr, g_imp, atol=1e-8, rtol=1e-8)
    (g_newton,) = _grad(P.RobustAverage(backward="unrolled", unroll_method="newton", unroll_steps=10), x)
    torch.testing.assert_close(g_newton, g_imp, atol=1e-10, rtol=1e-10)


def test_unrolled_few_steps_is_inexact():
    x = torch.randn(3, 6, dtype=D) * 3
    (g_imp,) = _grad(P.RobustAverage(), x)
    (g_unr,) = _grad(P.RobustAverage(backward="unrolled", unroll_steps=2), x)
    assert (g_unr - g_imp).abs().max() > 1e-3


def test_truncated_newton_is_exact_and_gd_approximate():
    x = torch.randn(3, 6, dtype=D)
    (g_imp,) = _grad(P.RobustAverage(), x)
    (g_tn,) = _grad(P.RobustAverage(backward="truncated", unroll_method="newton", unroll_steps=1), x)
    torch.testing.assert_close(g_tn, g_imp)  # one Newton step from y* has the implicit derivative
    (g_gd,) = _grad(P.RobustAverage(backward="truncated", unroll_steps=50), x)
    torch.testing.assert_close(g_gd, g_imp, atol=1e-3, rtol=1e-3)


def test_unrolled_constrained_newton():
    x = torch.randn(4, 3, dtype=D) * 2
    v = torch.randn(4, 3, dtype=D)
    g_imp, _ = _grad(P.QuadraticOnSphere(), x, torch.ones(4, 1, dtype=D), v=v)
    g_unr, _ = _grad(P.QuadraticOnSphere(backward="truncated", unroll_steps=3), x, torch.ones(4, 1, dtype=D), v=v)
    torch.testing.assert_close(g_unr, g_imp, atol=1e-8, rtol=1e-8)
    with pytest.raises(ddn.DDNError, match="unroll_method='gd' needs an unconstrained node"):
        _grad(P.QuadraticOnSphere(backward="unrolled", unroll_method="gd"), x, torch.ones(4, 1, dtype=D))


@pytest.mark.parametrize("jf", ["identity", "diagonal"])
def test_jacobian_free_is_descent_direction_on_convex(jf):
    """f = 1/2 y^T Q(a) y - c^T y is convex with B = -I in c: -B^T v = v vs the true H^-1 v."""
    torch.manual_seed(0)
    a = torch.randn(5, 4, dtype=D)
    c = torch.randn(5, 4, dtype=D)
    v = torch.randn(5, 4, dtype=D)
    _, g_true = _grad(P.InputHessianQuadratic(), a, c, v=v)
    _, g_jf = _grad(P.InputHessianQuadratic(backward="jacobian_free", jf_hessian=jf), a, c, v=v)
    assert ((g_true * g_jf).sum(-1) > 0).all()
    if jf == "diagonal":  # the Hessian is diagonal here, so its diagonal is exact
        torch.testing.assert_close(g_jf, g_true)
    else:
        assert (g_jf - g_true).abs().max() > 1e-2
