"""Adapter running ``scipy.optimize.minimize`` per batch element (an explicitly CPU solver)."""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import torch
from torch import Tensor

from torchddn.diagnostics import DDNError
from torchddn.solvers._common import (check_inputs, constraint_values, effective_tol, kkt_measure, normalise,
                                      recover_multipliers, start_scales)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import batch_jacobian, value_and_batch_grad

_METHODS = ("SLSQP", "trust-constr", "L-BFGS-B", "BFGS", "Newton-CG", "trust-exact")


class ScipySolver:
    r"""Solve each batch element with ``scipy.optimize.minimize`` (gradients and Jacobians from torch).

    Args:
        method: ``"SLSQP"`` (default) or ``"trust-constr"`` for constrained problems; the unconstrained
            methods ``"L-BFGS-B"``, ``"BFGS"``, ``"Newton-CG"``, ``"trust-exact"`` also work without constraints.
        **options: passed to ``minimize`` as ``options`` (e.g. ``ftol``, ``gtol``, ``xtol``).

    Calling ``solver(problem, y0, tol=..., max_iter=...)`` loops over the ``b`` elements on the CPU in float64
    (``problem``'s functions are still evaluated on the input's device and dtype, on the whole batch with the
    other rows fixed, since element ``i`` depends only on row ``i``). The result is converted back to ``y0``'s
    device and dtype. Multipliers are recovered by least squares on the active constraints at the returned
    point (torch, batched), which is exact there. scipy runs on the normalised problem of
    :func:`~torchddn.solvers._common.normalise` (``y / ys``, ``f / fs``, ``c / cs`` from the start), so its
    absolute tolerances (``gtol``, SLSQP's ``ftol``) act on unit-scale numbers. ``residual`` is the absolute KKT
    residual; ``converged`` means the scale-free KKT measure of :func:`~torchddn.solvers._common.kkt_measure` is
    ``<= tol`` (floored at ``64 eps``), or scipy reports success and it is ``<= max(tol, sqrt(tol))`` (scipy's own
    stopping tests, e.g. SLSQP's ``ftol``, are not KKT tests).

    Cost: ``b`` scipy runs, each objective/gradient evaluation costing one batched evaluation.
    """

    def __init__(self, method: str = "SLSQP", **options: Any) -> None:
        if method not in _METHODS:
            raise DDNError(f"ScipySolver: method must be one of {_METHODS}, got {method!r}")
        self.method = method
        self.options = options

    def __repr__(self) -> str:
        return f"ScipySolver(method={self.method!r}, options={self.options!r})"

    def __call__(self, problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100) -> SolverResult:
        import scipy.optimize as so

        check_inputs(y0, tol, max_iter)
        if problem.constrained() and self.method not in ("SLSQP", "trust-constr"):
            raise DDNError(f"ScipySolver: method {self.method!r} does not take constraints; "
                           "use 'SLSQP' or 'trust-constr'")
        y_user = y0.detach().clone()
        problem_y = problem
        start_y = start_scales(problem_y, y_user)
        nz = normalise(problem_y, y_user, start_y)
        problem = nz.problem
        y_cur = nz.to_u(y_user)
        b, m = y_cur.shape
        dev, dt = y_cur.device, y_cur.dtype
        iters = torch.zeros(b, dtype=torch.int64, device=dev)
        success = torch.zeros(b, dtype=torch.bool, device=dev)

        def to_np(t: Tensor) -> np.ndarray:
            return t.detach().to("cpu", torch.float64).numpy()

        with torch.no_grad():
            for i in range(b):
                def batch_at(u: np.ndarray, i=i) -> Tensor:
                    yb = y_cur.clone()
                    yb[i] = torch.as_tensor(u, dtype=dt, device=dev)
                    return yb

                def fun(u: np.ndarray, i=i):
                    val, grad = value_and_batch_grad(problem.objective, batch_at(u))
                    return float(val[i]), to_np(grad[i])

                cons = []
                for kind, which in (("eq", 0), ("ineq", 1)):
                    fn = problem.eq if kind == "eq" else problem.ineq
                    if fn is None:
                        continue
                    sign = 1.0 if kind == "eq" else -1.0  # scipy wants c(u) >= 0 for inequalities

                    def cfun(u: np.ndarray, i=i, which=which, sign=sign):
                        return sign * to_np(constraint_values(problem, batch_at(u))[which][i])

                    def cjac(u: np.ndarray, i=i, which=which, sign=sign):
                        _, jac = batch_jacobian(lambda v: constraint_values(problem, v)[which], batch_at(u))
                        return sign * to_np(jac[i])

                    if self.method == "SLSQP":
                        cons.append({"type": kind, "fun": cfun, "jac": cjac})
                    else:
                        hi = 0.0 if kind == "eq" else np.inf
                        cons.append(so.NonlinearConstraint(cfun, 0.0, hi, jac=cjac))
                opts = {"maxiter": int(max_iter), **self.options}
                kwargs = {"constraints": cons} if cons else {}
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = so.minimize(fun, to_np(y_cur[i]), jac=True, method=self.method, tol=tol,
                                      options=opts, **kwargs)
                y_cur[i] = torch.as_tensor(res.x, dtype=dt, device=dev)
                iters[i] = int(getattr(res, "nit", 0) or 0)
                success[i] = bool(res.success) and bool(np.all(np.isfinite(res.x)))
            y_out = nz.to_y(y_cur)
            nu = recover_multipliers(problem_y, y_out) if problem_y.constrained() else None
            resid, meas = kkt_measure(problem_y, y_out, nu, start_y)
            tol_e = effective_tol(tol, dt)
            conv = (meas <= tol_e) | (success & (meas <= max(tol_e, tol ** 0.5)))
        return SolverResult(y=y_out, nu=nu, converged=conv, iterations=iters, residual=resid,
                            method=f"scipy:{self.method}")
