"""Batched Newton methods for unconstrained problems: dense (Cholesky with a Levenberg shift) and Newton-CG."""
from __future__ import annotations

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError
from torchddn.solvers._common import armijo, check_inputs, effective_tol, solve_kkt
from torchddn.solvers.base import Problem, SolverResult, batch_hessian, batch_hvp, value_and_batch_grad
from torchddn.solvers.lbfgs import lbfgs_core


def _grad_test(f: Tensor, g: Tensor, tol: float) -> tuple[Tensor, Tensor]:
    gn = g.abs().amax(dim=1) if g.shape[1] else g.new_zeros(g.shape[0])
    finite = torch.isfinite(f) & torch.isfinite(gn)
    return finite & (gn <= tol * f.abs().clamp_min(1.0)), gn


def _truncated_cg(hvp, g: Tensor, active: Tensor, max_cg: int) -> Tensor:
    """Per-element truncated CG for ``H d = -g`` (Steihaug-style stop on negative curvature, forcing term
    ``min(0.5, sqrt|g|) |g|``). Returns a descent direction for every active element."""
    b, m = g.shape
    x = torch.zeros_like(g)
    r = -g
    p = r.clone()
    rr = (r * r).sum(dim=1)
    gnorm = rr.sqrt()
    target = torch.minimum(gnorm.new_full((), 0.5), gnorm.sqrt()) * gnorm
    done = ~active | (gnorm == 0)
    tiny = torch.finfo(g.dtype).tiny
    for k in range(max_cg):
        if bool(done.all()):
            break
        Hp = hvp(p)
        pHp = (p * Hp).sum(dim=1)
        pp = (p * p).sum(dim=1)
        negc = ~done & ~(pHp > torch.finfo(g.dtype).eps * pp)
        if k == 0:
            x = torch.where(negc[:, None], -g, x)
        done = done | negc
        a = rr / torch.where(done, torch.ones_like(pHp), pHp)
        x = torch.where(done[:, None], x, x + a[:, None] * p)
        r_new = torch.where(done[:, None], r, r - a[:, None] * Hp)
        rr_new = (r_new * r_new).sum(dim=1)
        done = done | (rr_new.sqrt() <= target)
        beta = rr_new / rr.clamp_min(tiny)
        p = torch.where(done[:, None], p, r_new + beta[:, None] * p)
        r, rr = r_new, rr_new
    return x


def _newton_loop(problem: Problem, y0: Tensor, tol: float, max_iter: int, use_cg: bool, fallback: bool,
                 max_cg: int, c1: float) -> SolverResult:
    check_inputs(y0, tol, max_iter)
    if problem.constrained():
        raise DDNError("newton solves unconstrained problems; use 'sqp', 'interior_point' or "
                       "'augmented_lagrangian' for constrained ones")
    obj = problem.objective
    y = y0.detach().clone()
    b, m = y.shape
    tol_e = effective_tol(tol, y.dtype)
    eps = torch.finfo(y.dtype).eps
    iters = torch.zeros(b, dtype=torch.int64, device=y.device)
    failed = torch.zeros(b, dtype=torch.bool, device=y.device)
    with torch.no_grad():
        f, g = value_and_batch_grad(obj, y)
        conv, gn = _grad_test(f, g, tol_e)
        bad_start = ~torch.isfinite(f) | ~torch.isfinite(g).all(dim=1)
        failed = failed | bad_start
        for _ in range(int(max_iter)):
            active = ~conv & ~failed
            if not bool(active.any()):
                break
            if use_cg:
                d = _truncated_cg(lambda v: batch_hvp(obj, y, v), g, active, max_cg)
                ok = torch.isfinite(d).all(dim=1)
            else:
                H = batch_hessian(obj, y)
                H = torch.where(torch.isfinite(H), H, torch.zeros_like(H))
                d, _, ok = solve_kkt(H, None, -g, None)
            slope = (g * d).sum(dim=1)
            use_grad = ~ok | ~(slope < 0) | ~torch.isfinite(slope)
            d = torch.where(use_grad[:, None], -g, d)
            slope = (g * d).sum(dim=1)
            alpha, _, ls_ok = armijo(obj, y, f, d, slope, active, c1=c1)
            stalled = active & ~ls_ok
            conv = conv | (stalled & (gn <= eps ** 0.5 * f.abs().clamp_min(1.0)))
            failed = failed | (stalled & ~conv)
            step = active & ls_ok
            dy = alpha[:, None] * d
            tiny_step = step & ((dy.abs() <= 4 * eps * (1 + y.abs())).all(dim=1))
            conv = conv | (tiny_step & (gn <= eps ** 0.5 * f.abs().clamp_min(1.0)))
            y = torch.where(step[:, None], y + dy, y)
            iters = iters + active.to(torch.int64)
            f_new, g_new = value_and_batch_grad(obj, y)
            f = torch.where(step, f_new, f)
            g = torch.where(step[:, None], g_new, g)
            c_new, gn_new = _grad_test(f, g, tol_e)
            gn = torch.where(step, gn_new, gn)
            conv = conv | (step & c_new)
        retry = failed & ~bad_start
        if fallback and bool(retry.any()):
            y_lb, conv_lb, it_lb, gn_lb = lbfgs_core(obj, y, tol_e, int(max_iter), active=retry)
            y = torch.where(retry[:, None], y_lb, y)
            conv = conv | (retry & conv_lb)
            iters = iters + it_lb
            gn = torch.where(retry, gn_lb, gn)
    gn = torch.where(torch.isnan(gn) | bad_start, torch.full_like(gn, float("inf")), gn)
    return SolverResult(y=y, nu=None, converged=conv, iterations=iters, residual=gn)


