"""Projections (box, simplex, ball, sphere) and the projected solvers."""
import numpy as np
import pytest
import scipy.optimize as so
import torch

from torchddn.diagnostics import DDNError
from torchddn.solvers import Problem, get_solver
from torchddn.solvers.projected import project_ball, project_box, project_simplex, project_sphere

GEN = torch.Generator().manual_seed(0)
X = 2 * torch.randn(6, 4, generator=GEN, dtype=torch.float64)
X[0] *= 0.05  # inside the ball
SETS = {
    "box": project_box(-0.5, torch.tensor([0.5, 1.0, 0.2, 2.0], dtype=torch.float64)),
    "simplex": project_simplex(),
    "ball": project_ball(1.5),
    "sphere": project_sphere(1.5),
}


def _scipy_projection(name, x):
    """Reference projection of one point by SLSQP."""
    cons, bounds = [], None
    if name == "box":
        bounds = list(zip([-0.5] * 4, [0.5, 1.0, 0.2, 2.0]))
    elif name == "simplex":
        cons = [{"type": "eq", "fun": lambda u: u.sum() - 1}]
        bounds = [(0, None)] * 4
    elif name == "ball":
        cons = [{"type": "ineq", "fun": lambda u: 1.5 ** 2 - u @ u}]
    else:
        cons = [{"type": "eq", "fun": lambda u: u @ u - 1.5 ** 2}]
    start = x / max(np.linalg.norm(x), 1e-3) if name == "sphere" else np.zeros(4)
    res = so.minimize(lambda u: ((u - x) ** 2).sum(), start, jac=lambda u: 2 * (u - x), method="SLSQP",
                      bounds=bounds, constraints=cons, options={"ftol": 1e-15, "maxiter": 500})
    return res.x


@pytest.mark.parametrize("name", list(SETS))
def test_projection_matches_scipy(name):
    y = SETS[name](X)
    ref = np.stack([_scipy_projection(name, x) for x in X.numpy()])
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-6)
    # idempotent and feasible
    torch.testing.assert_close(SETS[name](y), y, atol=1e-12, rtol=0)


def test_projection_closed_forms_and_edge_cases():
    torch.testing.assert_close(project_ball(1.5)(X[:1]), X[:1])  # inside: unchanged
    s = project_simplex()(torch.tensor([[0.3, 0.3, 0.3], [5.0, 5.0, -1.0], [0.0, 0.0, 0.0]]))
    torch.testing.assert_close(s, torch.tensor([[1 / 3, 1 / 3, 1 / 3], [0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3]]))
    z = project_sphere(2.0)(torch.zeros(2, 3))
    assert torch.isfinite(z).all() and torch.allclose(z.norm(dim=1), torch.full((2,), 2.0))
    for proj in SETS.values():  # float32 in, float32 out
        assert proj(X.float()).dtype == torch.float32


@pytest.mark.parametrize("solver", ["projected_gradient", "projected_newton"])
@pytest.mark.parametrize("name", list(SETS))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_projected_solvers_on_quadratic(solver, name, dtype):
    # min 1/2 y^T Q y - x^T y over the set; Q = I gives the projection of x exactly
    proj = SETS[name]
    x = X.to(dtype)
    res = get_solver(solver)(Problem(lambda u: ((u - x) ** 2).sum(1), project=proj), torch.zeros_like(x))
    assert res.converged.all() and res.y.dtype == dtype
    torch.testing.assert_close(res.y, proj(x), atol=1e-9 if dtype == torch.float64 else 1e-5, rtol=0)


@pytest.mark.parametrize("name", ["box", "simplex", "ball"])
def test_projected_newton_vs_interior_point(name):
    # a non-isotropic quadratic over a convex set: compare with the interior point on the explicit constraints
    g = torch.Generator().manual_seed(1)
    a = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    Q = a @ a.mT + 0.3 * torch.eye(4, dtype=torch.float64)
    x = X[:3]
    obj = lambda u: 0.5 * torch.einsum("bi,bij,bj->b", u, Q, u) - (x * u).sum(1) * 3  # noqa: E731
    ineq = {"box": lambda u: torch.cat([u - torch.tensor([0.5, 1.0, 0.2, 2.0], dtype=u.dtype), -0.5 - u], 1),
            "simplex": lambda u: -u, "ball": lambda u: (u * u).sum(1, keepdim=True) - 1.5 ** 2}[name]
    eq = (lambda u: u.sum(1, keepdim=True) - 1) if name == "simplex" else None
    ref = get_solver("interior_point")(Problem(obj, eq=eq, ineq=ineq), torch.zeros(3, 4, dtype=torch.float64))
    for solver in ["projected_newton", "projected_gradient"]:
        res = get_solver(solver)(Problem(obj, eq=eq, ineq=ineq, project=SETS[name]),
                                 torch.zeros(3, 4, dtype=torch.float64), max_iter=500)
        assert res.converged.all(), solver
        torch.testing.assert_close(res.y, ref.y, atol=1e-8, rtol=0)
        # multipliers recovered by least squares on the active constraints
        torch.testing.assert_close(res.nu, ref.nu, atol=1e-6, rtol=0)


def test_projected_failures():
    with pytest.raises(DDNError, match="problem.project"):
        get_solver("projected_gradient")(Problem(lambda u: (u * u).sum(1)), torch.zeros(2, 2))
    x = X[:2]
    prob = Problem(lambda u: ((u - x) ** 2).sum(1) + 0.1 * (u ** 4).sum(1), project=project_ball(1.0))
    for solver in ["projected_gradient", "projected_newton"]:
        res = get_solver(solver)(prob, torch.zeros_like(x), max_iter=1)
        assert not res.converged.any() and (res.iterations == 1).all()
    bad = torch.tensor([0.0, float("nan")], dtype=torch.float64)
    prob = Problem(lambda u: ((u - x) ** 2).sum(1) + bad, project=project_ball(1.0))
    # a NaN objective at the (projected) start is a named error naming the element
    with pytest.raises(DDNError, match=r"P\(y0\) at batch elements \[1\]"):
        get_solver("projected_newton")(prob, torch.zeros_like(x))
