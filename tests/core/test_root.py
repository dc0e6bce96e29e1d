"""Root nodes and the custom_root decorator: implicit gradients of F(x, y) = 0 for any solver."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.optimize
import torch

import torchddn as ddn
from torchddn.diagnostics import ConvergenceWarning, DDNError, NonRegularWarning
from torchddn.root import RootNode, custom_root, newton_root

DT = torch.float64


def bisect_sqrt(x: torch.Tensor) -> torch.Tensor:
    """Batched bisection for y^2 = x on [0, max(x, 1)]."""
    lo, hi = torch.zeros_like(x), x.clamp_min(1.0)
    for _ in range(200):
        mid = (lo + hi) / 2
        below = mid * mid < x
        lo, hi = torch.where(below, mid, lo), torch.where(below, hi, mid)
    return (lo + hi) / 2


sqrt = custom_root(lambda x, y: y * y - x)(bisect_sqrt)


class Kepler(RootNode):
    """Kepler's equation E - e sin E = M for the eccentric anomaly E (built-in Newton)."""

    def optimality(self, M, e, y):
        return y - e * torch.sin(y) - M

    def initial_guess(self, M, e):
        return M.clone()


def system(x, y):
    """A small non-linear system F(x, y) = 0 in R^2 with a unique root for these x."""
    return torch.stack([y[:, 0] ** 3 + y[:, 1] - x[:, 0], y[:, 1] ** 3 - y[:, 0] + x[:, 1] * y[:, 1] - x[:, 2]], 1)


def scipy_solver(x):
    """scipy.optimize.root on each element (a CPU library: explicit NumPy round trip)."""
    out = []
    for xi in x.cpu().numpy():
        def fun(y, xi=xi):
            return [y[0] ** 3 + y[1] - xi[0], y[1] ** 3 - y[0] + xi[1] * y[1] - xi[2]]
        sol = scipy.optimize.root(fun, np.zeros(2), method="hybr", tol=1e-13)
        assert np.abs(fun(sol.x)).max() < 1e-12, sol.message
        out.append(sol.x)
    return np.stack(out)


scipy_root = custom_root(system)(scipy_solver)


# ---------------------------------------------------------------------------------------------------------------
# custom_root
# ---------------------------------------------------------------------------------------------------------------

def test_sqrt_by_bisection_value_gradient_and_gradcheck():
    x = torch.tensor([0.25, 1.0, 2.0, 9.0, 30.0], dtype=DT, requires_grad=True)
    y = sqrt(x)
    torch.testing.assert_close(y, torch.sqrt(x.detach()), atol=1e-14, rtol=0)
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, 0.5 / torch.sqrt(x.detach()), atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(sqrt, (x,))
    assert torch.autograd.gradgradcheck(sqrt, (x,))  # d2y/dx2 = -1/4 x^-3/2 too


def test_scipy_solver_gradcheck_against_finite_differences_of_resolves():
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(3, 3, generator=g, dtype=DT) + torch.tensor([0.5, 1.0, -0.5], dtype=DT)).requires_grad_()
    y = scipy_root(x)
    assert float(system(x.detach(), y.detach()).abs().max()) < 1e-12
    # gradcheck's numerical Jacobian re-solves with SciPy at perturbed x: an independent check
    assert torch.autograd.gradcheck(scipy_root, (x,), atol=1e-6)
    # closed form of the IFT with an explicit Jacobian
    with torch.no_grad():
        y0 = y.detach()
        Jy = torch.stack([torch.stack([3 * y0[:, 0] ** 2, torch.ones(3, dtype=DT)], -1),
                          torch.stack([-torch.ones(3, dtype=DT), 3 * y0[:, 1] ** 2 + x[:, 1]], -1)], 1)
        Jx = torch.zeros(3, 2, 3, dtype=DT)
        Jx[:, 0, 0] = -1
        Jx[:, 1, 1] = y0[:, 1]
        Jx[:, 1, 2] = -1
        Dy = -torch.linalg.solve(Jy, Jx)
    w = torch.randn(3, 2, generator=g, dtype=DT)
    (gx,) = torch.autograd.grad((w * y).sum(), x)
    torch.testing.assert_close(gx, (w.unsqueeze(1) @ Dy).squeeze(1), atol=1e-10, rtol=0)


