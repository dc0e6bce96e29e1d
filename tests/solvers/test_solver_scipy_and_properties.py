"""The scipy adapter, and property-based checks (hypothesis) of the built-in solvers on random convex QPs
against scipy SLSQP."""
import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.optimize as so
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from torchddn.diagnostics import DDNError
from torchddn.solvers import Problem, get_solver
from torchddn.solvers.scipy_adapter import ScipySolver

_name = "torchddn_tests_solver_problems"
if _name not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).with_name("problems.py"))
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])
P = sys.modules[_name]


@pytest.mark.parametrize("builder", [P.sphere, P.ball, P.simplex], ids=lambda f: f.__name__)
def test_scipy_slsqp_matches_closed_form(builder):
    case = builder()
    res = ScipySolver("SLSQP")(case.problem, case.y0)
    assert res.converged.all(), res.residual
    torch.testing.assert_close(res.y, case.y, atol=1e-7, rtol=0)
    torch.testing.assert_close(res.nu, case.nu, atol=1e-6, rtol=0)


def test_scipy_trust_constr_and_dtype_roundtrip():
    case = P.ball(torch.float32)
    res = ScipySolver("trust-constr")(case.problem, case.y0)
    assert res.y.dtype == torch.float32 and res.y.device == case.y0.device
    torch.testing.assert_close(res.y, case.y, atol=1e-4, rtol=0)
    assert res.iterations.dtype == torch.int64 and (res.iterations > 0).all()


def test_scipy_unconstrained_and_registry():
    case = P.logistic_ridge()
    solver = get_solver("scipy")
    assert isinstance(solver, ScipySolver) and solver.method == "SLSQP"
    res = ScipySolver("BFGS")(case.problem, case.y0, tol=1e-8)
    assert res.nu is None and res.converged.all()
    assert (res.residual <= 1e-8).all()
    torch.testing.assert_close(res.y, case.y, atol=1e-7, rtol=0)


def test_scipy_errors_and_nonconvergence():
    with pytest.raises(DDNError, match="method must be one of"):
        ScipySolver("nelder-mead")
    case = P.ball()
    with pytest.raises(DDNError, match="does not take constraints"):
        ScipySolver("BFGS")(case.problem, case.y0)
    res = ScipySolver("SLSQP")(P.nonconvex().problem, P.nonconvex().y0, max_iter=1)
    assert not res.converged.all()


def test_user_callable_passes_through():
    calls = []

    def my_solver(problem, y0, *, tol=1e-10, max_iter=100):
        calls.append(tol)
        return get_solver("newton")(problem, y0, tol=tol, max_iter=max_iter)

    assert get_solver(my_solver) is my_solver
    case = P.quadratic()
    assert get_solver(my_solver)(case.problem, case.y0, tol=1e-9).converged.all() and calls == [1e-9]


def _random_qp(seed: int, b: int, m: int, n_eq: int, n_ineq: int):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((b, m, m))
    Q = a @ a.transpose(0, 2, 1) + 0.1 * np.eye(m)
    c = rng.standard_normal((b, m)) * 2
    A = rng.standard_normal((b, n_eq, m))
    beq = rng.standard_normal((b, n_eq)) * 0.5
    G = rng.standard_normal((b, n_ineq, m))
    y_feas = rng.standard_normal((b, m)) * 0.3  # makes the constraints feasible (strictly for the inequalities)
    beq = np.einsum("bpm,bm->bp", A, y_feas)
    h = np.einsum("bqm,bm->bq", G, y_feas) + rng.uniform(0.05, 1.0, (b, n_ineq))
    return Q, c, A, beq, G, h


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), m=st.integers(2, 4), n_eq=st.integers(0, 1), n_ineq=st.integers(1, 4),
       name=st.sampled_from(["interior_point", "augmented_lagrangian"]))
