"""Fixed-point (DEQ) nodes: forward solvers, adjoint linear solves, implicit gradients and failure modes."""
from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import torchddn as ddn
from torchddn.diagnostics import ConvergenceWarning, DDNError, NonRegularWarning
from torchddn.fixed_point import (FixedPointNode, anderson, broyden, dense_solve_general, fixed_point, gmres,
                                  neumann, picard)

DT = torch.float64


def contractive(b: int, n: int, rho: float, seed: int = 0, dtype=DT) -> torch.Tensor:
    """Random (b, n, n) matrices with spectral norm ``rho``."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(b, n, n, generator=g, dtype=dtype)
    return rho * W / torch.linalg.matrix_norm(W, 2)[:, None, None]


def matvec(W: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (W @ y.unsqueeze(-1)).squeeze(-1)


class TanhDEQ(FixedPointNode):
    """y = tanh(W y + x)."""

    def T(self, x, W, y):
        return torch.tanh(matvec(W, y) + x)

    def initial_guess(self, x, W):
        return torch.zeros_like(x)


class LinearFP(FixedPointNode):
    """y = W y + x, so y = (I - W)^-1 x."""

    def T(self, x, W, y):
        return matvec(W, y) + x

    def initial_guess(self, x, W):
        return torch.zeros_like(x)


class SmallDEQ(FixedPointNode):
    """A DEQ-style layer on (b, c, n) features: z = tanh(z Wᵀ + x Uᵀ + bias) per channel, shared weights."""

    def T(self, x, W, U, bias, y):
        return torch.tanh(y @ W.transpose(-1, -2) + x @ U.transpose(-1, -2) + bias.unsqueeze(1))

    def initial_guess(self, x, W, U, bias):
        return torch.zeros(x.shape[0], x.shape[1], W.shape[-1], dtype=x.dtype, device=x.device)


# ---------------------------------------------------------------------------------------------------------------
# forward solvers
# ---------------------------------------------------------------------------------------------------------------

def test_forward_solvers_agree_and_acceleration_pays():
    b, n = 5, 8
    W = contractive(b, n, 0.95, seed=1)
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(2))
    f = lambda z: torch.tanh(matvec(W, z) + x)  # noqa: E731
    z0 = torch.zeros(b, n, dtype=DT)
    results = {s.__name__: s(f, z0, tol=1e-12, max_iter=2000) for s in (picard, anderson, broyden)}
    for name, r in results.items():
        assert bool(r.converged.all()), name
        assert (f(r.y) - r.y).abs().max() < 1e-10, name
    ref = results["picard"].y
    for name in ("anderson", "broyden"):
        torch.testing.assert_close(results[name].y, ref, atol=1e-10, rtol=0)
        assert results[name].iterations.sum() < 0.7 * results["picard"].iterations.sum(), name
        assert bool((results[name].iterations < results["picard"].iterations).all()), name


def test_forward_solvers_per_element_masks():
    # element 0 is solved at once (T constant), element 1 needs many iterations: counts are per element
    n = 4
    W = torch.stack([torch.zeros(n, n, dtype=DT), contractive(1, n, 0.9, seed=3)[0]])
    x = torch.randn(2, n, dtype=DT, generator=torch.Generator().manual_seed(4))
    f = lambda z: torch.tanh(matvec(W, z) + x)  # noqa: E731
    for solver in (picard, anderson, broyden):
        r = solver(f, torch.zeros(2, n, dtype=DT), tol=1e-12)
        assert bool(r.converged.all())
        assert int(r.iterations[0]) <= 2 < int(r.iterations[1]), solver.__name__
        torch.testing.assert_close(r.y[0], torch.tanh(x[0]), atol=1e-12, rtol=0)


def test_forward_solver_nonconvergence_returns_best_finite_iterate():
    # element 1 diverges under Picard (spectral radius 2): it is flagged and its output stays finite
    n = 3
    W = torch.stack([0.5 * torch.eye(n, dtype=DT), 2.0 * torch.eye(n, dtype=DT)])
    x = torch.ones(2, n, dtype=DT)
    r = picard(lambda z: matvec(W, z) + x, torch.zeros(2, n, dtype=DT), max_iter=3000)
    assert r.converged.tolist() == [True, False]
    assert bool(torch.isfinite(r.y).all())


# ---------------------------------------------------------------------------------------------------------------
# linear solves
# ---------------------------------------------------------------------------------------------------------------

def test_gmres_matches_direct_solve_and_restarts():
    b, n = 4, 12
    g = torch.Generator().manual_seed(5)
    A = torch.eye(n, dtype=DT) + 0.3 * torch.randn(b, n, n, generator=g, dtype=DT) / n ** 0.5
    rhs = torch.randn(b, n, generator=g, dtype=DT)
    ref = torch.linalg.solve(A, rhs)
    for restart in (None, 4):
        x, info = gmres(lambda u: matvec(A, u), rhs, restart=restart)
        torch.testing.assert_close(x, ref, atol=1e-9, rtol=0)
        assert bool((info.residual < 1e-10).all()) and not bool(info.nonregular.any())


def test_gmres_flags_singular_elements_and_returns_least_squares():
    b, n = 3, 5
    g = torch.Generator().manual_seed(6)
    A = torch.eye(n, dtype=DT) + 0.5 * torch.randn(b, n, n, generator=g, dtype=DT)
    A[1] = 0.0                                   # zero matrix
    A[2, :, 0] = 0.0                             # rank n - 1
    rhs = torch.randn(b, n, generator=g, dtype=DT)
    x, info = gmres(lambda u: matvec(A, u), rhs)
    assert info.nonregular.tolist() == [False, True, True]
    assert bool(torch.isfinite(x).all())
    # the least-squares residual equals the one of the pseudo-inverse solution
    xp = matvec(torch.linalg.pinv(A), rhs)
    res_lsq = (matvec(A, xp) - rhs).norm(dim=1) / rhs.norm(dim=1)
    torch.testing.assert_close(info.residual, res_lsq, atol=1e-8, rtol=0)
    xd, dinfo = dense_solve_general(A, rhs)
    assert dinfo.nonregular.tolist() == [False, True, True]
    torch.testing.assert_close(xd, xp, atol=1e-10, rtol=0)


def test_neumann_converges_for_contractions_and_flags_divergence():
    n = 4
    J = torch.stack([contractive(1, n, 0.5, seed=7)[0], 1.5 * torch.eye(n, dtype=DT)])
    v = torch.ones(2, n, dtype=DT)
    u, info = neumann(lambda z: matvec(J.transpose(1, 2), z), v, max_iter=200)
    ref = torch.linalg.solve(torch.eye(n, dtype=DT) - J[0].T, v[0])
    torch.testing.assert_close(u[0], ref, atol=1e-10, rtol=0)
    assert info.residual[0] < 1e-10 and not info.residual[1] < 1e-3
    assert bool(torch.isfinite(u).all())


# ---------------------------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("forward_solver,backward_solver", [
    ("anderson", "gmres"), ("anderson", "fixed_point"), ("anderson", "dense"), ("broyden", "gmres"),
    ("picard", "gmres")])
def test_gradcheck_tanh(forward_solver, backward_solver):
    b, n = 2, 3
    W = contractive(b, n, 0.8, seed=8).requires_grad_()
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(9), requires_grad=True)
    layer = ddn.DeclarativeLayer(TanhDEQ(forward_solver=forward_solver, backward_solver=backward_solver))
    assert torch.autograd.gradcheck(layer, (x, W))


@pytest.mark.parametrize("backward_solver", ["gmres", "fixed_point", "dense"])
def test_linear_fixed_point_closed_form(backward_solver):
    # y = (I - W)^-1 x: grad_x = (I - W)^-T c, grad_W = u yᵀ for the loss <c, y>
    b, n = 3, 5
    W = contractive(b, n, 0.7, seed=10).requires_grad_()
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(11), requires_grad=True)
    c = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(12))
    y = ddn.DeclarativeLayer(LinearFP(backward_solver=backward_solver))(x, W)
    A = torch.eye(n, dtype=DT) - W.detach()
    y_ref = torch.linalg.solve(A, x.detach())
    torch.testing.assert_close(y.detach(), y_ref, atol=1e-9, rtol=0)
    gx, gW = torch.autograd.grad((c * y).sum(), (x, W))
    u = torch.linalg.solve(A.transpose(1, 2), c)
    torch.testing.assert_close(gx, u, atol=1e-9, rtol=0)
    torch.testing.assert_close(gW, u.unsqueeze(-1) * y_ref.unsqueeze(1), atol=1e-9, rtol=0)


def test_noncontractive_but_regular_linear_map():
    # spectral radius 1.5: Picard diverges but Broyden finds the fixed point; GMRES gives the exact gradient while
    # the Neumann backward cannot converge and says so (finite output)
    n = 3
    W = torch.diag(torch.tensor([1.5, 0.2, -0.3], dtype=DT)).expand(2, n, n).clone()
    x = torch.randn(2, n, dtype=DT, generator=torch.Generator().manual_seed(13), requires_grad=True)
    u_ref = torch.linalg.solve((torch.eye(n, dtype=DT) - W).transpose(1, 2), torch.ones(2, n, dtype=DT))
    y = ddn.DeclarativeLayer(LinearFP(forward_solver="broyden", backward_solver="gmres"))(x, W)
    torch.testing.assert_close(y.detach(), torch.linalg.solve(torch.eye(n, dtype=DT) - W, x.detach()))
    (gx,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(gx, u_ref)
    y = ddn.DeclarativeLayer(LinearFP(forward_solver="broyden", backward_solver="fixed_point"))(x, W)
    with pytest.warns(ConvergenceWarning, match=r"did not converge at batch elements \[0, 1\]"):
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert bool(torch.isfinite(gx).all())


def test_small_deq_layer_gradcheck_and_unrolled_reference():
    b, c, n, d = 2, 2, 4, 3
    g = torch.Generator().manual_seed(14)
    W = (0.6 * torch.randn(n, n, generator=g, dtype=DT) / n ** 0.5).requires_grad_()
    U = torch.randn(n, d, generator=g, dtype=DT).requires_grad_()
    bias = torch.randn(n, generator=g, dtype=DT).requires_grad_()
    x = torch.randn(b, c, d, generator=g, dtype=DT, requires_grad=True)
    layer = ddn.DeclarativeLayer(SmallDEQ())

    def f(x, W, U, bias):
        return layer(x, W.expand(b, n, n), U.expand(b, n, d), bias.expand(b, n))

    assert torch.autograd.gradcheck(f, (x, W, U, bias))
    # independent reference: autograd through many unrolled iterations
    y = f(x, W, U, bias)
    z = torch.zeros_like(y)
    for _ in range(300):
        z = torch.tanh(z @ W.T + x @ U.T + bias)
    torch.testing.assert_close(y.detach(), z.detach(), atol=1e-10, rtol=0)
    w = torch.randn(y.shape, generator=g, dtype=DT)
    ours = torch.autograd.grad((w * y).sum(), (x, W, U, bias))
    ref = torch.autograd.grad((w * z).sum(), (x, W, U, bias))
    for a, r in zip(ours, ref):
        torch.testing.assert_close(a, r, atol=1e-9, rtol=1e-9)


def test_double_backward_and_jacrev():
    b, n = 2, 2
    W = contractive(b, n, 0.8, seed=15).requires_grad_()
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(16), requires_grad=True)
    layer = ddn.DeclarativeLayer(TanhDEQ())
    assert torch.autograd.gradgradcheck(layer, (x, W))
    assert torch.autograd.gradgradcheck(ddn.DeclarativeLayer(TanhDEQ(backward_solver="dense")), (x, W))
    # jacrev (vmapped backward) against the closed-form Jacobian (I - D W)^-1 D, D = diag(1 - y^2)
    J = torch.func.jacrev(lambda x: layer(x, W.detach()))(x.detach())
    J = J[torch.arange(b), :, torch.arange(b)]
    y = layer(x, W).detach()
    D = torch.diag_embed(1 - y ** 2)
    torch.testing.assert_close(J, torch.linalg.solve(torch.eye(n, dtype=DT) - D @ W.detach(), D))
    # vmap of the forward folds the mapped dimension into the batch
    xs = torch.stack([x.detach(), 2 * x.detach()])
    ys = torch.func.vmap(lambda t: layer(t, W.detach()))(xs)
    torch.testing.assert_close(ys[1], layer(2 * x.detach(), W.detach()))


def test_phantom_gradient_close_descent_and_equals_unrolled():
    b, n = 3, 6
    W = contractive(b, n, 0.6, seed=17)
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(18), requires_grad=True)
    target = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(19))

    def loss(node):
        y = ddn.DeclarativeLayer(node)(x, W)
        return ((y - target) ** 2).sum(), y

    l_exact, y = loss(TanhDEQ())
    (g_exact,) = torch.autograd.grad(l_exact, x)
    errors = []
    for k in (1, 3, 10, 30):
        lk, _ = loss(TanhDEQ(phantom=k, damping=0.8))
        (gk,) = torch.autograd.grad(lk, x)
        errors.append(float((gk - g_exact).norm() / g_exact.norm()))
        assert float((gk * g_exact).sum()) > 0  # a descent direction
    assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-6 and errors[1] < 0.3
    # a small step along the phantom gradient decreases the loss
    lk, _ = loss(TanhDEQ(phantom=3, damping=0.8))
    (g3,) = torch.autograd.grad(lk, x)
    with torch.no_grad():
        x_new = x - 1e-2 * g3
        y_new = ddn.DeclarativeLayer(TanhDEQ())(x_new, W)
        assert ((y_new - target) ** 2).sum() < l_exact
    # phantom(k) is exactly the gradient of k damped unrolled steps started at y*
    ys = y.detach()
    z = ys
    for _ in range(3):
        z = 0.2 * z + 0.8 * torch.tanh(matvec(W, z) + x)
    (g_unrolled,) = torch.autograd.grad(((z - target) ** 2).sum(), x)
    torch.testing.assert_close(g3, g_unrolled, atol=1e-8, rtol=1e-8)
    with pytest.raises(DDNError, match="first-order"):
        y = ddn.DeclarativeLayer(TanhDEQ(phantom=3))(x, W)
        (g,) = torch.autograd.grad(y.sum(), x, create_graph=True)
        torch.autograd.grad(g.sum(), x)


@settings(max_examples=15, deadline=None)
@given(n=st.integers(1, 5), rho=st.floats(0.0, 0.9), seed=st.integers(0, 2 ** 16))
def test_property_linear_gradient(n, rho, seed):
    W = contractive(2, n, rho, seed=seed)
    x = torch.randn(2, n, dtype=DT, generator=torch.Generator().manual_seed(seed + 1), requires_grad=True)
    y = ddn.DeclarativeLayer(LinearFP())(x, W)
    (gx,) = torch.autograd.grad(y.sum(), x)
    u = torch.linalg.solve((torch.eye(n, dtype=DT) - W).transpose(1, 2), torch.ones(2, n, dtype=DT))
    torch.testing.assert_close(gx, u, atol=1e-9, rtol=1e-9)


def test_functional_form_and_diagnostics():
    b, n = 2, 4
    W = contractive(b, n, 0.5, seed=20)
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(21), requires_grad=True)
    y = fixed_point(lambda x, W, y: torch.tanh(matvec(W, y) + x), x, W, y0=torch.zeros(b, n, dtype=DT))
    node = TanhDEQ()
    layer = ddn.DeclarativeLayer(node)
    torch.testing.assert_close(y, layer(x, W))
    assert bool(node.diagnostics.converged.all()) and float(node.diagnostics.residual.max()) < 1e-9
    layer(x, W).sum().backward()
    assert node.diagnostics.backward_method == "gmres"
    assert float(node.diagnostics.linear_residual.max()) < 1e-9
    assert torch.autograd.gradcheck(
        lambda x: fixed_point(lambda x, W, y: torch.tanh(matvec(W, y) + x), x, W, y0=lambda x, W: 0 * x), (x,))


def test_float32():
    b, n = 3, 5
    W64 = contractive(b, n, 0.8, seed=22)
    x64 = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(23))
    out = {}
    for dtype in (torch.float32, torch.float64):
        x = x64.to(dtype).requires_grad_()
        y = ddn.DeclarativeLayer(TanhDEQ())(x, W64.to(dtype))
        assert y.dtype == dtype
        (gx,) = torch.autograd.grad(y.sum(), x)
        out[dtype] = (y.detach().double(), gx.double())
    torch.testing.assert_close(out[torch.float32][0], out[torch.float64][0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[torch.float32][1], out[torch.float64][1], atol=1e-3, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# bad inputs and failure modes
# ---------------------------------------------------------------------------------------------------------------

def test_nonconvergence_warns_naming_elements():
    n = 3
    W = torch.stack([0.5 * torch.eye(n, dtype=DT), 0.5 * torch.eye(n, dtype=DT), 2.0 * torch.eye(n, dtype=DT)])
    x = torch.ones(3, n, dtype=DT)
    node = LinearFP(forward_solver="picard", max_iter=200)
    with pytest.warns(ConvergenceWarning, match=r"did not converge at batch elements \[2\]"):
        y = ddn.DeclarativeLayer(node)(x, W)
    assert node.diagnostics.converged.tolist() == [True, True, False]
    assert bool(torch.isfinite(y).all())
    with pytest.raises(DDNError, match=r"\[2\]"):
        ddn.DeclarativeLayer(LinearFP(forward_solver="picard", max_iter=200, on_failure="raise"))(x, W)


@pytest.mark.parametrize("forward_solver", ["anderson", "broyden", "picard"])
def test_nan_from_T_is_reported_per_element(forward_solver):
    # y = log(y) + x has the attracting fixed point y ~ 3.146 for x = 2; for x = -5 the first step is negative and
    # log gives NaN: that element is named, the others are unaffected and the output stays finite
    class Log(FixedPointNode):
        def T(self, x, y):
            return torch.log(y) + x

        def initial_guess(self, x):
            return torch.ones_like(x)

    x = torch.tensor([[2.0], [-5.0], [2.5]], dtype=DT, requires_grad=True)
    node = Log(forward_solver=forward_solver)
    with pytest.warns(ConvergenceWarning, match=r"did not converge at batch elements \[1\]"):
        y = ddn.DeclarativeLayer(node)(x)
    assert bool(torch.isfinite(y).all())
    for i in (0, 2):
        torch.testing.assert_close(y[i], torch.log(y[i]) + x[i].detach(), atol=1e-9, rtol=0)
    # dy/dx = 1 / (1 - 1/y) on the converged elements
    (gx,) = torch.autograd.grad(y[[0, 2]].sum(), x)
    torch.testing.assert_close(gx[[0, 2]], 1 / (1 - 1 / y[[0, 2]].detach()))


def test_gradient_and_jacobian_methods():
    b, n = 2, 3
    W = contractive(b, n, 0.5, seed=24)
    x = torch.randn(b, n, dtype=DT, generator=torch.Generator().manual_seed(25))
    node = LinearFP()
    gx, gW = node.gradient(x, W)                      # solves, v = ones
    A = torch.eye(n, dtype=DT) - W
    torch.testing.assert_close(gx, torch.linalg.solve(A.transpose(1, 2), torch.ones(b, n, dtype=DT)))
    Jx, _ = node.jacobian(x, W)
    torch.testing.assert_close(Jx, torch.linalg.inv(A))


def test_wrong_output_shape_of_T():
    class Bad(TanhDEQ):
        def T(self, x, W, y):
            return super().T(x, W, y)[:, :-1]

    x = torch.randn(2, 3, dtype=DT)
    with pytest.raises(DDNError, match=r"Bad.T must return a tensor with the shape of y, \(2, 3\)"):
        ddn.DeclarativeLayer(Bad())(x, contractive(2, 3, 0.5))


def test_bad_initial_guess_and_inputs():
    class NaNStart(TanhDEQ):
        def initial_guess(self, x, W):
            y0 = torch.zeros_like(x)
            y0[1, 0] = float("nan")
            return y0

    x = torch.randn(3, 2, dtype=DT)
    W = contractive(3, 2, 0.5)
    with pytest.raises(DDNError, match=r"initial_guess returned NaN or Inf at batch elements \[1\]"):
        ddn.DeclarativeLayer(NaNStart())(x, W)
    x[2, 1] = float("inf")
    with pytest.raises(DDNError, match=r"\[2\]"):
        ddn.DeclarativeLayer(TanhDEQ())(x, W)
    for bad in ({"forward_solver": "newton"}, {"backward_solver": "cg"}, {"phantom": 0}, {"damping": 0.0}):
        with pytest.raises(ValueError):
            TanhDEQ(**bad)


class Degenerate(FixedPointNode):
    """y = y - (y - x)^3 - a (y - x): fixed point y = x, I - ∂T/∂y = a (singular where a = 0), dy/dx = 1."""

    def T(self, x, a, y):
        return y - (y - x) ** 3 - a * (y - x)

    def initial_guess(self, x, a):
        return x.clone()


@pytest.mark.parametrize("backward_solver", ["gmres", "dense"])
def test_singular_jacobian_warns_and_stays_finite(backward_solver):
    x = torch.tensor([[0.3], [0.7], [-1.0]], dtype=DT, requires_grad=True)
    a = torch.tensor([[0.5], [0.0], [2.0]], dtype=DT)
    node = Degenerate(backward_solver=backward_solver)
    y = ddn.DeclarativeLayer(node)(x, a)
    with pytest.warns(NonRegularWarning, match=r"I - ∂T/∂y is singular .* at batch elements \[1\]"):
        (gx,) = torch.autograd.grad(y.sum(), x)
    assert bool(torch.isfinite(gx).all())
    torch.testing.assert_close(gx[[0, 2]], torch.ones(2, 1, dtype=DT))
    assert node.diagnostics.nonregular.tolist() == [False, True, False]


def test_no_warnings_on_regular_problem():
    x = torch.randn(2, 3, dtype=DT, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ddn.DDNWarning)
        y = ddn.DeclarativeLayer(TanhDEQ())(x, contractive(2, 3, 0.5))
        y.sum().backward()
