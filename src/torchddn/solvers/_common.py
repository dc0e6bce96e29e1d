"""Shared pieces of the built-in solvers: tolerances, input checks, KKT residuals, multiplier recovery and
regularised batched linear solves. Everything is batched over the leading dimension and dtype/device agnostic."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError, element_list
from torchddn.solvers.base import Problem, batch_jacobian, value_and_batch_grad


def effective_tol(tol: float, dtype: torch.dtype) -> float:
    """``tol`` raised to a floor the dtype can actually reach (``64 * eps``; about 7.6e-6 for float32)."""
    return max(float(tol), 64.0 * torch.finfo(dtype).eps)


def check_inputs(y0: Tensor, tol: float, max_iter: int) -> None:
    """Validate a solver's ``y0`` (a finite floating (b, m) tensor), ``tol`` and ``max_iter``."""
    if not isinstance(y0, Tensor) or y0.dim() != 2:
        shape = tuple(y0.shape) if isinstance(y0, Tensor) else type(y0).__name__
        raise DDNError(f"y0 must be a (b, m) tensor, got {shape}")
    if not y0.is_floating_point():
        raise DDNError(f"y0 must be a floating point tensor, got dtype {y0.dtype}")
    bad = ~torch.isfinite(y0).all(dim=1)
    if bad.any():
        raise DDNError(f"y0 contains NaN or Inf at batch elements {element_list(bad)}")
    if not tol > 0:
        raise DDNError(f"tol must be positive, got {tol}")
    if int(max_iter) < 0:
        raise DDNError(f"max_iter must be non-negative, got {max_iter}")