def newton(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, cg_threshold: int = 256,
           fallback: bool = True, max_cg: int = 250, c1: float = 1e-4) -> SolverResult:
    r"""Batched damped Newton method for ``min_y f(y)``.

    Per element and iteration: ``d = -(H + delta I)^{-1} grad f`` with ``H = D^2 f`` from :func:`batch_hessian`
    and a Cholesky factorisation; ``delta`` is 0 when ``H`` is positive definite, otherwise a Levenberg shift
    that grows tenfold until the factorisation succeeds (the gradient direction is used if none does). The step
    length comes from a backtracking Armijo line search. Converged elements are frozen; iteration counts are
    kept per element. Elements whose line search fails are handed to :func:`~torchddn.solvers.lbfgs.lbfgs`.
    For ``m > cg_threshold`` the inner solve is matrix-free (:func:`newton_cg`).

    Args:
        problem: an unconstrained :class:`~torchddn.solvers.base.Problem`.
        y0: ``(b, m)`` starting point.
        tol: stop an element when ``max|grad f| <= tol * max(1, |f|)`` (scale-aware; ``tol`` is floored at
            ``64 eps`` of the dtype). An element whose line search cannot decrease ``f`` while
            ``max|grad f| <= sqrt(eps) * max(1, |f|)`` (or whose step is below rounding level there) is at the
            attainable precision and counts as converged.
        max_iter: maximum Newton iterations per element (the L-BFGS fallback gets the same budget again).
        cg_threshold: use truncated CG on Hessian-vector products when ``m`` exceeds it.
        fallback: run L-BFGS on elements where Newton's line search fails.
        max_cg: maximum CG iterations per Newton step (CG path only).
        c1: Armijo constant.

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` with ``nu=None`` and ``residual = max|grad f|``
        (``inf`` where the objective is not finite).

    Cost per iteration: one batched Hessian (``m`` Hessian-vector products) and a ``(b, m, m)`` Cholesky
    (``O(b m^3)``), plus one objective evaluation per line-search trial.
    """
    b, m = y0.shape if isinstance(y0, Tensor) and y0.dim() == 2 else (0, 0)
    return _newton_loop(problem, y0, tol, max_iter, use_cg=m > cg_threshold, fallback=fallback,
                        max_cg=max_cg, c1=c1)


def newton_cg(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, fallback: bool = True,
              max_cg: int = 250, c1: float = 1e-4) -> SolverResult:
    r"""Batched matrix-free Newton-CG (truncated Newton) for ``min_y f(y)``.

    The Newton system ``H d = -grad f`` is solved inexactly per element by conjugate gradients on
    :func:`batch_hvp` products, stopping at relative residual ``min(0.5, sqrt|grad f|)`` or on negative
    curvature (then the CG iterate so far, or ``-grad f``, is used), followed by an Armijo line search.
    Stopping rule, fallback and outputs as in :func:`newton`.

    Cost per iteration: up to ``max_cg`` batched Hessian-vector products (``O(cost of f)`` each); no dense
    ``m x m`` matrix is formed.
    """
    return _newton_loop(problem, y0, tol, max_iter, use_cg=True, fallback=fallback, max_cg=max_cg, c1=c1)