def test_custom_root_float32_and_numpy_output():
    x = torch.tensor([4.0, 9.0], dtype=torch.float32, requires_grad=True)
    y = sqrt(x)
    assert y.dtype == torch.float32
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, torch.tensor([0.25, 1 / 6]), atol=1e-6, rtol=0)
    y = scipy_root(torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float32))  # scipy returns float64 NumPy
    assert y.dtype == torch.float32 and y.shape == (1, 2)


# ---------------------------------------------------------------------------------------------------------------
# RootNode with the built-in Newton solver
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("backward", ["dense", "gmres"])
def test_kepler_closed_form_and_gradcheck(backward):
    M = torch.tensor([0.3, 1.0, 2.5, 4.0], dtype=DT, requires_grad=True)
    e = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=DT, requires_grad=True)
    node = Kepler(backward=backward)
    layer = ddn.DeclarativeLayer(node)
    E = layer(M, e)
    assert float((E - e * torch.sin(E) - M).detach().abs().max()) < 1e-11
    gM, ge = torch.autograd.grad(E.sum(), (M, e))
    denom = 1 - e.detach() * torch.cos(E.detach())
    torch.testing.assert_close(gM, 1 / denom, atol=1e-12, rtol=0)
    torch.testing.assert_close(ge, torch.sin(E.detach()) / denom, atol=1e-12, rtol=0)
    assert torch.autograd.gradcheck(layer, (M, e))
    assert node.diagnostics.backward_method == backward


class Cubic(RootNode):
    """Component-wise y^3 + y = x, written on (b, 2, 2) tensors: y has a non-trivial shape."""

    def optimality(self, x, y):
        return y ** 3 + y - x

    def initial_guess(self, x):
        return torch.zeros_like(x)