def constraint_values(problem: Problem, y: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """``(h(y), g(y))`` reshaped to ``(b, p)`` / ``(b, q)`` (or None where absent)."""
    b = y.shape[0]
    h = problem.eq(y).reshape(b, -1) if problem.eq is not None else None
    g = problem.ineq(y).reshape(b, -1) if problem.ineq is not None else None
    return h, g


def constraints_fn(problem: Problem):
    """The stacked constraint function ``y -> [h(y); g(y)]`` of shape ``(b, p + q)``, or None."""
    if not problem.constrained():
        return None

    def c(y: Tensor) -> Tensor:
        h, g = constraint_values(problem, y)
        return torch.cat([t for t in (h, g) if t is not None], dim=1)

    return c


def num_constraints(problem: Problem, y: Tensor) -> tuple[int, int]:
    """``(p, q)``: the number of equality and inequality constraints."""
    h, g = constraint_values(problem, y)
    return (0 if h is None else h.shape[1]), (0 if g is None else g.shape[1])


def violation(h: Optional[Tensor], g: Optional[Tensor], b: int, like: Tensor) -> Tensor:
    """Per-element constraint violation ``max(|h|, max(g, 0))``, shape ``(b,)``."""
    v = like.new_zeros(b)
    if h is not None and h.shape[1]:
        v = torch.maximum(v, h.abs().amax(dim=1))
    if g is not None and g.shape[1]:
        v = torch.maximum(v, g.clamp_min(0).amax(dim=1))
    return v


def kkt_residual(problem: Problem, y: Tensor, nu: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """KKT residual of ``(y, nu)`` in the convention ``grad f = J^T nu`` (inequality multipliers ``<= 0``).

    Returns ``(residual, stationarity, feasibility, scale)``, each ``(b,)``: stationarity is
    ``max|grad f - J^T nu|``; feasibility is ``max(|h|, g_+, |nu_g g|, (nu_g)_+)`` (primal feasibility,
    complementarity and dual sign); the residual is their sum (NaN gives ``inf``); ``scale = max(1, max|grad f|)``
    is what solvers compare the residual with (``residual <= tol * scale``).
    """
    b = y.shape[0]
    with torch.no_grad():
        fval, gf = value_and_batch_grad(problem.objective, y)
    c = constraints_fn(problem)
    h, g = constraint_values(problem, y)
    if c is None or nu is None:
        stat = gf.abs().amax(dim=1) if gf.shape[1] else gf.new_zeros(b)
        feas = violation(h, g, b, y)
    else:
        _, jac = batch_jacobian(c, y)
        stat = (gf - torch.einsum("bpm,bp->bm", jac, nu)).abs().amax(dim=1)
        feas = violation(h, g, b, y)
        p = 0 if h is None else h.shape[1]
        if g is not None and g.shape[1]:
            nug = nu[:, p:]
            feas = torch.maximum(feas, (nug * g).abs().amax(dim=1))
            feas = torch.maximum(feas, nug.clamp_min(0).amax(dim=1))
    res = stat + feas
    res = torch.where(torch.isnan(res) | ~torch.isfinite(fval), torch.full_like(res, float("inf")), res)
    scale = (gf.abs().amax(dim=1) if gf.shape[1] else gf.new_zeros(b)).clamp_min(1.0)
    scale = torch.where(torch.isfinite(scale), scale, torch.ones_like(scale))
    return res, stat, feas, scale


def solve_kkt(H: Tensor, A: Optional[Tensor], r1: Tensor, r2: Optional[Tensor],
              free: Optional[Tensor] = None, max_shift_tries: int = 12,
              augment: float = 1.0) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """Solve ``[H A^T; A -D][d; w] = [r1; r2]`` per element, regularising when needed.

    ``H`` (b, m, m), ``A`` (b, k, m) or None, ``r1`` (b, m), ``r2`` (b, k). ``free`` (b, k) bool marks rows that
    are switched off (``D = 1`` there, so ``w = 0`` when ``A``'s row and ``r2`` are zero). ``H`` is shifted by
    ``delta I`` (Levenberg style, growing tenfold) until ``H + delta I + augment A^T A`` is positive definite (with
    ``augment = 0``: until ``H + delta I`` is, which makes every step a descent step of an exact penalty) so that the
    step is a descent step on the null space of the active constraints. Where the system is singular
    (dependent constraints) the minimum-norm least-squares solution is used.
    Returns ``(d, w, ok)`` with ``ok`` false where no shift worked.
    """
    b, m, _ = H.shape
    eye_m = torch.eye(m, dtype=H.dtype, device=H.device)
    scale = H.abs().amax(dim=(1, 2)).clamp_min(1.0)
    if A is not None and A.shape[1]:
        AtA = augment * (A.transpose(1, 2) @ A)
        scale = torch.maximum(scale, AtA.abs().amax(dim=(1, 2)))
    else:
        AtA = torch.zeros_like(H)
    delta = H.new_zeros(b)
    eps = torch.finfo(H.dtype).eps
    ok = torch.zeros(b, dtype=torch.bool, device=H.device)
    margin = 100 * eps * scale
    for _ in range(max_shift_tries):
        M = H + AtA + (delta - margin)[:, None, None] * eye_m
        _, info = torch.linalg.cholesky_ex(M)
        good = (info == 0) & torch.isfinite(M).flatten(1).all(dim=1)
        ok = ok | good
        if bool(ok.all()):
            break
        if not bool((delta > 0).any()):
            # first failure: jump straight to (a little beyond) the most negative eigenvalue
            lam_min = torch.linalg.eigvalsh(torch.where(torch.isfinite(M), M, torch.zeros_like(M)))[:, 0]
            first = (2.0 * (-lam_min).clamp_min(0) + 1.37e-6 * scale + 2 * margin)
            delta = torch.where(ok, delta, first)
        else:
            delta = torch.where(ok, delta, 10 * delta)
    Hs = H + delta[:, None, None] * eye_m
    if A is None or A.shape[1] == 0:
        L, info = torch.linalg.cholesky_ex(Hs)
        d = torch.cholesky_solve(r1.unsqueeze(-1), L).squeeze(-1)
        d = torch.where((info == 0)[:, None], d, r1)
        return d, None, ok & (info == 0)
    k = A.shape[1]
    D = torch.zeros(b, k, dtype=H.dtype, device=H.device)
    if free is not None:
        D = free.to(H.dtype)
    K = torch.cat([torch.cat([Hs, A.transpose(1, 2)], dim=2),
                   torch.cat([A, -torch.diag_embed(D)], dim=2)], dim=1)
    rhs = torch.cat([r1, r2], dim=1).unsqueeze(-1)
    sol, info = torch.linalg.solve_ex(K, rhs)
    sol = sol.squeeze(-1)
    bad = (info != 0) | ~torch.isfinite(sol).all(dim=1)
    if bad.any():
        # dependent constraints: minimum-norm least-squares solution (rank-revealing)
        Kf = torch.where(torch.isfinite(K), K, torch.zeros_like(K))
        if K.device.type == "cpu":
            sol_b = torch.linalg.lstsq(Kf, rhs, driver="gelsd").solution.squeeze(-1)
        else:
            sol_b = (torch.linalg.pinv(Kf, hermitian=True) @ rhs).squeeze(-1)
        sol = torch.where(bad[:, None], sol_b, sol)
    d, w = sol[:, :m], sol[:, m:]
    ok = ok & torch.isfinite(sol).all(dim=1)
    return d, w, ok


def recover_multipliers(problem: Problem, y: Tensor, active_tol: Optional[float] = None) -> Optional[Tensor]:
    """Least-squares multipliers ``nu`` (b, p + q) with ``grad f ~= J^T nu`` at ``y``, inequality multipliers
    restricted to the (nearly) active constraints ``g >= -active_tol (1 + |g|)`` (default
    ``max(1e-7, 100 eps)``) and clipped to ``<= 0``.

    Returns None for an unconstrained problem. Cost: one gradient, one Jacobian and a (b, m, p + q) lstsq.
    """
    c = constraints_fn(problem)
    if c is None:
        return None
    b, m = y.shape
    with torch.no_grad():
        _, gf = value_and_batch_grad(problem.objective, y)
        vals, jac = batch_jacobian(c, y)
    h, g = constraint_values(problem, y)
    p = 0 if h is None else h.shape[1]
    k = vals.shape[1]
    if active_tol is None:
        active_tol = max(1e-7, 100 * torch.finfo(y.dtype).eps)
    mask = torch.ones(b, k, dtype=torch.bool, device=y.device)
    if g is not None:
        mask[:, p:] = g >= -active_tol * (1 + g.abs())
    Jm = jac * mask[:, :, None].to(jac.dtype)
    # ridge-regularised normal equations (min-norm on dependent rows), batched and device agnostic
    G = Jm @ Jm.transpose(1, 2)
    lam = 16 * torch.finfo(y.dtype).eps * G.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(1e-30)
    G = G + (lam[:, None] + (~mask).to(G.dtype))[:, :, None] * torch.eye(k, dtype=G.dtype, device=G.device)
    nu = torch.linalg.solve(G, (Jm @ gf.unsqueeze(-1))).squeeze(-1)
    nu = nu * mask.to(nu.dtype)
    if k > p:
        nu = torch.cat([nu[:, :p], nu[:, p:].clamp_max(0)], dim=1)
    return nu


def armijo(fn, y: Tensor, f: Tensor, d: Tensor, slope: Tensor, active: Tensor, c1: float = 1e-4,
           shrink: float = 0.5, max_steps: int = 40) -> tuple[Tensor, Tensor, Tensor]:
    """Batched backtracking line search: per element the largest ``alpha = shrink^k`` with
    ``fn(y + alpha d) <= f + c1 alpha slope`` (plus a rounding allowance of a few ulps of ``|f|``).

    Each trial evaluates ``fn`` once on the whole batch. Returns ``(alpha, f_new, ok)``, all ``(b,)``;
    ``alpha = 0`` and ``f_new = f`` where the search failed or the element is inactive.
    """
    eps = torch.finfo(y.dtype).eps
    slack = 8 * eps * (1 + f.abs())
    alpha = torch.where(active, torch.ones_like(f), torch.zeros_like(f))
    ok = torch.zeros_like(active)
    f_new = f.clone()
    pending = active.clone()
    for _ in range(max_steps):
        if not bool(pending.any()):
            break
        ft = fn(y + alpha[:, None] * d)
        acc = pending & torch.isfinite(ft) & (ft <= f + c1 * alpha * slope + slack)
        f_new = torch.where(acc, ft, f_new)
        ok = ok | acc
        pending = pending & ~acc
        alpha = torch.where(pending, alpha * shrink, alpha)
    alpha = torch.where(ok, alpha, torch.zeros_like(alpha))
    return alpha, f_new, ok


def locally_infeasible(problem: Problem, y: Tensor, tol: float) -> Tensor:
    """``(b,)`` mask of elements where ``y`` minimises the constraint violation ``1/2 |h|^2 + 1/2 |g_+|^2``
    (its gradient ``J^T [h; g_+]`` vanishes relative to ``|[h; g_+]|``) while the violation exceeds
    ``sqrt(tol)``: a certificate of infeasibility, global when ``h`` is affine and ``g`` convex."""
    c = constraints_fn(problem)
    b = y.shape[0]
    if c is None:
        return torch.zeros(b, dtype=torch.bool, device=y.device)
    h, g = constraint_values(problem, y)
    p = 0 if h is None else h.shape[1]
    with torch.no_grad():
        vals, jac = batch_jacobian(c, y)
    r = torch.cat([vals[:, :p], vals[:, p:].clamp_min(0)], dim=1)
    rn = r.norm(dim=1)
    grad = torch.einsum("bkm,bk->bm", jac, r).norm(dim=1)
    jn = jac.flatten(1).norm(dim=1).clamp_min(1.0)
    return (rn > max(tol, 1e-12) ** 0.5) & (grad <= 1e-6 * rn * jn) & torch.isfinite(rn)


def raise_if_infeasible(problem: Problem, y: Tensor, converged: Tensor, tol: float, policy: str) -> None:
    """With ``policy="raise"``, raise :class:`~torchddn.diagnostics.InfeasibleError` naming the unconverged
    elements that :func:`locally_infeasible` certifies; ``"report"`` leaves them to ``converged``/``residual``."""
    if policy == "report":
        return
    if policy != "raise":
        raise DDNError(f"on_infeasible must be 'report' or 'raise', got {policy!r}")
    from torchddn.diagnostics import InfeasibleError
    bad = ~converged & locally_infeasible(problem, y, tol)
    if bool(bad.any()):
        raise InfeasibleError(f"the constraints cannot be satisfied at batch elements {element_list(bad)}: the "
                              f"solver stopped at a minimiser of the constraint violation with a positive "
                              f"violation")
