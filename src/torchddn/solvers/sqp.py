"""Batched sequential quadratic programming (Newton on the KKT system) for equality-constrained problems,
and the active-set polish shared by the inequality solvers."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError
from torchddn.solvers._common import (finish_normalised, StartScales, armijo, check_inputs, constraints_fn, effective_tol,
                                      kkt_measure, normalise, scaled_kkt, solve_kkt,
                                      start_scales)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import batch_hessian, batch_jacobian, value_and_batch_grad


def sqp_core(objective, cfun, y: Tensor, nu: Tensor, tol: float, max_iter: int, free: Optional[Tensor] = None,
             active: Optional[Tensor] = None, c1: float = 1e-4, start: Optional[StartScales] = None,
             comp_rows: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Newton-KKT iterations for ``min f s.t. c(y) = 0`` on the rows of ``c`` that are not ``free``.

    ``nu`` (b, k) are multipliers in the ``grad f = J^T nu`` convention (zero on free rows). Steps are damped
    by an l1 merit line search ``f + mu |c|_1`` with a second-order correction for curved constraints.
    Returns ``(y, nu, converged, iterations, kkt)`` where ``kkt = max(|grad f - J^T nu|, |c|)`` on the
    constrained rows and convergence means that the scale-free
    :func:`~torchddn.solvers._common.scaled_kkt` measure of those rows against ``start`` (default: the scales
    at the entry ``y``) is ``<= tol``. ``comp_rows`` (b, k) bool marks constrained rows that are inequalities
    held active (the active-set polish): their complementarity ``|nu_i c_i|`` (relative to the objective scale)
    also enters the measure, so that the iteration does not stop at a point the full KKT measure of
    :func:`~torchddn.solvers._common.kkt_measure` rejects (a small ``|c_i|`` with a large ``|nu_i|``).
    """
    b, m = y.shape
    y = y.clone()
    k = nu.shape[1]
    if free is None:
        free = torch.zeros(b, k, dtype=torch.bool, device=y.device)
    if active is None:
        active = torch.ones(b, dtype=torch.bool, device=y.device)
    on = (~free).to(y.dtype)
    nu = nu * on
    iters = torch.zeros(b, dtype=torch.int64, device=y.device)
    conv = torch.zeros(b, dtype=torch.bool, device=y.device)
    failed = torch.zeros(b, dtype=torch.bool, device=y.device)
    mu = y.new_zeros(b)
    kkt = y.new_full((b,), float("inf"))
    if start is None:
        start = start_scales(Problem(objective, eq=cfun), y)

    def merit_fn(mu_: Tensor):
        def phi(u: Tensor) -> Tensor:
            return objective(u) + mu_ * (cfun(u) * on).abs().sum(dim=1)
        return phi

    for it in range(max_iter + 1):
        f, gf = value_and_batch_grad(objective, y)
        cv, A = batch_jacobian(cfun, y)
        cv = cv * on
        A = A * on[:, :, None]
        stat = (gf - torch.einsum("bkm,bk->bm", A, nu)).abs().amax(dim=1)
        feas = cv.abs().amax(dim=1) if k else cv.new_zeros(b)
        kkt_now = torch.maximum(stat, feas)
        kkt_now = torch.where(torch.isnan(kkt_now), torch.full_like(kkt_now, float("inf")), kkt_now)
        kkt = torch.where(active & ~conv & ~failed, kkt_now, kkt)
        comp = None
        if comp_rows is not None and k:
            comp = (nu * cv * comp_rows.to(cv.dtype)).abs().amax(dim=1)
        meas = scaled_kkt(f, gf - torch.einsum("bkm,bk->bm", A, nu), y, A, feas, comp, None, start)
        conv = conv | (active & torch.isfinite(kkt_now) & (meas <= tol))
        failed = failed | (active & ~conv & ~torch.isfinite(kkt_now))
        run = active & ~conv & ~failed
        if it == max_iter or not bool(run.any()):
            break
        nu_c = nu.detach()

        def lagrangian(u: Tensor) -> Tensor:
            return objective(u) - (nu_c * on * cfun(u)).sum(dim=1)

        H = batch_hessian(lagrangian, y)
        H = torch.where(torch.isfinite(H), H, torch.zeros_like(H))
        d, w, ok = solve_kkt(H, A, -gf, -cv, free=free)
        nu_new = -w * on
        mu = torch.maximum(mu, 2 * nu_new.abs().amax(dim=1) + 1e-3 * gf.abs().amax(dim=1) + 1e-8)
        slope = (gf * d).sum(dim=1) - mu * cv.abs().sum(dim=1)
        descent = ok & (slope < 0) & torch.isfinite(slope)
        redo = run & ~descent
        if bool(redo.any()):
            # not a descent direction of the merit function: shift H itself to positive definite
            d2, w2, ok2 = solve_kkt(H, A, -gf, -cv, free=free, augment=0.0)
            d = torch.where(redo[:, None], d2, d)
            nu2 = -w2 * on
            nu_new = torch.where(redo[:, None], nu2, nu_new)
            mu = torch.where(redo, torch.maximum(mu, 2 * nu2.abs().amax(dim=1) + 1e-8), mu)
            slope = (gf * d).sum(dim=1) - mu * cv.abs().sum(dim=1)
            descent = torch.where(redo, ok2 & (slope < 0) & torch.isfinite(slope), descent)
        phi = merit_fn(mu)
        phi0 = phi(y)
        # full step, then a second-order correction (min-norm step back onto the linearised constraints)
        y_full = y + d
        c_full = cfun(y_full) * on
        AAt = A @ A.transpose(1, 2) + torch.diag_embed(free.to(y.dtype))
        corr = torch.linalg.lstsq(AAt, c_full.unsqueeze(-1)).solution.squeeze(-1) if y.device.type == "cpu" \
            else (torch.linalg.pinv(AAt) @ c_full.unsqueeze(-1)).squeeze(-1)
        d_soc = d - torch.einsum("bkm,bk->bm", A, corr)
        phi_full, phi_soc = phi(y_full), phi(y + d_soc)
        thresh = phi0 + c1 * slope + 8 * torch.finfo(y.dtype).eps * (1 + phi0.abs())
        take_full = run & descent & torch.isfinite(phi_full) & (phi_full <= thresh)
        take_soc = run & descent & ~take_full & torch.isfinite(phi_soc) & (phi_soc <= thresh)
        need_ls = run & descent & ~take_full & ~take_soc
        alpha, _, ls_ok = armijo(phi, y, phi0, d, slope, need_ls, c1=c1)
        # a step near rounding level cannot be judged by the merit function (its slope's sign is noise):
        # take the Newton step and its multipliers; the KKT test decides convergence
        small = run & ok & ~take_full & ~take_soc & ~(need_ls & ls_ok) & torch.isfinite(d).all(dim=1) & \
            (d.abs() <= torch.finfo(y.dtype).eps ** 0.5 * (1 + y.abs())).all(dim=1)
        take_full = take_full | small
        step = torch.where(take_soc[:, None], d_soc, torch.where(take_full[:, None], d, alpha[:, None] * d))
        moved = take_full | take_soc | (need_ls & ls_ok)
        a_nu = torch.where(take_full | take_soc, torch.ones_like(alpha), alpha)
        # no acceptable step: stop this element (its KKT residual decides convergence)
        failed = failed | (run & ~moved)
        y = torch.where(moved[:, None], y + step, y)
        nu = torch.where(moved[:, None], nu + a_nu[:, None] * (nu_new - nu), nu)
        iters = iters + run.to(torch.int64)
    return y, nu, conv, iters, kkt


