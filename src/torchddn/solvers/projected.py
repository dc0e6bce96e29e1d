"""Batched projected methods for simple feasible sets, and ready-made Euclidean projections.

The projections return callables ``(b, m) -> (b, m)`` to put in :attr:`Problem.project`.
"""
from __future__ import annotations

from typing import Callable, Union

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError
from torchddn.solvers._common import (StartScales, armijo, check_inputs, effective_tol, first_order_measure,
                                      objective_scale, precision_floor, recover_multipliers, start_scales)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import batch_hessian, value_and_batch_grad

Projection = Callable[[Tensor], Tensor]


def project_box(lo: Union[float, Tensor] = 0.0, hi: Union[float, Tensor] = 1.0) -> Projection:
    """Projection onto the box ``lo <= y <= hi`` (bounds broadcast against ``(b, m)``). Cost ``O(b m)``."""
    def proj(y: Tensor) -> Tensor:
        lo_t = torch.as_tensor(lo, dtype=y.dtype, device=y.device)
        hi_t = torch.as_tensor(hi, dtype=y.dtype, device=y.device)
        return torch.maximum(torch.minimum(y, hi_t), lo_t)
    return proj


def project_simplex(total: float = 1.0) -> Projection:
    """Projection onto the simplex ``{y >= 0, sum(y) = total}`` by the sort-based algorithm
    (Held, Wolfe & Crowder; Duchi et al. 2008). Cost ``O(b m log m)``."""
    def proj(y: Tensor) -> Tensor:
        m = y.shape[-1]
        u, _ = torch.sort(y, dim=-1, descending=True)
        css = u.cumsum(dim=-1) - total
        k = torch.arange(1, m + 1, dtype=y.dtype, device=y.device)
        cond = (u - css / k) > 0
        rho = (cond.to(torch.int64) * torch.arange(m, device=y.device)).amax(dim=-1, keepdim=True)
        theta = css.gather(-1, rho) / (rho + 1).to(y.dtype)
        return (y - theta).clamp_min(0)
    return proj


def project_ball(radius: float = 1.0) -> Projection:
    """Projection onto the Euclidean ball ``|y| <= radius``. Cost ``O(b m)``."""
    def proj(y: Tensor) -> Tensor:
        n = y.norm(dim=-1, keepdim=True)
        return y * (radius / n.clamp_min(radius))
    return proj


def project_sphere(radius: float = 1.0) -> Projection:
    """Projection onto the sphere ``|y| = radius`` (the first basis vector times ``radius`` where ``y = 0``,
    whose projection is not unique). Cost ``O(b m)``."""
    def proj(y: Tensor) -> Tensor:
        n = y.norm(dim=-1, keepdim=True)
        e1 = torch.zeros_like(y)
        e1[..., 0] = 1
        safe = torch.where(n > 0, y, e1)
        return radius * safe / safe.norm(dim=-1, keepdim=True)
    return proj


def _step_length(f: Tensor, y: Tensor, g: Tensor, start: StartScales) -> Tensor:
    """A scale-free step ``tau`` (b,) for ``y - tau g``: half the typical length per unit gradient,
    ``tau = L / (2 max(|g|_inf, |g0|_inf))`` with ``L = max(|y|_inf, |y0|_inf)`` (``F / |g|^2`` while ``L = 0``)."""
    L, F = objective_scale(f, y, start)
    gmax = torch.maximum(g.abs().amax(dim=1), start.g0).clamp_min(torch.finfo(y.dtype).tiny)
    length = torch.where(L > 0, L, F / gmax)
    tau = 0.5 * length / gmax
    return torch.where(torch.isfinite(tau) & (tau > 0), tau, torch.ones_like(tau))


def _stationarity(project: Projection, y: Tensor, f: Tensor, g: Tensor, start: StartScales
                  ) -> tuple[Tensor, Tensor]:
    """``(measure, residual)``: the projected gradient ``pg = (y - P(y - tau g)) / tau`` (``tau`` from
    :func:`_step_length`, short enough to measure stationarity on nonconvex sets such as spheres) judged by the
    shared scale-invariant rule (``first_order_measure(f, pg, y)``), and ``max|pg|``; NaN gives ``inf``."""
    tau = _step_length(f, y, g, start)[:, None]
    pg = (y - project(y - tau * g)) / tau
    m = first_order_measure(f, pg, y, start)
    r = pg.abs().amax(dim=1) if pg.shape[1] else pg.new_zeros(pg.shape[0])
    return m, torch.where(torch.isfinite(r), r, torch.full_like(r, float("inf")))


def _finish(problem: Problem, y: Tensor, conv: Tensor, iters: Tensor, res: Tensor, method: str) -> SolverResult:
    nu = recover_multipliers(problem, y) if problem.constrained() else None
    return SolverResult(y=y, nu=nu, converged=conv, iterations=iters, residual=res, method=method)