# regression: a small objective scale at the solution (|y| << 1 from a zero start) made the barrier's
# complementarity floor exceed tol, and the active-set polish stopped without a step because its own measure
# left out the complementarity |nu g| of the constraints it holds active
@example(seed=1324, m=2, n_eq=1, n_ineq=3, name="interior_point")
@example(seed=1324, m=2, n_eq=1, n_ineq=3, name="augmented_lagrangian")
def test_random_convex_qp_matches_scipy(seed, m, n_eq, n_ineq, name):
    b = 2
    Q, c, A, beq, G, h = _random_qp(seed, b, m, n_eq, n_ineq)
    t = {k: torch.tensor(v) for k, v in dict(Q=Q, c=c, A=A, beq=beq, G=G, h=h).items()}
    prob = Problem(lambda u: 0.5 * torch.einsum("bi,bij,bj->b", u, t["Q"], u) - (t["c"] * u).sum(1),
                   eq=(lambda u: torch.einsum("bpm,bm->bp", t["A"], u) - t["beq"]) if n_eq else None,
                   ineq=lambda u: torch.einsum("bqm,bm->bq", t["G"], u) - t["h"])
    res = get_solver(name)(prob, torch.zeros(b, m, dtype=torch.float64))
    assert res.converged.all(), res.residual
    # the solvers' guarantee is relative to the problem's scale (gradient and multipliers at the data's size)
    scale = 1.0 + np.abs(c).max() + np.abs(Q).max() * float(res.y.abs().max()) + np.abs(h).max()
    assert (res.residual <= 1e-9 * scale).all(), (res.residual, scale)
    for i in range(b):
        cons = [{"type": "ineq", "fun": lambda u, i=i: h[i] - G[i] @ u, "jac": lambda u, i=i: -G[i]}]
        if n_eq:
            cons.append({"type": "eq", "fun": lambda u, i=i: A[i] @ u - beq[i], "jac": lambda u, i=i: A[i]})
        ref = so.minimize(lambda u, i=i: 0.5 * u @ Q[i] @ u - c[i] @ u, np.zeros(m),
                          jac=lambda u, i=i: Q[i] @ u - c[i], method="SLSQP", constraints=cons,
                          options={"ftol": 1e-15, "maxiter": 500})
        f_ours = float(prob.objective(res.y)[i])
        assert f_ours <= ref.fun + 1e-8 * max(1.0, abs(ref.fun))
        # strictly convex: unique minimiser (scipy's own accuracy limits the comparison)
        np.testing.assert_allclose(res.y[i].numpy(), ref.x, atol=1e-5)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 10_000), m=st.integers(2, 5), n_eq=st.integers(1, 2))
def test_random_equality_qp_closed_form(seed, m, n_eq):
    # equality-constrained QP: the KKT system gives y and nu exactly
    Q, c, A, beq, _, _ = _random_qp(seed, 2, m, n_eq, 1)
    K = np.block([[Q, A.transpose(0, 2, 1)], [A, np.zeros((2, n_eq, n_eq))]])
    sol = np.linalg.solve(K, np.concatenate([c, beq], axis=1)[..., None])[..., 0]
    t = {k: torch.tensor(v) for k, v in dict(Q=Q, c=c, A=A, beq=beq).items()}
    prob = Problem(lambda u: 0.5 * torch.einsum("bi,bij,bj->b", u, t["Q"], u) - (t["c"] * u).sum(1),
                   eq=lambda u: torch.einsum("bpm,bm->bp", t["A"], u) - t["beq"])
    res = get_solver("sqp")(prob, torch.zeros(2, m, dtype=torch.float64))
    assert res.converged.all()
    np.testing.assert_allclose(res.y.numpy(), sol[:, :m], atol=1e-9 * max(1, np.abs(sol).max()))
    # Q y - c = -A^T w  =>  grad f = A^T nu with nu = -w
    np.testing.assert_allclose(res.nu.numpy(), -sol[:, m:], atol=1e-8 * max(1, np.abs(sol).max()))


def test_active_set_polish_removes_complementarity_above_tol():
    # at a point where the active inequality holds to -4e-11 (inside) with a multiplier of size 0.2 and an
    # objective scale F = 0.03, stationarity and feasibility (|g| relative to the constraint scale C = 100, set by
    # the inactive constraint at the start) meet tol but the complementarity |nu g| / F = 2.7e-10 does not: the
    # polish must take its Newton step (the linear constraint then holds to rounding) rather than stop
    from torchddn.solvers._common import kkt_measure, start_scales
    from torchddn.solvers.sqp import active_set_polish
    dt = torch.float64
    prob = Problem(lambda u: 0.5 * (u * u).sum(1) - 0.3 * u[:, 0],
                   ineq=lambda u: torch.stack([u[:, 0] - 0.1, u[:, 1] - 100.0], dim=1))
    start = start_scales(prob, torch.zeros(1, 2, dtype=dt))
    y = torch.tensor([[0.1 - 4e-11, 0.0]], dtype=dt)
    nu = torch.tensor([[-(0.2 + 4e-11), 0.0]], dtype=dt)  # grad f = J^T nu exactly at y, nu <= 0
    _, m_before = kkt_measure(prob, y, nu, start)
    assert 1e-10 < m_before < 1e-9  # the point fails the test only through complementarity
    active = torch.tensor([[True, False]])
    y_p, nu_p, res_p, m_p = active_set_polish(prob, y, nu, active, 1e-10, start)
    assert m_p <= 1e-10
    torch.testing.assert_close(y_p, torch.tensor([[0.1, 0.0]], dtype=dt), atol=1e-15, rtol=0)
    torch.testing.assert_close(nu_p, torch.tensor([[-0.2, 0.0]], dtype=dt), atol=1e-14, rtol=0)