def test_matrix_free_newton_and_backward_match_dense():
    x = torch.randn(3, 2, 2, dtype=DT, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = {}
    for dense_max in (64, 0):  # 0: Newton-GMRES forward and GMRES backward
        y = ddn.DeclarativeLayer(Cubic(dense_max=dense_max))(x)
        (gx,) = torch.autograd.grad(y.sum(), x)
        out[dense_max] = (y.detach(), gx)
    torch.testing.assert_close(out[0][0], out[64][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(out[0][1], out[64][1], atol=1e-10, rtol=0)
    torch.testing.assert_close(out[64][1], 1 / (3 * out[64][0] ** 2 + 1), atol=1e-12, rtol=0)


def test_newton_root_flat():
    F = lambda y: y ** 3 - torch.tensor([[8.0], [27.0]], dtype=DT)  # noqa: E731
    for linear_solver in ("dense", "gmres"):
        res = newton_root(F, torch.ones(2, 1, dtype=DT), linear_solver=linear_solver)
        assert bool(res.converged.all())
        torch.testing.assert_close(res.y, torch.tensor([[2.0], [3.0]], dtype=DT))


def test_root_jacrev_and_vmap():
    layer = ddn.DeclarativeLayer(Cubic())
    x = torch.randn(2, 2, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
    J = torch.func.jacrev(layer)(x)                         # (2, 2, 2, 2, 2, 2)
    y = layer(x)
    diag = J.reshape(8, 8).diagonal()
    torch.testing.assert_close(diag, (1 / (3 * y ** 2 + 1)).reshape(-1))
    assert float(J.reshape(8, 8).fill_diagonal_(0).abs().max()) == 0.0
    ys = torch.func.vmap(layer)(torch.stack([x, 2 * x]))
    torch.testing.assert_close(ys[1], layer(2 * x))


# ---------------------------------------------------------------------------------------------------------------
# failure modes
# ---------------------------------------------------------------------------------------------------------------

def degenerate_F(x, a, y):
    """(y - x)^3 + a (y - x): root y = x with ∂F/∂y = a (singular where a = 0) and dy/dx = 1."""
    return (y - x) ** 3 + a * (y - x)


@pytest.mark.parametrize("backward", ["dense", "gmres"])
def test_singular_jacobian_warns_min_norm_not_nan(backward):
    solver = custom_root(degenerate_F, backward=backward)(lambda x, a: x.clone())
    x = torch.tensor([[0.5], [1.0], [-2.0]], dtype=DT, requires_grad=True)
    a = torch.tensor([[1.0], [0.0], [3.0]], dtype=DT)
    y = solver(x, a)
    with pytest.warns(NonRegularWarning, match=r"∂F/∂y is singular .* at batch elements \[1\]"):
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert bool(torch.isfinite(gx).all())
    torch.testing.assert_close(gx, torch.tensor([[1.0], [0.0], [1.0]], dtype=DT))
    assert solver.node.diagnostics.nonregular.tolist() == [False, True, False]


def test_newton_without_root_warns_naming_elements():
    class Sqrt(RootNode):
        def optimality(self, x, y):
            return y * y - x

        def initial_guess(self, x):
            return torch.ones_like(x)

    x = torch.tensor([4.0, -1.0, 9.0, -3.0], dtype=DT)
    node = Sqrt(max_iter=30)
    with pytest.warns(ConvergenceWarning, match=r"did not find a root at batch elements \[1, 3\]"):
        y = ddn.DeclarativeLayer(node)(x)
    torch.testing.assert_close(y[[0, 2]], torch.tensor([2.0, 3.0], dtype=DT))
    assert node.diagnostics.converged.tolist() == [True, False, True, False]
    assert bool(torch.isfinite(y).all())
    with pytest.raises(DDNError, match=r"\[1, 3\]"):
        ddn.DeclarativeLayer(Sqrt(on_failure="raise"))(x)


def test_custom_solver_returning_a_non_root_warns():
    bad = custom_root(lambda x, y: y * y - x)(lambda x: torch.sqrt(x) + torch.tensor([0.0, 0.1], dtype=DT))
    with pytest.warns(ConvergenceWarning, match=r"did not find a root at batch elements \[1\]"):
        bad(torch.tensor([1.0, 4.0], dtype=DT))


def test_shape_and_value_errors():
    wrong_shape = custom_root(lambda x, y: y * y - x)(lambda x: x[:, :1])
    with pytest.raises(DDNError, match="leading batch dimension|shape of y"):
        wrong_shape(torch.ones(3, 2, dtype=DT))
    wrong_F = custom_root(lambda x, y: (y * y - x).sum(-1))(lambda x: torch.sqrt(x))
    with pytest.raises(DDNError, match=r"optimality must return a tensor with the shape of y, \(3, 2\)"):
        wrong_F(torch.ones(3, 2, dtype=DT))
    nan_solver = custom_root(lambda x, y: y * y - x)(lambda x: torch.sqrt(x - 2))
    with pytest.raises(DDNError, match=r"NaN or Inf at batch elements \[0\]"):
        nan_solver(torch.tensor([1.0, 4.0], dtype=DT))
    with pytest.raises(DDNError, match=r"NaN or Inf at batch elements \[1\]"):
        sqrt(torch.tensor([1.0, float("nan")], dtype=DT))
    with pytest.raises(ValueError):
        Kepler(backward="no_such_solver")
    with pytest.raises(ValueError):
        Kepler(backward="unrolled")
    with pytest.raises(TypeError):
        custom_root(None)


def test_no_warnings_on_regular_problem():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ddn.DDNWarning)
        x = torch.tensor([1.0, 2.0], dtype=DT, requires_grad=True)
        sqrt(x).sum().backward()
        M = torch.tensor([1.0], dtype=DT, requires_grad=True)
        ddn.DeclarativeLayer(Kepler())(M, torch.tensor([0.5], dtype=DT)).sum().backward()
