"""One backward vocabulary for every node kind (torchddn.backward values) and linear solvers as values."""
from __future__ import annotations

import pytest
import torch

import torchddn as ddn
from torchddn import linalg
from torchddn.backward import Implicit, JacobianFree, Phantom, Truncated, Unrolled
from torchddn.fixed_point import FixedPointNode
from torchddn.root import RootNode, custom_root

DT = torch.float64


class Coupled(ddn.DeclarativeNode):
    """min_y 1/2 y^T Q y - x^T y + 1/4 sum y^4 with a fixed SPD Q (m = 40): coupled, smooth, strongly convex."""

    def __init__(self, **kw):
        super().__init__(**kw)
        g = torch.Generator().manual_seed(0)
        B = torch.randn(40, 40, generator=g, dtype=DT) / 40 ** 0.5
        self.Q = B @ B.T + torch.diag(torch.logspace(-1, 2, 40, dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y @ self.Q) * y).sum(-1) - (x * y).sum(-1) + 0.25 * (y ** 4).sum(-1)

    def initial_guess(self, x):
        return torch.zeros_like(x)


def input_grad(node, x, w):
    x = x.clone().requires_grad_(True)
    y = ddn.DeclarativeLayer(node)(x)
    return torch.autograd.grad((y * w).sum(), x)[0], node.diagnostics


def user_cg(matvec, b):
    """A plain user-written CG (no preconditioner), the user-callable interface."""
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = (r * r).sum(-1, keepdim=True)
    for _ in range(400):
        Ap = matvec(p)
        a = rs / (p * Ap).sum(-1, keepdim=True)
        x, r = x + a * p, r - a * Ap
        rs_new = (r * r).sum(-1, keepdim=True)
        if bool((rs_new.sqrt() < 1e-13).all()):
            break
        p, rs = r + rs_new / rs * p, rs_new
    return x


@pytest.mark.parametrize("backward", [Implicit(linalg.CG(precond="jacobi")), linalg.CG(), linalg.MINRES(),
                                      Implicit(linalg.GMRES()), "bicgstab", user_cg, Implicit(linalg.Dense())],
                         ids=repr)
def test_unconstrained_solver_values_match_dense(backward):
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(3, 40, generator=g, dtype=DT), torch.randn(3, 40, generator=g, dtype=DT)
    ref, _ = input_grad(Coupled(backward="dense", tol=1e-12), x, w)
    got, diag = input_grad(Coupled(backward=backward, tol=1e-12, linear_tol=1e-12), x, w)
    assert torch.allclose(got, ref, rtol=1e-8, atol=1e-10)


class Badly(ddn.DeclarativeNode):
    """A badly scaled, weakly coupled quadratic (m = 200): Jacobi preconditioning matters."""

    def objective(self, x, y):
        d = torch.logspace(0, 5, y.shape[-1], dtype=y.dtype)
        return 0.5 * (d * y * y).sum(-1) - (x * y).sum(-1) + 0.5 * ((y[:, 1:] - y[:, :-1]) ** 2).sum(-1)

    def initial_guess(self, x):
        return torch.zeros_like(x)


class BadlyWithDiagonal(Badly):
    def hessian_diagonal(self, x, y):
        d = torch.logspace(0, 5, y.shape[-1], dtype=y.dtype).expand_as(y).clone()
        d[:, 1:-1] += 2
        d[:, 0] += 1
        d[:, -1] += 1
        return d


@pytest.mark.parametrize("cls, solver", [(Badly, linalg.CG(precond="jacobi", max_iter=5000)),
                                         (BadlyWithDiagonal, "cg"), (BadlyWithDiagonal, "auto")])
def test_jacobi_preconditioned_cg_takes_fewer_iterations(cls, solver):
    """Jacobi CG (the exact diagonal when asked for, the node's hessian_diagonal hook by default) against plain CG,
    same gradient."""
    x = torch.randn(2, 200, dtype=DT, generator=torch.Generator().manual_seed(4))
    w = torch.ones_like(x)
    plain = Badly(backward=linalg.CG(max_iter=5000), tol=1e-12, dense_max=16)
    g_plain, _ = input_grad(plain, x, w)
    node = cls(backward=solver, tol=1e-12, dense_max=16)
    g, _ = input_grad(node, x, w)
    assert torch.allclose(g, g_plain, rtol=1e-8, atol=1e-12)
    assert int(node.diagnostics.linear_iterations.max()) * 4 < int(plain.diagnostics.linear_iterations.max())


def test_constrained_node_takes_a_cg_value():
    class Sphere(ddn.EqConstDeclarativeNode):
        def objective(self, x, y):
            return (x * y).sum(-1)

        def equality_constraints(self, x, y):
            return (y ** 2).sum(-1) - 1

        def solve(self, x):
            return -x / x.norm(dim=-1, keepdim=True), None

    x = torch.randn(4, 150, dtype=DT)
    w = torch.randn(4, 150, dtype=DT)
    ref, _ = input_grad(Sphere(backward="dense"), x, w)
    got, _ = input_grad(Sphere(backward=linalg.CG(tol=1e-12)), x, w)
    assert torch.allclose(got, ref, atol=1e-9)


