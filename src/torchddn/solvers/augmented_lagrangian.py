"""Batched augmented Lagrangian method (method of multipliers) for equality and inequality constraints."""
from __future__ import annotations

import torch
from torch import Tensor

from torchddn.solvers._common import (enter_normalised, finish_normalised, check_inputs, constraint_values,
                                      effective_tol, kkt_measure, violation)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.solvers.newton import newton
from torchddn.solvers.sqp import active_set_polish


def augmented_lagrangian(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100,
                         rho0: float = 10.0, rho_max: float = 1e8, inner_max_iter: int = 50,
                         polish: bool = True, on_infeasible: str = "report") -> SolverResult:
    r"""Batched augmented Lagrangian method for ``min_y f(y) s.t. h(y) = 0, g(y) <= 0``.

    Each outer iteration minimises, per element, the (once continuously differentiable) augmented Lagrangian

    .. math::
        L_\rho(y) = f + \lambda^T h + \tfrac{\rho}{2}\|h\|^2
                    + \tfrac{1}{2\rho}\sum_j \big(\max(0, z_j + \rho g_j)^2 - z_j^2\big)

    with :func:`~torchddn.solvers.newton.newton`, then updates ``lambda += rho h``,
    ``z = max(0, z + rho g)``, and multiplies ``rho`` by 10 where the violation did not fall below a quarter of
    its previous value; an element whose violation stalls at ``rho_max`` stops (unconverged: infeasible or
    degenerate). Once the multipliers settle, an active-set polish (as in
    :func:`~torchddn.solvers.interior_point.interior_point`) brings the KKT residual to rounding level.
    ``y0`` need not be feasible.

    Args:
        problem: a constrained :class:`~torchddn.solvers.base.Problem` (unconstrained ones go to Newton).
        y0: ``(b, m)`` starting point.
        tol: stop an element when its scale-free KKT measure
            (:func:`~torchddn.solvers._common.kkt_measure`, as in
            :func:`~torchddn.solvers.interior_point.interior_point`) is ``<= tol`` (``tol`` floored at ``64 eps``).
            The iteration runs in the normalised units of :func:`~torchddn.solvers._common.normalise`.
        max_iter: maximum outer iterations per element (each runs Newton for up to ``inner_max_iter`` steps).
        rho0, rho_max: initial and largest penalty.
        polish: run the final active-set polish.
        on_infeasible: ``"report"`` or ``"raise"``, as in :func:`~torchddn.solvers.interior_point.interior_point`.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` with ``nu = [-lambda; -z]`` in the ``grad f = J^T nu``
        convention; ``iterations`` counts outer iterations.

    Cost per outer iteration: a Newton solve of ``L_rho`` (dense Hessians, ``O(b m^3)`` per inner step).
    """
    check_inputs(y0, tol, max_iter)
    if not problem.constrained():
        return newton(problem, y0, tol=tol, max_iter=max_iter)
    tol_e = effective_tol(tol, y0.dtype)
    stop_tol = max(tol_e, 1e-8) if polish else tol_e
    y = y0.detach().clone()
    b, m = y.shape
    with torch.no_grad():
        # run in normalised units (rho0, rho_max and the polish thresholds are then scale free)
        problem_y = problem
        nz, start_y, problem, y, start = enter_normalised(problem_y, y)
        u0 = y.clone()
        h0, g0 = constraint_values(problem, y)
        p = 0 if h0 is None else h0.shape[1]
        q = 0 if g0 is None else g0.shape[1]
        lam = y.new_zeros(b, p)
        z = y.new_zeros(b, q)
        rho = y.new_full((b,), float(rho0))
        viol_prev = violation(h0, g0, b, y)
        iters = torch.zeros(b, dtype=torch.int64, device=y.device)
        conv = torch.zeros(b, dtype=torch.bool, device=y.device)
        broken = torch.zeros(b, dtype=torch.bool, device=y.device)
        for it in range(int(max_iter) + 1):
            nu = torch.cat([-lam, -z], dim=1)
            res, meas = kkt_measure(problem, y, nu, start)
            conv = conv | (meas <= stop_tol)
            run = ~conv & ~broken
            if it == int(max_iter) or not bool(run.any()):
                break
            lam_c, z_c, rho_c = lam.clone(), z.clone(), rho.clone()

            def aug(u: Tensor) -> Tensor:
                h, g = constraint_values(problem, u)
                val = problem.objective(u)
                if h is not None:
                    val = val + (lam_c * h).sum(dim=1) + 0.5 * rho_c * (h * h).sum(dim=1)
                if g is not None:
                    shifted = (z_c + rho_c[:, None] * g).clamp_min(0)
                    val = val + (shifted * shifted - z_c * z_c).sum(dim=1) / (2 * rho_c)
                return val

            inner = newton(Problem(aug), y, tol=tol_e, max_iter=inner_max_iter)
            finite = torch.isfinite(inner.y).all(dim=1)
            broken = broken | (run & ~finite)
            upd = run & finite
            y = torch.where(upd[:, None], inner.y, y)
            h, g = constraint_values(problem, y)
            if h is not None:
                lam = torch.where(upd[:, None], lam + rho[:, None] * h, lam)
            if g is not None:
                z = torch.where(upd[:, None], (z + rho[:, None] * g).clamp_min(0), z)
            viol = violation(h, g, b, y)
            grow = upd & (viol > 0.25 * viol_prev)
            # the penalty is at its cap and the violation no longer falls: infeasible or degenerate, give up
            broken = broken | (grow & (rho >= rho_max))
            rho = torch.where(grow, (10 * rho).clamp_max(rho_max), rho)
            viol_prev = torch.where(upd, viol, viol_prev)
            iters = iters + run.to(torch.int64)
            if polish and g is not None:
                # try to finish early: polish elements whose multipliers look settled
                nu = torch.cat([-lam, -z], dim=1)
                active = (z > 0) & torch.isfinite(g)
                y_p, nu_p, res_p, meas_p = active_set_polish(problem, y, nu, active, tol_e, start)
                fin = upd & (meas_p <= tol_e)
                y = torch.where(fin[:, None], y_p, y)
                lam = torch.where(fin[:, None], -nu_p[:, :p], lam)
                z = torch.where(fin[:, None], -nu_p[:, p:], z)
        nu = torch.cat([-lam, -z], dim=1)
        if polish:
            _, g = constraint_values(problem, y)
            if g is not None:
                active = (z > 0) | (g > -stop_tol)
            else:
                active = torch.zeros(b, 0, dtype=torch.bool, device=y.device)
            y, nu, _, _ = active_set_polish(problem, y, nu, active, tol_e, start)
        y, nu, res, conv = finish_normalised(nz, problem_y, start_y, problem, y, nu, u0, tol_e, on_infeasible)
    return SolverResult(y=y, nu=nu, converged=conv, iterations=iters, residual=res,
                        method="augmented_lagrangian")
