"""Unconstrained solvers (newton, newton_cg, lbfgs): closed forms, scipy references, dtypes, failure modes."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from torchddn.diagnostics import DDNError
from torchddn.solvers import Problem, get_solver
from torchddn.solvers.newton import newton, newton_cg

_name = "torchddn_tests_solver_problems"
if _name not in sys.modules:
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).with_name("problems.py"))
    sys.modules[_name] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules[_name])
P = sys.modules[_name]

SOLVERS = ["newton", "newton_cg", "lbfgs"]
ATOL = {torch.float64: 1e-9, torch.float32: 2e-4}


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("builder", P.UNCONSTRAINED, ids=lambda f: f.__name__)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_reference(name, builder, dtype):
    case = builder(dtype)
    res = get_solver(name)(case.problem, case.y0, max_iter=200)
    assert res.y.dtype == dtype and res.y.shape == case.y.shape
    assert res.converged.all(), (res.residual, res.iterations)
    assert res.nu is None
    assert res.iterations.dtype == torch.int64 and (res.iterations > 0).all()
    torch.testing.assert_close(res.y, case.y, atol=max(ATOL[dtype], case.ref_atol), rtol=0)
    if dtype == torch.float64:
        assert (res.residual <= 1e-9).all()


def test_newton_quadratic_one_step():
    case = P.quadratic()
    res = newton(case.problem, case.y0)
    assert (res.iterations == 1).all()
    torch.testing.assert_close(res.y, case.y, atol=1e-12, rtol=0)


def test_nonconvex_start_and_per_element_iterations():
    # double well y^4 - 2 y^2 + t y: the Hessian at y0 = 0 is negative definite (Levenberg shift needed)
    t = torch.tensor([[0.5], [-0.5], [0.0]], dtype=torch.float64)
    prob = Problem(lambda y: (y ** 4 - 2 * y ** 2 + t * y).sum(1))
    for name in SOLVERS:
        res = get_solver(name)(prob, torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64))
        assert res.converged.all(), name
        g = 4 * res.y ** 3 - 4 * res.y + t
        assert g.abs().max() < 1e-9
        assert (12 * res.y ** 2 - 4 > 0).all(), name  # a minimum, not the local maximum at 0
    res = newton(prob, torch.tensor([[0.0], [0.0], [1.0]], dtype=torch.float64))
    assert res.iterations[2] == 0  # element 2 starts at its minimum: frozen from the start


def test_cg_used_for_large_m(monkeypatch):
    import torchddn.solvers.newton as mod
    calls = []
    orig = mod._truncated_cg
    monkeypatch.setattr(mod, "_truncated_cg", lambda *a, **k: calls.append(1) or orig(*a, **k))
    m = 300
    d = torch.linspace(1.0, 10.0, m, dtype=torch.float64)
    c = torch.randn(2, m, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    prob = Problem(lambda y: (0.5 * d * y * y - c * y + 0.01 * y ** 4).sum(1))
    # CG is an explicit choice: method="cg", or "auto" above dense_max (no silent switch at a fixed size)
    dense = newton(prob, torch.zeros(2, m, dtype=torch.float64))
    assert not calls and dense.method == "newton" and dense.converged.all()
    res = newton(prob, torch.zeros(2, m, dtype=torch.float64), dense_max=256)
    assert calls and res.converged.all() and res.method == "newton_cg"
    g = d * res.y - c + 0.04 * res.y ** 3
    f = prob.objective(res.y)
    from torchddn.solvers._common import first_order_check
    y0 = torch.zeros_like(res.y)
    ok, _ = first_order_check(f, g, res.y, 1e-10, f0=prob.objective(y0), g0=-c, y0=y0)
    assert ok.all()  # the documented scale-invariant test
    small = newton(Problem(lambda y: (0.5 * y * y).sum(1)), torch.ones(2, 3, dtype=torch.float64), method="cg")
    assert len(calls) > 0 and small.converged.all()


@pytest.mark.parametrize("name", SOLVERS)
def test_max_iter_one_not_converged(name):
    case = P.logistic_ridge()
    res = get_solver(name)(case.problem, case.y0, max_iter=1)
    assert not res.converged.any()
    assert (res.iterations <= 1).all()
    assert (res.residual > 1e-6).all()


@pytest.mark.parametrize("name", SOLVERS)
def test_max_iter_zero(name):
    case = P.quadratic()
    res = get_solver(name)(case.problem, case.y0, max_iter=0)
    assert not res.converged.any() and (res.iterations == 0).all()
    torch.testing.assert_close(res.y, case.y0)


@pytest.mark.parametrize("name", SOLVERS)
def test_nan_objective_element(name):
    # element 1's objective is NaN everywhere (so at the start): a named error naming the element, not a
    # silently unconverged result
    x = torch.tensor([[1.0, 2.0], [0.0, 0.0], [-1.0, 0.5]], dtype=torch.float64)
    bad = torch.tensor([0.0, float("nan"), 0.0], dtype=torch.float64)
    prob = Problem(lambda y: ((y - x) ** 2).sum(1) + 0.1 * (y ** 4).sum(1) + bad)
    with pytest.raises(DDNError, match=r"NaN or Inf at the starting point.*\[1\]"):
        get_solver(name)(prob, torch.zeros(3, 2, dtype=torch.float64))


@pytest.mark.parametrize("name", SOLVERS)
def test_nan_region_is_avoided(name):
    # log barrier: NaN for y <= 0; the line search must back off instead of stepping into NaN
    prob = Problem(lambda y: (y - 2 * torch.log(y)).sum(1))
    res = get_solver(name)(prob, torch.full((2, 1), 0.05, dtype=torch.float64))
    assert res.converged.all()
    torch.testing.assert_close(res.y, torch.full((2, 1), 2.0, dtype=torch.float64), atol=1e-9, rtol=0)


@pytest.mark.parametrize("name", SOLVERS)
def test_bad_input(name):
    prob = Problem(lambda y: (y ** 2).sum(1))
    solver = get_solver(name)
    with pytest.raises(DDNError, match="NaN or Inf at batch elements \\[1\\]"):
        solver(prob, torch.tensor([[0.0], [float("nan")]]))
    with pytest.raises(DDNError, match="y0 must be a \\(b, m\\) tensor"):
        solver(prob, torch.zeros(3))
    with pytest.raises(DDNError, match="tol"):
        solver(prob, torch.zeros(2, 1), tol=0.0)
    with pytest.raises(DDNError, match="unconstrained"):
        solver(Problem(lambda y: (y ** 2).sum(1), eq=lambda y: y - 1), torch.zeros(2, 1))


def test_unbounded_never_hangs():
    # f = -y has no minimum: every solver stops within max_iter, unconverged
    prob = Problem(lambda y: -y.sum(1))
    for name in SOLVERS:
        res = get_solver(name)(prob, torch.zeros(2, 2, dtype=torch.float64), max_iter=20)
        assert not res.converged.any()
        assert (res.iterations <= 2 * 20).all()


def test_newton_cg_direct():
    case = P.quadratic()
    res = newton_cg(case.problem, case.y0)
    assert res.converged.all()
    torch.testing.assert_close(res.y, case.y, atol=1e-9, rtol=0)


def test_newton_falls_back_to_lbfgs(monkeypatch):
    # make every Newton line search fail: the elements are handed to L-BFGS, which solves them
    import torchddn.solvers.newton as mod

    def failing_armijo(fn, y, f, d, slope, active, **kw):
        return torch.zeros_like(f), f, torch.zeros_like(active)

    monkeypatch.setattr(mod, "armijo", failing_armijo)
    case = P.logistic_ridge()
    res = newton(case.problem, case.y0)
    assert res.converged.all()
    torch.testing.assert_close(res.y, case.y, atol=1e-7, rtol=0)
    res = newton(case.problem, case.y0, fallback=False)
    assert not res.converged.any()
