"""Batched limited-memory BFGS for unconstrained problems (pure torch; not ``torch.optim``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError
from torchddn.solvers._common import (StartScales, armijo, check_inputs, effective_tol, first_order_measure,
                                      objective_scale, precision_floor, start_scales)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import value_and_batch_grad


def _converged(f: Tensor, g: Tensor, y: Tensor, tol: float, start: StartScales) -> tuple[Tensor, Tensor]:
    m = first_order_measure(f, g, y, start)
    return m <= tol, m


def lbfgs_core(objective, y: Tensor, tol: float, max_iter: int, active: Optional[Tensor] = None,
               history: int = 10, c1: float = 1e-4, start: Optional[StartScales] = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L-BFGS on the elements in ``active`` (others are left untouched).

    ``start`` holds the typical scales of the stopping rule (default: taken at ``y``). Returns
    ``(y, converged, iterations, measure)``. ``tol`` is used as is (already dtype-floored).
    """
    b, m = y.shape
    y = y.clone()
    if active is None:
        active = torch.ones(b, dtype=torch.bool, device=y.device)
    S = y.new_zeros(b, history, m)
    Yh = y.new_zeros(b, history, m)
    rho = y.new_zeros(b, history)
    gamma = y.new_ones(b)
    iters = torch.zeros(b, dtype=torch.int64, device=y.device)
    failed = torch.zeros(b, dtype=torch.bool, device=y.device)
    fresh = torch.ones(b, dtype=torch.bool, device=y.device)
    eps = torch.finfo(y.dtype).eps
    floor = precision_floor(y.dtype)
    with torch.no_grad():
        f, g = value_and_batch_grad(objective, y)
    if start is None:
        start = start_scales(Problem(objective), y, f, g)
    conv, gn = _converged(f, g, y, tol, start)
    for it in range(max_iter):
        run = active & ~conv & ~failed & torch.isfinite(f)
        if not bool(run.any()):
            break
        # two-loop recursion, newest pair in slot 0
        q = g.clone()
        a = []
        for i in range(history):
            ai = rho[:, i] * (S[:, i] * q).sum(dim=1)
            q = q - ai[:, None] * Yh[:, i]
            a.append(ai)
        r = gamma[:, None] * q
        for i in reversed(range(history)):
            beta = rho[:, i] * (Yh[:, i] * r).sum(dim=1)
            r = r + (a[i] - beta)[:, None] * S[:, i]
        d = -r
        slope = (g * d).sum(dim=1)
        restart = fresh | ~(slope < 0) | ~torch.isfinite(slope)
        # a (re)start takes a gradient step of the typical length: L, or F / |g| while L = 0 (scale free)
        L, F = objective_scale(f, y, start)
        gmax = g.abs().amax(dim=1).clamp_min(torch.finfo(y.dtype).tiny)
        length = torch.where(L > 0, L, F / gmax)
        length = torch.where(torch.isfinite(length) & (length > 0), length, torch.ones_like(length))
        d = torch.where(restart[:, None], -g * (length / gmax)[:, None], d)
        rho = torch.where(restart[:, None], torch.zeros_like(rho), rho)
        slope = (g * d).sum(dim=1)
        alpha, _, ok = armijo(objective, y, f, d, slope, run, c1=c1)
        # precision floor: a failed search with a tiny gradient means we are at the attainable optimum
        stalled = run & ~ok
        conv = conv | (stalled & (gn <= floor))
        failed = failed | (stalled & ~conv)
        step = run & ok
        s = (alpha * step.to(alpha.dtype))[:, None] * d
        y_new = y + s
        tiny_step = step & ((s.abs() <= 4 * eps * y.abs()).all(dim=1))
        conv = conv | (tiny_step & (gn <= floor))
        with torch.no_grad():
            f_new, g_new = value_and_batch_grad(objective, y_new)
        yv = g_new - g
        sy = (s * yv).sum(dim=1)
        valid = step & (sy > eps * s.norm(dim=1) * yv.norm(dim=1))
        S = torch.where(step[:, None, None], torch.cat([s[:, None], S[:, :-1]], dim=1), S)
        Yh = torch.where(step[:, None, None], torch.cat([yv[:, None], Yh[:, :-1]], dim=1), Yh)
        new_rho = torch.where(valid, 1.0 / torch.where(valid, sy, torch.ones_like(sy)), torch.zeros_like(sy))
        rho = torch.where(step[:, None], torch.cat([new_rho[:, None], rho[:, :-1]], dim=1), rho)
        yy = (yv * yv).sum(dim=1)
        gamma = torch.where(valid, sy / torch.where(valid, yy, torch.ones_like(yy)), gamma)
        fresh = fresh & ~valid
        y = torch.where(step[:, None], y_new, y)
        f = torch.where(step, f_new, f)
        g = torch.where(step[:, None], g_new, g)
        iters = iters + run.to(torch.int64)
        c_new, gn_new = _converged(f, g, y, tol, start)
        gn = torch.where(step, gn_new, gn)
        conv = conv | (active & c_new)
    return y, conv & active, iters, gn


def lbfgs(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, history: int = 10,
          c1: float = 1e-4) -> SolverResult:
    r"""Batched L-BFGS for ``min_y f(y)`` with a backtracking (Armijo) line search.

    Every batch element keeps its own curvature pairs, step length and stopping state; converged elements are
    frozen. Pairs with ``s^T y <= eps |s| |y|`` are skipped, so the inverse-Hessian model stays positive definite.

    Args:
        problem: an unconstrained :class:`~torchddn.solvers.base.Problem`.
        y0: ``(b, m)`` starting point.
        tol: the shared scale-invariant rule of :mod:`torchddn.solvers._common`: stop an element when
            ``|g|_inf L / max(|f|, |f0|, |g0|_inf L) <= tol`` with ``L = max(|y|_inf, |y0|_inf)`` (``f0``, ``g0``
            at ``y0``; ``tol`` floored at ``64 eps`` of the dtype). A line search that cannot decrease ``f``
            while that measure is ``<= sqrt(eps)`` also counts as converged (the attainable precision). The
            first step (and every restart) is a gradient step of length ``L`` (``F / |g|`` while ``L = 0``),
            so the iteration itself is scale free too.
        max_iter: maximum number of iterations per element.
        history: number of stored curvature pairs.
        c1: Armijo constant.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` with ``nu=None`` and ``residual = max|grad f|``.

    Cost per iteration: one batched gradient, the line search's objective evaluations and ``O(history * m)``
    vector operations per element.
    """
    check_inputs(y0, tol, max_iter)
    if problem.constrained():
        raise DDNError("lbfgs solves unconstrained problems; use 'sqp', 'interior_point' or "
                       "'augmented_lagrangian' for constrained ones")
    tol_e = effective_tol(tol, y0.dtype)
    with torch.no_grad():
        y0d = y0.detach()
        start = start_scales(problem, y0d)
        y, conv, iters, _ = lbfgs_core(problem.objective, y0d, tol_e, int(max_iter), history=history, c1=c1,
                                       start=start)
        f, g = value_and_batch_grad(problem.objective, y)
    gn = g.abs().amax(dim=1) if g.shape[1] else g.new_zeros(g.shape[0])
    gn = torch.where(torch.isfinite(gn) & torch.isfinite(f), gn, torch.full_like(gn, float("inf")))
    return SolverResult(y=y, nu=None, converged=conv, iterations=iters, residual=gn, method="lbfgs")