def _pg_step(obj, proj: Projection, y: Tensor, f: Tensor, g: Tensor, t: Tensor, run: Tensor, c1: float,
             max_ls: int) -> tuple[Tensor, Tensor, Tensor]:
    """Backtracking projected-gradient step: ``y+ = P(y - t g)`` with the sufficient decrease
    ``f(y+) <= f - c1 / t |y+ - y|^2`` (valid for nonconvex sets too). Returns ``(y_new, t, accepted)``."""
    accepted = torch.zeros_like(run)
    pending = run.clone()
    y_new = y.clone()
    slack = 8 * torch.finfo(y.dtype).eps * (1 + f.abs())
    for _ in range(max_ls):
        if not bool(pending.any()):
            break
        yt = proj(y - t[:, None] * g)
        ft = obj(yt)
        dec = ((yt - y) ** 2).sum(dim=1) / t
        acc = pending & torch.isfinite(ft) & (ft <= f - c1 * dec + slack)
        y_new = torch.where(acc[:, None], yt, y_new)
        accepted = accepted | acc
        pending = pending & ~acc
        t = torch.where(pending, 0.5 * t, t)
    return y_new, t, accepted


def _check_project(problem: Problem) -> Projection:
    if problem.project is None:
        raise DDNError("projected solvers need problem.project (a (b, m) -> (b, m) Euclidean projection), e.g. "
                       "torchddn.solvers.projected.project_simplex()")
    return problem.project


def _start(problem: Problem, y0: Tensor, tol: float, max_iter: int):
    """Shared start of the projected methods: checks, the projected starting point, its value and gradient,
    and the per-element state (iterations, converged, failed, stationarity residual)."""
    check_inputs(y0, tol, max_iter)
    proj = _check_project(problem)
    tol_e = effective_tol(tol, y0.dtype)
    obj = problem.objective
    with torch.no_grad():
        y = proj(y0.detach())
        bad = ~torch.isfinite(y).all(dim=1)
        if bool(bad.any()):
            from torchddn.diagnostics import element_list
            raise DDNError(f"problem.project(y0) is NaN or Inf at batch elements {element_list(bad)}")
        b = y.shape[0]
        f, g = value_and_batch_grad(obj, y)
        start = start_scales(Problem(obj), y, f, g, name="P(y0)")
        iters = torch.zeros(b, dtype=torch.int64, device=y.device)
        conv = torch.zeros(b, dtype=torch.bool, device=y.device)
        failed = torch.zeros(b, dtype=torch.bool, device=y.device)
        meas, res = _stationarity(proj, y, f, g, start)
    return proj, obj, tol_e, y, f, g, iters, conv, failed, (meas, res), start


def _check_convergence(meas: Tensor, tol_e: float, conv: Tensor, failed: Tensor):
    """Mark elements whose scale-free stationarity measure is ``<= tol``; returns ``(conv, run)``."""
    conv = conv | (~failed & (meas <= tol_e))
    return conv, ~conv & ~failed


def projected_gradient(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100,
                       c1: float = 1e-4, max_ls: int = 40) -> SolverResult:
    r"""Batched projected gradient descent for ``min_y f(y) s.t. y in C`` with ``problem.project = P_C``.

    Steps ``y+ = P(y - t grad f)`` with a Barzilai-Borwein trial step ``t`` and backtracking along the projection
    arc until ``f(y+) <= f(y) - c1 |y+ - y|^2 / t`` (a sufficient-decrease rule that also holds for nonconvex
    sets such as spheres).

    Args:
        problem: a :class:`~torchddn.solvers.base.Problem` with ``project`` (``eq``/``ineq``, if given, are only
            used to recover multipliers at the end).
        y0: ``(b, m)`` starting point (projected first).
        tol: stop an element when the projected gradient ``pg = (y - P(y - tau grad f)) / tau`` passes the shared
            scale-invariant rule of :mod:`torchddn.solvers._common`, ``|pg|_inf L / max(|f|, |f0|, |g0|_inf L)
            <= tol`` (``L = max(|y|_inf, |y0|_inf)``, ``f0``, ``g0`` at ``P(y0)``), with the scale-free step
            ``tau = L / (2 max(|grad f|_inf, |g0|_inf))``; ``tol`` is floored at ``64 eps``. An element whose
            line search fails with that measure ``<= sqrt(eps)`` is at the attainable precision (converged).
        max_iter: maximum iterations per element.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult`; ``residual`` is ``max|pg|`` (absolute);
        ``nu`` are least-squares multipliers when ``eq``/``ineq`` are given, else None.

    Cost per iteration: one gradient, and one projection plus one objective evaluation per line-search trial.
    """
    proj, obj, tol_e, y, f, g, iters, conv, failed, (meas, res), start = _start(problem, y0, tol, max_iter)
    floor = precision_floor(y.dtype)
    with torch.no_grad():
        t = 2.0 * _step_length(f, y, g, start)
        for it in range(int(max_iter) + 1):
            conv, run = _check_convergence(meas, tol_e, conv, failed)
            if it == int(max_iter) or not bool(run.any()):
                break
            y_new, t, accepted = _pg_step(obj, proj, y, f, g, t, run, c1, max_ls)
            conv = conv | (run & ~accepted & (meas <= floor))
            failed = failed | (run & ~accepted & ~conv)
            f_new, g_new = value_and_batch_grad(obj, y_new)
            s, yv = y_new - y, g_new - g
            sy, ss = (s * yv).sum(dim=1), (s * s).sum(dim=1)
            t = torch.where(accepted & (sy > 0), ss / torch.where(sy > 0, sy, torch.ones_like(sy)), t * 2)
            y = torch.where(accepted[:, None], y_new, y)
            f = torch.where(accepted, f_new, f)
            g = torch.where(accepted[:, None], g_new, g)
            m_new, r_new = _stationarity(proj, y, f, g, start)
            meas = torch.where(accepted, m_new, meas)
            res = torch.where(accepted, r_new, res)
            iters = iters + run.to(torch.int64)
    return _finish(problem, y, conv, iters, res, "projected_gradient")