def active_set_polish(problem: Problem, y: Tensor, nu: Tensor, active_ineq: Tensor, tol: float,
                      start: StartScales, steps: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A few Newton-KKT steps on the equalities plus the inequalities flagged in ``active_ineq`` (b, q),
    accepted per element only where the full scale-free KKT measure (feasibility, complementarity and
    multiplier signs included; :func:`~torchddn.solvers._common.kkt_measure` against ``start``) improves.
    Returns ``(y, nu, residual, measure)``."""
    cfun = constraints_fn(problem)
    b = y.shape[0]
    res0, m0 = kkt_measure(problem, y, nu, start)
    p = nu.shape[1] - active_ineq.shape[1]
    free = torch.cat([torch.zeros(b, p, dtype=torch.bool, device=y.device), ~active_ineq], dim=1)
    comp_rows = torch.cat([torch.zeros(b, p, dtype=torch.bool, device=y.device), active_ineq], dim=1)
    y_p, nu_p, _, _, _ = sqp_core(problem.objective, cfun, y, nu * (~free).to(nu.dtype), tol, steps, free=free,
                                  start=start, comp_rows=comp_rows)
    res_p, m_p = kkt_measure(problem, y_p, nu_p, start)
    better = m_p < m0
    y = torch.where(better[:, None], y_p, y)
    nu = torch.where(better[:, None], nu_p, nu)
    return y, nu, torch.where(better, res_p, res0), torch.where(better, m_p, m0)


def sqp(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, nu0: Optional[Tensor] = None,
        c1: float = 1e-4, on_infeasible: str = "report") -> SolverResult:
    r"""Batched SQP (Newton's method on the KKT system) for ``min_y f(y) s.t. h(y) = 0``.

    Each iteration solves, per element, ``[H  A^T; A  0] [d; -nu+] = -[grad f; h]`` with ``H`` the Hessian of the
    Lagrangian ``f - nu^T h`` (:func:`batch_hessian`) and ``A`` the Jacobian of ``h`` (:func:`batch_jacobian`).
    ``H`` gets a Levenberg shift where it is not positive definite on the constraints' null space; dependent
    constraints fall back to a least-squares solve. The step is damped by an l1 merit function
    ``f + mu |h|_1`` (``mu > 2 max|nu|``) with a second-order correction against the Maratos effect, so
    nonlinear ``h`` (spheres, manifolds) converge quadratically. ``y0`` need not be feasible.

    Args:
        problem: a :class:`~torchddn.solvers.base.Problem` with ``eq`` (and no ``ineq``; use
            :func:`~torchddn.solvers.interior_point.interior_point` for those).
        y0: ``(b, m)`` starting point.
        tol: stop an element when the scale-free KKT measure of :func:`~torchddn.solvers._common.kkt_measure`
            (stationarity ``|grad f - A^T nu|_inf L / max(|f|, |f0|, |g0|_inf L)``, violation
            ``|h|_inf / max(|h(y0)|_inf, |A|_inf L)``; ``L = max(|y|_inf, |y0|_inf)``) is ``<= tol`` (``tol``
            floored at ``64 eps`` of the dtype). The iteration runs in normalised units
            (:func:`~torchddn.solvers._common.normalise`), so it is invariant under scaling ``f``, ``h`` and
            ``y`` with the data.
        max_iter: maximum iterations per element.
        nu0: optional ``(b, p)`` starting multipliers (default: zeros).
        on_infeasible: ``"report"`` or ``"raise"``, as in :func:`~torchddn.solvers.interior_point.interior_point`.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` with multipliers ``nu`` (b, p) (``grad f = A^T nu``) and the
        KKT residual of :func:`~torchddn.solvers._common.kkt_residual`.

    Cost per iteration: a Lagrangian Hessian (``m`` HVPs), a Jacobian (``p`` VJPs) and an ``(m+p)``-square
    batched solve, ``O(b (m + p)^3)``.
    """
    check_inputs(y0, tol, max_iter)
    if problem.ineq is not None:
        raise DDNError("sqp handles equality constraints only; use 'interior_point' or 'augmented_lagrangian' "
                       "for problems with inequality constraints")
    if problem.eq is None:
        from torchddn.solvers.newton import newton
        return newton(problem, y0, tol=tol, max_iter=max_iter)
    tol_e = effective_tol(tol, y0.dtype)
    y = y0.detach().clone()
    with torch.no_grad():
        start = start_scales(problem, y)
        nz = normalise(problem, y, start)
        sp = nz.problem
        u = nz.to_u(y)
        p = constraints_fn(problem)(y).shape[1]
        if nu0 is None:
            # zero multipliers: the first step uses the objective's Hessian (a least-squares estimate far from
            # the constraint set can make the Lagrangian's Hessian indefinite and the first steps tiny)
            nu_u = y.new_zeros(y.shape[0], p)
        else:
            nu_u = nu0.detach().to(y) * (nz.cs / nz.fs)[:, None]
        u, nu_u, conv, iters, _ = sqp_core(sp.objective, constraints_fn(sp), u, nu_u, tol_e, int(max_iter),
                                           c1=c1, start=start_scales(sp, nz.to_u(y)))
        u0 = nz.to_u(y)
        y, nu, res, conv = finish_normalised(nz, problem, start, sp, u, nu_u, u0, tol_e, on_infeasible)
    return SolverResult(y=y, nu=nu, converged=conv, iterations=iters, residual=res, method="sqp")
