"""Batched primal-dual interior-point method for problems with inequality (and equality) constraints."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from torchddn.solvers._common import (enter_normalised, finish_normalised, check_inputs, constraint_values,
                                      effective_tol, kkt_measure, objective_scale, solve_kkt)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import batch_hessian, batch_jacobian, value_and_batch_grad
from torchddn.solvers.sqp import active_set_polish


def _lagrangian(problem: Problem, lam: Tensor, z: Tensor) -> Callable[[Tensor], Tensor]:
    """``u -> f(u) + lam^T h(u) + z^T g(u)`` per batch element (``lam`` ignored without equalities)."""
    def lagrangian(u: Tensor) -> Tensor:
        h, g = constraint_values(problem, u)
        val = problem.objective(u) + (z * g).sum(dim=1)
        if h is not None:
            val = val + (lam * h).sum(dim=1)
        return val

    return lagrangian


def _residuals(problem: Problem, y: Tensor, lam: Tensor, z: Tensor, s: Tensor, mu: Tensor,
               inf_norm: bool = False):
    """Perturbed KKT residuals ``(r_d, r_h, r_g, r_c)`` of ``min f s.t. h = 0, g + s = 0, s >= 0``
    (duals ``lam`` for ``h``, ``z >= 0`` for ``g``) and their norm."""
    b = y.shape[0]
    _, r_d = value_and_batch_grad(_lagrangian(problem, lam, z), y)
    h, g = constraint_values(problem, y)
    r_h = h if h is not None else y.new_zeros(b, 0)
    r_g = g + s
    r_c = s * z - mu[:, None]
    stack = torch.cat([r_d, r_h, r_g, r_c], dim=1)
    norm = stack.abs().amax(dim=1) if inf_norm else stack.norm(dim=1)
    norm = torch.where(torch.isfinite(norm), norm, torch.full_like(norm, float("inf")))
    return r_d, r_h, r_g, r_c, norm


def _fraction_to_boundary(v: Tensor, dv: Tensor, tau: Tensor) -> Tensor:
    """Largest ``alpha <= 1`` with ``v + alpha dv >= (1 - tau) v`` per element."""
    ratio = torch.where(dv < 0, -tau * v / torch.where(dv < 0, dv, -torch.ones_like(dv)), torch.ones_like(v))
    return ratio.amin(dim=1).clamp(max=1.0) if v.shape[1] else v.new_ones(v.shape[0])


def interior_point(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, mu0: float = 0.1,
                   polish: bool = True, max_ls: int = 30, on_infeasible: str = "report") -> SolverResult:
    r"""Batched primal-dual interior-point method for ``min_y f(y) s.t. h(y) = 0, g(y) <= 0``.

    Slacks ``s > 0`` turn ``g(y) <= 0`` into ``g(y) + s = 0``, so ``y0`` need not be feasible (infeasible-start
    Newton). Each iteration takes a Newton step on the perturbed KKT conditions

    .. math::
        \nabla f + A_h^T \lambda + A_g^T z = 0,\quad h = 0,\quad g + s = 0,\quad s \circ z = \mu,

    reduced (eliminating ``s`` and ``z``) to the per-element system
    ``[W + A_g^T (Z/S) A_g,  A_h^T; A_h, 0]`` with ``W`` the Hessian of ``f + lambda^T h + z^T g``
    (Levenberg-shifted where it is not positive definite). The barrier parameter follows the monotone rule
    ``mu <- max(min(0.2 mu, mu^1.5), tol F / 10)`` (``F <= 1`` the normalised objective scale of the stopping
    rule, so that complementarity can meet it) once the barrier problem is solved to ``10 mu``. Steps obey the
    fraction-to-boundary rule ``tau = max(0.99, 1 - mu)`` (separately for ``s`` and ``z``) and a backtracking
    line search on the l1 barrier merit ``f - mu sum log s + rho (|h|_1 + |g + s|_1)``; ``z`` is kept in
    ``[mu / (1e10 s), 1e10 mu / s]``. Once the KKT residual is below ``max(1e-8, sqrt(eps))`` (or at the end),
    an active-set polish (Newton steps on the KKT system of the equalities and the inequalities with ``z > s``)
    brings it to rounding level and yields exact multipliers; it is kept per element only where it lowers the
    full KKT residual.

    Args:
        problem: a :class:`~torchddn.solvers.base.Problem` with ``ineq`` (and optionally ``eq``). Without
            inequalities this defers to :func:`~torchddn.solvers.sqp.sqp`.
        y0: ``(b, m)`` starting point (feasible or not).
        tol: stop an element when its scale-free KKT measure (:func:`~torchddn.solvers._common.kkt_measure`:
            stationarity ``|grad L|_inf L / max(|f|, |f0|, |g0|_inf L)``, violation relative to
            ``max(|c(y0)|_inf, |J|_inf L)``, complementarity ``|nu_g g|`` relative to the objective scale, and the
            multipliers' signs) is ``<= tol`` (``tol`` floored at ``64 eps``). The iteration runs in the
            normalised units of :func:`~torchddn.solvers._common.normalise` (``mu0``, the slack floor and the
            merit weights are then scale free); ``residual`` is the absolute KKT residual in the user's units.
        max_iter: maximum interior-point iterations per element.
        mu0: initial barrier parameter.
        polish: run the final active-set polish.
        on_infeasible: ``"report"`` (default: infeasible elements end with ``converged=False`` and their
            violation in ``residual``) or ``"raise"``: raise :class:`~torchddn.diagnostics.InfeasibleError`
            naming the elements stopped at a minimiser of the violation with a positive violation.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult`; ``nu = [-lambda; -z]`` (b, p + q) in the convention
        ``grad f = J^T nu`` (so inequality multipliers are ``<= 0``). Infeasible elements end with
        ``converged = False`` and their constraint violation in ``residual``.

    Cost per iteration: one Lagrangian Hessian (``m`` HVPs), one Jacobian (``p + q`` VJPs), an ``(m + p)``-square
    batched solve, and one Lagrangian gradient per line-search trial.
    """
    check_inputs(y0, tol, max_iter)
    if problem.ineq is None:
        from torchddn.solvers.sqp import sqp
        return sqp(problem, y0, tol=tol, max_iter=max_iter, on_infeasible=on_infeasible)
    tol_e = effective_tol(tol, y0.dtype)
    polish_tol = max(tol_e, 1e-8, torch.finfo(y0.dtype).eps ** 0.5)
    y = y0.detach().clone()
    b, m = y.shape
    eps = torch.finfo(y.dtype).eps
    with torch.no_grad():
        # run in normalised units (scale-free constants), report in the user's
        problem_y = problem
        nz, start_y, problem, y, start = enter_normalised(problem_y, y)
        u0 = y.clone()
        h0, g0 = constraint_values(problem, y)
        p = 0 if h0 is None else h0.shape[1]
        g0 = torch.where(torch.isfinite(g0), g0, torch.zeros_like(g0))
        s = (-g0).clamp_min(1.0)
        z = torch.ones_like(s)
        lam = y.new_zeros(b, p)
        mu = torch.full((b,), mu0, dtype=y.dtype, device=y.device)
        rho = y.new_ones(b)
        iters = torch.zeros(b, dtype=torch.int64, device=y.device)
        stalled = torch.zeros(b, dtype=torch.bool, device=y.device)
        conv = torch.zeros(b, dtype=torch.bool, device=y.device)

        def merit(u: Tensor, sl: Tensor, mu_: Tensor, rho_: Tensor) -> Tensor:
            h, g = constraint_values(problem, u)
            val = problem.objective(u) - mu_ * torch.log(sl).sum(dim=1) + rho_ * (g + sl).abs().sum(dim=1)
            if h is not None:
                val = val + rho_ * h.abs().sum(dim=1)
            return torch.where(torch.isfinite(val), val, torch.full_like(val, float("inf")))

        for it in range(int(max_iter) + 1):
            nu = torch.cat([-lam, -z], dim=1)
            res, meas = kkt_measure(problem, y, nu, start)
            conv = conv | (meas <= tol_e)
            if polish and bool((~conv & ~stalled & (meas <= polish_tol)).any()):
                # close to a solution: try to finish with Newton steps on the detected active set
                _, g = constraint_values(problem, y)
                y_p, nu_p, res_p, meas_p = active_set_polish(problem, y, nu, (z > s) & torch.isfinite(g), tol_e,
                                                             start)
                fin = ~conv & ~stalled & (meas_p <= tol_e)
                y = torch.where(fin[:, None], y_p, y)
                lam = torch.where(fin[:, None], -nu_p[:, :p], lam)
                z = torch.where(fin[:, None], -nu_p[:, p:], z)
                conv = conv | fin
            run = ~conv & ~stalled
            if it == int(max_iter) or not bool(run.any()):
                break
            # monotone barrier update: decrease mu once the barrier problem is solved to ~ kappa * mu
            _, _, _, _, E_mu = _residuals(problem, y, lam, z, s, mu, inf_norm=True)
            done_mu = run & (E_mu <= 10 * mu)
            # the floor is tol/10 in units of the objective scale F (<= 1 in normalised units; small where the
            # solution is much shorter than the start's length scale): complementarity s z ~ mu is measured as
            # |z g| / F, so a floor of tol/10 in absolute units could keep it above tol
            _, F_now = objective_scale(problem.objective(y), y, start)
            F_now = torch.where(torch.isfinite(F_now), F_now, torch.ones_like(F_now)).clamp(eps, 1.0)
            mu = torch.where(done_mu, torch.maximum(torch.minimum(0.2 * mu, mu ** 1.5), 0.1 * tol_e * F_now), mu)
            r_d, r_h, r_g, r_c, _ = _residuals(problem, y, lam, z, s, mu)
            lagrangian = _lagrangian(problem, lam.clone(), z.clone())

            f0, gf = value_and_batch_grad(problem.objective, y)
            W = batch_hessian(lagrangian, y)
            _, Jg = batch_jacobian(lambda u: constraint_values(problem, u)[1], y)
            Ah = batch_jacobian(lambda u: constraint_values(problem, u)[0], y)[1] if p else None
            Hred = W + torch.einsum("bqm,bq,bqn->bmn", Jg, z / s, Jg)
            Hred = torch.where(torch.isfinite(Hred), Hred, torch.zeros_like(Hred))
            r1 = -r_d - torch.einsum("bqm,bq->bm", Jg, (-r_c + z * r_g) / s)
            cnorm = r_g.abs().sum(dim=1) + (r_h.abs().sum(dim=1) if p else 0)

            def direction(augment: float):
                dy, dlam, ok = solve_kkt(Hred, Ah, r1, -r_h if p else None, augment=augment)
                if dlam is None:
                    dlam = y.new_zeros(b, 0)
                ds = -r_g - torch.einsum("bqm,bm->bq", Jg, dy)
                dz = (-r_c - z * ds) / s
                return dy, dlam, ds, dz, ok

            dy, dlam, ds, dz, ok = direction(1.0)
            rho_new = torch.maximum(rho, 2 * torch.cat([lam + dlam, z + dz], dim=1).abs().amax(dim=1) + 1e-2)
            slope = (gf * dy).sum(dim=1) - mu * (ds / s).sum(dim=1) - rho_new * cnorm
            redo = run & ~(ok & (slope < 0))
            if bool(redo.any()):
                dy2, dlam2, ds2, dz2, ok2 = direction(0.0)
                dy = torch.where(redo[:, None], dy2, dy)
                dlam = torch.where(redo[:, None], dlam2, dlam)
                ds = torch.where(redo[:, None], ds2, ds)
                dz = torch.where(redo[:, None], dz2, dz)
                ok = torch.where(redo, ok2, ok)
                rho_new = torch.maximum(rho, 2 * torch.cat([lam + dlam, z + dz], dim=1).abs().amax(dim=1) + 1e-2)
                slope = (gf * dy).sum(dim=1) - mu * (ds / s).sum(dim=1) - rho_new * cnorm
            rho = torch.where(run, rho_new, rho)
            slope = torch.where(slope < 0, slope, torch.zeros_like(slope))
            tau = torch.maximum(torch.full_like(mu, 0.99), 1 - mu)[:, None]
            alpha = _fraction_to_boundary(s, ds, tau)
            alpha_z = _fraction_to_boundary(z, dz, tau)
            phi0 = merit(y, s, mu, rho)
            slack = 8 * eps * (1 + phi0.abs())
            accepted = torch.zeros_like(run)
            pending = run & ok & torch.isfinite(phi0)
            for _ in range(max_ls):
                if not bool(pending.any()):
                    break
                a = alpha[:, None]
                phit = merit(y + a * dy, (s + a * ds).clamp_min(torch.finfo(y.dtype).tiny), mu, rho)
                acc = pending & (phit <= phi0 + 1e-4 * alpha * slope + slack)
                accepted = accepted | acc
                pending = pending & ~acc
                alpha = torch.where(pending, 0.5 * alpha, alpha)
            stalled = stalled | (run & ~accepted)
            a = torch.where(accepted, alpha, torch.zeros_like(alpha))[:, None]
            y = y + a * dy
            s = (s + a * ds).clamp_min(torch.finfo(y.dtype).tiny)
            lam = lam + a * dlam
            az = torch.where(accepted, alpha_z, torch.zeros_like(alpha_z))[:, None]
            z = z + az * dz
            # keep the duals within a wide band around the central path (as in IPOPT)
            z = torch.minimum(torch.maximum(z, mu[:, None] / (1e10 * s)), 1e10 * mu[:, None] / s)
            iters = iters + run.to(torch.int64)
        nu = torch.cat([-lam, -z], dim=1)
        if polish and bool((~conv).any()):
            _, g = constraint_values(problem, y)
            active = (z > s) & torch.isfinite(g) & ~conv[:, None]
            y_p, nu_p, _, _ = active_set_polish(problem, y, nu, active, tol_e, start)
            y = torch.where(conv[:, None], y, y_p)
            nu = torch.where(conv[:, None], nu, nu_p)
        y, nu, res, conv = finish_normalised(nz, problem_y, start_y, problem, y, nu, u0, tol_e, on_infeasible)
    return SolverResult(y=y, nu=nu, converged=conv, iterations=iters, residual=res, method="interior_point")