def projected_newton(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100,
                     inner_iter: int = 200, c1: float = 1e-4, max_ls: int = 40) -> SolverResult:
    r"""Batched projected (proximal) Newton method for ``min_y f(y) s.t. y in C`` with ``problem.project = P_C``.

    Each iteration minimises the quadratic model ``g^T (u - y) + 1/2 (u - y)^T H (u - y)`` over ``C`` by
    accelerated projected gradient (FISTA, step ``1 / lambda_max(H)``; ``H`` from :func:`batch_hessian`, shifted
    to positive definite where needed), then line-searches along ``d = u - y`` with ``y+ = P(y + alpha d)``.
    Converges quadratically near a solution where the active constraints are identified; for nonconvex sets
    (spheres) the final projection keeps iterates feasible, and a projected-gradient step is taken where the
    model step fails its line search.

    Args:
        problem, y0, tol, max_iter: as in :func:`projected_gradient` (same stopping rule).
        inner_iter: maximum FISTA iterations per model solve.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` as in :func:`projected_gradient`.

    Cost per iteration: a dense Hessian (``m`` HVPs), an ``(b, m, m)`` eigen-decomposition for the step size,
    ``inner_iter`` batched mat-vecs and projections, and the line search.
    """
    proj, obj, tol_e, y, f, g, iters, conv, failed, (meas, res), start = _start(problem, y0, tol, max_iter)
    floor = precision_floor(y.dtype)
    with torch.no_grad():
        eye = torch.eye(y.shape[1], dtype=y.dtype, device=y.device)
        for it in range(int(max_iter) + 1):
            conv, run = _check_convergence(meas, tol_e, conv, failed)
            if it == int(max_iter) or not bool(run.any()):
                break
            H = batch_hessian(obj, y)
            H = torch.where(torch.isfinite(H), H, torch.zeros_like(H))
            ev = torch.linalg.eigvalsh(0.5 * (H + H.transpose(1, 2)))
            floor = 1e-6 * ev[:, -1].abs().clamp_min(1.0)
            shift = (floor - ev[:, 0]).clamp_min(0)
            H = H + shift[:, None, None] * eye
            step = 1.0 / (ev[:, -1] + shift).clamp_min(floor)
            # FISTA on the model
            u = y.clone()
            w = y.clone()
            tk = 1.0
            inner_tol = 0.1 * tol_e * objective_scale(f, y, start)[0]
            for _ in range(inner_iter):
                grad_w = g + torch.einsum("bmn,bn->bm", H, w - y)
                u_new = proj(w - step[:, None] * grad_w)
                t_next = 0.5 * (1 + (1 + 4 * tk * tk) ** 0.5)
                w = u_new + ((tk - 1) / t_next) * (u_new - u)
                change = (u_new - u).abs().amax(dim=1)
                u, tk = u_new, t_next
                if bool((change <= inner_tol).all()):
                    break
            d = u - y
            slope = (g * d).sum(dim=1)
            d = torch.where((slope < 0)[:, None], d, proj(y - g) - y)
            slope = (g * d).sum(dim=1)
            # Armijo along the projected path y+ = P(y + alpha d)
            alpha, _, accepted = armijo(lambda u: obj(proj(u)), y, f, d, slope, run, c1=c1, max_steps=max_ls)
            y_new = torch.where(accepted[:, None], proj(y + alpha[:, None] * d), y)
            # where the Newton model step fails (e.g. nonconvex sets), take a projected-gradient step instead
            retry = run & ~accepted
            if bool(retry.any()):
                t0 = 2.0 * _step_length(f, y, g, start)
                y_pg, _, acc_pg = _pg_step(obj, proj, y, f, g, t0, retry, c1, max_ls)
                y_new = torch.where((retry & acc_pg)[:, None], y_pg, y_new)
                accepted = accepted | (retry & acc_pg)
            conv = conv | (run & ~accepted & (meas <= floor))
            failed = failed | (run & ~accepted & ~conv)
            f_new, g_new = value_and_batch_grad(obj, y_new)
            y = torch.where(accepted[:, None], y_new, y)
            f = torch.where(accepted, f_new, f)
            g = torch.where(accepted[:, None], g_new, g)
            m_new, r_new = _stationarity(proj, y, f, g, start)
            meas = torch.where(accepted, m_new, meas)
            res = torch.where(accepted, r_new, res)
            iters = iters + run.to(torch.int64)
    return _finish(problem, y, conv, iters, res, "projected_newton")
