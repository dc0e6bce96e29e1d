"""Batched Newton methods for unconstrained problems: dense (Cholesky with a Levenberg shift) and Newton-CG."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError
from torchddn.solvers._common import (StartScales, armijo, check_inputs, effective_tol, first_order_measure,
                                      precision_floor, solve_kkt, start_scales)
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import batch_hessian, batch_hvp, value_and_batch_grad
from torchddn.solvers.lbfgs import lbfgs_core

#: ``method="auto"`` uses the dense Hessian up to this many unknowns per element, Newton-CG above
DENSE_MAX = 1024
METHODS = ("auto", "dense", "cg")


def _check(f: Tensor, g: Tensor, y: Tensor, tol: float, start: StartScales) -> tuple[Tensor, Tensor]:
    m = first_order_measure(f, g, y, start)
    return m <= tol, m


def resolve_method(method: str, m: int, dense_max: int) -> str:
    """The cost rule behind ``method="auto"``: ``"dense"`` when ``m <= dense_max`` (a dense Hessian costs ``m``
    Hessian-vector products plus an ``O(m^3)`` Cholesky per iteration and converges quadratically), else
    ``"cg"`` (at most ``max_cg`` Hessian-vector products per iteration, no ``m x m`` matrix)."""
    if method not in METHODS:
        raise DDNError(f"newton: method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "dense" if m <= int(dense_max) else "cg"
    return method


def _truncated_cg(hvp, g: Tensor, active: Tensor, max_cg: int, g0norm: Tensor) -> Tensor:
    """Per-element truncated CG for ``H d = -g`` (Steihaug-style stop on negative curvature, forcing term
    ``min(0.5, sqrt(|g| / |g0|)) |g|``, scale free). Returns a descent direction for every active element."""
    b, m = g.shape
    x = torch.zeros_like(g)
    r = -g
    p = r.clone()
    rr = (r * r).sum(dim=1)
    gnorm = rr.sqrt()
    rel = (gnorm / g0norm.clamp_min(torch.finfo(g.dtype).tiny)).sqrt()
    target = torch.minimum(gnorm.new_full((), 0.5), rel) * gnorm
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


def _newton_loop(problem: Problem, y0: Tensor, tol: float, max_iter: int, method: str, fallback: bool,
                 max_cg: int, c1: float) -> SolverResult:
    check_inputs(y0, tol, max_iter)
    if problem.constrained():
        raise DDNError("newton solves unconstrained problems; use 'sqp', 'interior_point' or "
                       "'augmented_lagrangian' for constrained ones")
    obj = problem.objective
    y = y0.detach().clone()
    b, m = y.shape
    use_cg = method == "cg"
    tol_e = effective_tol(tol, y.dtype)
    eps = torch.finfo(y.dtype).eps
    floor = precision_floor(y.dtype)
    iters = torch.zeros(b, dtype=torch.int64, device=y.device)
    failed = torch.zeros(b, dtype=torch.bool, device=y.device)
    with torch.no_grad():
        f, g = value_and_batch_grad(obj, y)
        start = start_scales(problem, y, f, g)
        g0norm = g.norm(dim=1)
        conv, gm = _check(f, g, y, tol_e, start)
        first = True
        for _ in range(int(max_iter)):
            active = ~conv & ~failed
            if not bool(active.any()):
                break
            if use_cg:
                d = _truncated_cg(lambda v: batch_hvp(obj, y, v), g, active, max_cg, g0norm)
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
            # at rounding level f cannot show a decrease: accept the full Newton step where it does not raise f
            # beyond rounding and lowers the gradient (the optimality measure is the judge there)
            near = active & ~ls_ok & ~use_grad & (gm <= floor)
            if bool(near.any()):
                f_t, g_t = value_and_batch_grad(obj, y + d)
                gain = near & torch.isfinite(f_t) & (f_t <= f + 64 * eps * f.abs()) & \
                    torch.isfinite(g_t).all(dim=1) & (g_t.abs().amax(dim=1) < g.abs().amax(dim=1))
                alpha = torch.where(gain, torch.ones_like(alpha), alpha)
                ls_ok = ls_ok | gain
            stalled = active & ~ls_ok
            conv = conv | (stalled & (gm <= floor))
            failed = failed | (stalled & ~conv)
            step = active & ls_ok
            dy = alpha[:, None] * d
            tiny_step = step & ((dy.abs() <= 4 * eps * y.abs()).all(dim=1))
            conv = conv | (tiny_step & (gm <= floor))
            y = torch.where(step[:, None], y + dy, y)
            if first:
                # the first accepted displacement is a length of the problem too (it matters where y is near 0)
                start.y0 = torch.maximum(start.y0, torch.where(step, dy.abs().amax(dim=1), torch.zeros_like(f)))
                first = False
            iters = iters + active.to(torch.int64)
            f_new, g_new = value_and_batch_grad(obj, y)
            f = torch.where(step, f_new, f)
            g = torch.where(step[:, None], g_new, g)
            c_new, gm_new = _check(f, g, y, tol_e, start)
            gm = torch.where(step, gm_new, gm)
            conv = conv | (step & c_new)
        retry = failed
        if fallback and bool(retry.any()):
            y_lb, conv_lb, it_lb, _ = lbfgs_core(obj, y, tol_e, int(max_iter), active=retry, start=start)
            y = torch.where(retry[:, None], y_lb, y)
            conv = conv | (retry & conv_lb)
            iters = iters + it_lb
            f, g = value_and_batch_grad(obj, y)
    gn = g.abs().amax(dim=1) if m else g.new_zeros(b)
    gn = torch.where(torch.isfinite(gn) & torch.isfinite(f), gn, torch.full_like(gn, float("inf")))
    return SolverResult(y=y, nu=None, converged=conv, iterations=iters, residual=gn,
                        method="newton_cg" if use_cg else "newton")


_RULE = """The stopping rule is the shared scale-invariant one of :mod:`torchddn.solvers._common`: an element stops
        when ``|g|_inf L / max(|f|, |f0|, |g0|_inf L) <= tol`` with ``L = max(|y|_inf, |y0|_inf)`` (``f0``, ``g0``
        at ``y0``, ``L`` also at least the first accepted step ``|y1 - y0|_inf``; ``|g|_inf / |g0|_inf`` while
        ``L = 0``), ``tol`` floored at ``64 eps`` of the dtype. An
        element whose line search cannot decrease ``f`` (or whose step is at rounding level) while that measure
        is ``<= sqrt(eps)`` is at the attainable precision and counts as converged; otherwise it has failed."""


def newton(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, method: str = "auto",
           dense_max: int = DENSE_MAX, fallback: bool = True, max_cg: int = 250, c1: float = 1e-4,
           cg_threshold: Optional[int] = None) -> SolverResult:
    r"""Batched damped Newton method for ``min_y f(y)``.

    Per element and iteration: ``d = -(H + delta I)^{-1} grad f`` with ``H = D^2 f`` from :func:`batch_hessian`
    and a Cholesky factorisation; ``delta`` is 0 when ``H`` is positive definite, otherwise a Levenberg shift
    that grows tenfold until the factorisation succeeds (the gradient direction is used if none does). The step
    length comes from a backtracking Armijo line search. Converged elements are frozen; iteration counts are
    kept per element. Elements whose line search fails are handed to :func:`~torchddn.solvers.lbfgs.lbfgs`.

    Which inner solve runs is an explicit choice (``method``), reported in ``SolverResult.method``
    (``"newton"`` for the dense path, ``"newton_cg"`` for the matrix-free one): ``"dense"``, ``"cg"``
    (:func:`newton_cg`), or ``"auto"``: dense when ``m <= dense_max`` (default 1024), CG above. The rule
    weighs cost: the dense path costs ``m`` Hessian-vector products and an ``O(m^3)`` Cholesky per iteration and
    converges quadratically (a quadratic objective in one step); CG costs up to ``max_cg`` products per
    iteration and needs no ``m x m`` matrix, which matters once ``b m^2`` numbers no longer fit comfortably.

    Args:
        problem: an unconstrained :class:`~torchddn.solvers.base.Problem`.
        y0: ``(b, m)`` starting point; the objective and its gradient must be finite there
            (:class:`~torchddn.diagnostics.DDNError` otherwise, naming the elements).
        tol: relative tolerance of the stopping rule below.
        max_iter: maximum Newton iterations per element (the L-BFGS fallback gets the same budget again).
        method: ``"auto"``, ``"dense"`` or ``"cg"`` (see above).
        dense_max: the ``"auto"`` threshold on ``m``.
        fallback: run L-BFGS on elements where Newton's line search fails.
        max_cg: maximum CG iterations per Newton step (CG path only).
        c1: Armijo constant.
        cg_threshold: deprecated alias of ``dense_max``.

    {RULE}

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` with ``nu=None`` and ``residual = max|grad f|``
        (``inf`` where the objective is not finite).

    Cost per iteration: one batched Hessian (``m`` Hessian-vector products) and a ``(b, m, m)`` Cholesky
    (``O(b m^3)``), plus one objective evaluation per line-search trial.
    """
    b, m = y0.shape if isinstance(y0, Tensor) and y0.dim() == 2 else (0, 0)
    if cg_threshold is not None:
        dense_max = cg_threshold
    return _newton_loop(problem, y0, tol, max_iter, resolve_method(method, m, dense_max), fallback=fallback,
                        max_cg=max_cg, c1=c1)


def newton_cg(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100, fallback: bool = True,
              max_cg: int = 250, c1: float = 1e-4) -> SolverResult:
    r"""Batched matrix-free Newton-CG (truncated Newton) for ``min_y f(y)``.

    The Newton system ``H d = -grad f`` is solved inexactly per element by conjugate gradients on
    :func:`batch_hvp` products, stopping at relative residual ``min(0.5, sqrt(|grad f| / |grad f(y0)|))`` or on
    negative curvature (then the CG iterate so far, or ``-grad f``, is used), followed by an Armijo line search.
    Fallback and outputs as in :func:`newton` (``method="newton_cg"``).

    {RULE}

    Cost per iteration: up to ``max_cg`` batched Hessian-vector products (``O(cost of f)`` each); no dense
    ``m x m`` matrix is formed.
    """
    return _newton_loop(problem, y0, tol, max_iter, "cg", fallback=fallback, max_cg=max_cg, c1=c1)


for _fn in (newton, newton_cg):
    _fn.__doc__ = _fn.__doc__.replace("{RULE}", _RULE)