class TanhDEQ(FixedPointNode):
    def T(self, x, W, y):
        return torch.tanh(y @ W.T + x)

    def initial_guess(self, x, W):
        return torch.zeros_like(x)


def deq_problem():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(6, 6, generator=g, dtype=DT)
    W = 0.5 * W / torch.linalg.matrix_norm(W, 2)
    return torch.randn(3, 6, generator=g, dtype=DT), W, torch.randn(3, 6, generator=g, dtype=DT)


@pytest.mark.parametrize("backward", [Implicit(linalg.BiCGStab()), linalg.GMRES(restart=3), Implicit("dense"),
                                      "gmres", Implicit(linalg.Neumann(tol=1e-13))], ids=repr)
def test_fixed_point_solver_values(backward):
    x, W, w = deq_problem()
    xr = x.clone().requires_grad_(True)
    yr = ddn.DeclarativeLayer(TanhDEQ(tol=1e-13, backward_solver="dense"))(xr, W)
    ref = torch.autograd.grad((yr * w).sum(), xr)[0]
    xg = x.clone().requires_grad_(True)
    y = ddn.DeclarativeLayer(TanhDEQ(tol=1e-13, backward=backward, backward_tol=1e-12))(xg, W)
    got = torch.autograd.grad((y * w).sum(), xg)[0]
    assert torch.allclose(got, ref, rtol=1e-7, atol=1e-9)


def test_fixed_point_phantom_truncated_jacobian_free_unrolled():
    x, W, w = deq_problem()

    def grad_of(node):
        xg = x.clone().requires_grad_(True)
        y = ddn.DeclarativeLayer(node)(xg, W)
        return torch.autograd.grad((y * w).sum(), xg)[0]

    exact = grad_of(TanhDEQ(tol=1e-13, backward_solver="dense"))
    # Phantom(k) and Truncated(k) both equal autograd through k damped steps started at the solution
    with torch.no_grad():
        ystar = ddn.DeclarativeLayer(TanhDEQ(tol=1e-13))(x, W)
    xg = x.clone().requires_grad_(True)
    y = ystar
    for _ in range(3):
        y = 0.5 * y + 0.5 * torch.tanh(y @ W.T + xg)
    ref3 = torch.autograd.grad((y * w).sum(), xg)[0]
    assert torch.allclose(grad_of(TanhDEQ(tol=1e-13, backward=Phantom(3, 0.5))), ref3, atol=1e-10)
    assert torch.allclose(grad_of(TanhDEQ(tol=1e-13, damping=0.5, backward=Truncated(3))), ref3, atol=1e-10)
    # Jacobian-free: u = v, the gradient is J_x^T v
    xg = x.clone().requires_grad_(True)
    one = torch.tanh(ystar @ W.T + xg)
    jf = torch.autograd.grad((one * w).sum(), xg)[0]
    assert torch.allclose(grad_of(TanhDEQ(tol=1e-13, backward=JacobianFree())), jf, atol=1e-10)
    # unrolled from the initial guess converges to the exact gradient with many steps
    assert torch.allclose(grad_of(TanhDEQ(backward=Unrolled(80))), exact, atol=1e-9)


def test_symmetric_root_system_uses_minres_not_gmres():
    """Ridge hypergradient as a root: F = grad_y of 1/2|A y - b|^2 + lam/2 |y|^2 (a symmetric Jacobian)."""
    g = torch.Generator().manual_seed(3)
    A = torch.randn(300, 200, generator=g, dtype=DT) / 300 ** 0.5
    b = torch.randn(1, 300, generator=g, dtype=DT)

    def F(lam, y):
        return (y @ A.T - b) @ A + lam * y

    @custom_root(F, dense_max=16)
    def ridge(lam):
        return torch.linalg.solve(A.T @ A + lam * torch.eye(200, dtype=DT), (b @ A).T).T

    lam = torch.tensor([[0.3]], dtype=DT, requires_grad=True)
    y = ridge(lam)
    g1 = torch.autograd.grad(y.sum(), lam)[0]
    M = A.T @ A + 0.3 * torch.eye(200, dtype=DT)
    ref = -(torch.linalg.solve(M, y.detach().T)).sum()
    assert torch.allclose(g1.reshape(()), ref, rtol=1e-7)
    diag = ridge.node.diagnostics
    assert "minres" in diag.backward_method.lower()
    assert int(diag.linear_iterations.max()) < 150


def test_repr_shows_the_rule():
    assert "GMRES" in repr(ddn.DeclarativeLayer(TanhDEQ(backward=linalg.GMRES())))
    class Cube(RootNode):
        def optimality(self, x, y):
            return y ** 3 - x
    assert "gmres" in repr(ddn.DeclarativeLayer(Cube(backward="gmres")))
    assert "Phantom(steps=4" in repr(ddn.DeclarativeLayer(TanhDEQ(phantom=4)))
    assert "Unrolled" in repr(ddn.DeclarativeLayer(Coupled(backward="unrolled")))
    with pytest.raises(ValueError):
        Coupled(backward=Phantom(3))
