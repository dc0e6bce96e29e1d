"""Constrained solvers (sqp, interior_point, augmented_lagrangian): closed forms, multipliers, scipy
references, mixed active sets, dtypes, infeasible problems, non-convergence and NaN handling."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from torchddn.diagnostics import DDNError
from torchddn.solvers import Problem, get_solver
from torchddn.solvers._common import kkt_measure, kkt_residual, start_scales

_name = "torchddn_tests_solver_problems"
if _name not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).with_name("problems.py"))
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])
P = sys.modules[_name]

INEQ_SOLVERS = ["interior_point", "augmented_lagrangian"]
EQ_SOLVERS = ["sqp", "interior_point", "augmented_lagrangian"]
ATOL = {torch.float64: 1e-8, torch.float32: 5e-4}


def _check(case, res, dtype):
    assert res.y.dtype == dtype and res.y.shape == case.y.shape
    assert res.converged.all(), (res.residual, res.iterations)
    torch.testing.assert_close(res.y, case.y, atol=max(ATOL[dtype], case.ref_atol), rtol=0)
    if case.nu is not None:
        torch.testing.assert_close(res.nu, case.nu, atol=10 * ATOL[dtype], rtol=0)
    if dtype == torch.float64:
        # the documented (scale-free) KKT measure meets the default tolerance; the absolute residual is small
        meas = kkt_measure(case.problem, res.y, res.nu, start_scales(case.problem, case.y0))[1]
        assert (meas <= 1e-10).all(), meas
        assert (res.residual <= 1e-8).all(), res.residual
        # the reported residual is the real KKT residual of (y, nu)
        torch.testing.assert_close(res.residual, kkt_residual(case.problem, res.y, res.nu)[0])


@pytest.mark.parametrize("name", EQ_SOLVERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_sphere(name, dtype):
    case = P.sphere(dtype)
    _check(case, get_solver(name)(case.problem, case.y0), dtype)


@pytest.mark.parametrize("name", INEQ_SOLVERS)
@pytest.mark.parametrize("builder", P.INEQUALITY, ids=lambda f: f.__name__)
def test_inequality_float64(name, builder):
    case = builder(torch.float64)
    _check(case, get_solver(name)(case.problem, case.y0), torch.float64)


@pytest.mark.parametrize("name", INEQ_SOLVERS)
@pytest.mark.parametrize("builder", [P.ball, P.simplex], ids=lambda f: f.__name__)
def test_inequality_float32(name, builder):
    case = builder(torch.float32)
    res = get_solver(name)(case.problem, case.y0)
    assert res.y.dtype == torch.float32
    torch.testing.assert_close(res.y, case.y, atol=ATOL[torch.float32], rtol=0)
    torch.testing.assert_close(res.nu, case.nu, atol=10 * ATOL[torch.float32], rtol=0)


def test_mixed_active_sets_in_one_batch():
    case = P.ball()
    res = get_solver("interior_point")(case.problem, case.y0)
    active = res.nu[:, 0] < 0
    assert not active[0] and active[1]  # element 0 is inside, element 1 outside: both handled exactly
    assert res.nu[0, 0] == 0
    box = P.box()
    res = get_solver("interior_point")(box.problem, box.y0)
    n_active = (res.nu < 0).sum(dim=1)
    assert len(set(n_active.tolist())) > 1  # different numbers of active bounds per element
    torch.testing.assert_close(res.nu, box.nu, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", INEQ_SOLVERS)
def test_infeasible_start(name):
    case = P.qp_mixed()
    y0 = torch.full_like(case.y0, 3.0)  # violates the bounds and the equality
    _check(case, get_solver(name)(case.problem, y0), torch.float64)


@pytest.mark.parametrize("name", INEQ_SOLVERS)
def test_nonconvex_nonlinear_inequality(name):
    case = P.nonconvex()
    res = get_solver(name)(case.problem, case.y0)
    assert res.converged.all(), res.residual
    assert (res.residual <= 1e-9).all()
    assert (case.problem.ineq(res.y) <= 1e-9).all()
    assert (res.nu <= 0).all()
    # a local minimum: scipy SLSQP started there does not move
    assert P.scipy_polish_check(case, res.y) < 1e-6


def test_sqp_nonconvex_objective_linear_equalities():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 2, 4, generator=g, dtype=torch.float64)
    prob = Problem(lambda y: ((y - x) ** 2).sum(1) + torch.cos(3 * y).sum(1),
                   eq=lambda y: torch.einsum("bpm,bm->bp", A, y) - 1)
    res = get_solver("sqp")(prob, torch.zeros(4, 4, dtype=torch.float64))
    assert res.converged.all() and (res.residual <= 1e-9).all()
    # second-order condition: reduced Hessian positive definite (a minimum)
    H = torch.diag_embed(2 - 9 * torch.cos(3 * res.y))
    Z = torch.linalg.svd(A, full_matrices=True).Vh[:, 2:].mT  # null-space basis
    assert (torch.linalg.eigvalsh(Z.mT @ H @ Z) > 0).all()


@pytest.mark.parametrize("name", EQ_SOLVERS)
def test_max_iter_one_not_converged(name):
    case = P.sphere()
    opts = {"inner_max_iter": 1} if name == "augmented_lagrangian" else {}
    res = get_solver(name)(case.problem, case.y0, max_iter=1, **opts)
    assert not res.converged.any()
    assert (res.iterations <= 1).all()


@pytest.mark.parametrize("name", INEQ_SOLVERS)
def test_infeasible_problem(name):
    # y <= -1 and y >= 1 (element 1 only; element 0 is feasible)
    shift = torch.tensor([[-3.0], [1.0]], dtype=torch.float64)
    prob = Problem(lambda y: (y ** 2).sum(1), ineq=lambda y: torch.cat([y + 1, shift - y], dim=1))
    res = get_solver(name)(prob, torch.zeros(2, 1, dtype=torch.float64), max_iter=15)
    assert res.converged.tolist() == [True, False]
    assert res.residual[1] > 0.5  # the violation shows in the residual
    torch.testing.assert_close(res.y[0], torch.tensor([-1.0], dtype=torch.float64), atol=1e-9, rtol=0)


def test_sqp_inconsistent_equalities():
    prob = Problem(lambda y: (y ** 2).sum(1), eq=lambda y: torch.cat([y[:, :1] - 1, y[:, :1] + 1], dim=1))
    res = get_solver("sqp")(prob, torch.zeros(2, 2, dtype=torch.float64), max_iter=20)
    assert not res.converged.any()
    assert (res.residual > 0.5).all()
    assert torch.isfinite(res.y).all()


@pytest.mark.parametrize("name", EQ_SOLVERS)
def test_nan_element(name):
    x = torch.tensor([[1.0, 2.0], [0.5, 0.5], [-1.0, 0.5]], dtype=torch.float64)
    bad = torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64)
    prob = Problem(lambda y: ((y - x) ** 2).sum(1) + bad, eq=lambda y: (y * y).sum(1, keepdim=True) - 1)
    # NaN at the start is a named error naming the element (not a silently unconverged result)
    with pytest.raises(DDNError, match=r"starting point y0 at batch elements \[1\]"):
        get_solver(name)(prob, torch.ones(3, 2, dtype=torch.float64), max_iter=30)
    # the other elements alone solve
    ok = Problem(lambda y: ((y - x[[0, 2]]) ** 2).sum(1), eq=lambda y: (y * y).sum(1, keepdim=True) - 1)
    res = get_solver(name)(ok, torch.ones(2, 2, dtype=torch.float64), max_iter=30)
    assert res.converged.all()
    torch.testing.assert_close(res.y, (x / x.norm(dim=1, keepdim=True))[[0, 2]], atol=1e-9, rtol=0)


def test_dependent_equalities():
    # the same constraint twice: the KKT matrix is singular; the least-squares fallback still solves it
    x = torch.tensor([[2.0, 0.0], [0.3, 0.4]], dtype=torch.float64)
    prob = Problem(lambda y: ((y - x) ** 2).sum(1), eq=lambda y: torch.cat([y.sum(1, keepdim=True) - 1] * 2, 1))
    res = get_solver("sqp")(prob, torch.zeros(2, 2, dtype=torch.float64))
    ref = x - (x.sum(1, keepdim=True) - 1) / 2
    torch.testing.assert_close(res.y, ref, atol=1e-9, rtol=0)
    assert res.converged.all()


def test_wrong_problem_class():
    with pytest.raises(DDNError, match="equality constraints only"):
        get_solver("sqp")(Problem(lambda y: (y ** 2).sum(1), ineq=lambda y: y), torch.zeros(1, 1))
    # no inequalities: interior point defers to sqp, no constraints at all: newton
    case = P.sphere()
    res = get_solver("interior_point")(case.problem, case.y0)
    assert res.converged.all()
    q = P.quadratic()
    assert get_solver("augmented_lagrangian")(q.problem, q.y0).converged.all()


@pytest.mark.parametrize("name", INEQ_SOLVERS)
def test_infeasible_raises_when_asked(name):
    from torchddn.diagnostics import InfeasibleError
    shift = torch.tensor([[-3.0], [1.0]], dtype=torch.float64)
    prob = Problem(lambda y: (y ** 2).sum(1), ineq=lambda y: torch.cat([y + 1, shift - y], dim=1))
    with pytest.raises(InfeasibleError, match=r"elements \[1\]"):
        get_solver(name)(prob, torch.zeros(2, 1, dtype=torch.float64), max_iter=15, on_infeasible="raise")


def test_sqp_inconsistent_equalities_raise():
    from torchddn.diagnostics import InfeasibleError
    prob = Problem(lambda y: (y ** 2).sum(1), eq=lambda y: torch.cat([y[:, :1] - 1, y[:, :1] + 1], dim=1))
    with pytest.raises(InfeasibleError, match=r"elements \[0, 1\]"):
        get_solver("sqp")(prob, torch.zeros(2, 2, dtype=torch.float64), max_iter=20, on_infeasible="raise")
    # a feasible problem never raises
    case = P.sphere()
    assert get_solver("sqp")(case.problem, case.y0, on_infeasible="raise").converged.all()
