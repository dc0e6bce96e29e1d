"""Shared pieces of the built-in solvers: tolerances, input checks, the scale-invariant stopping rule, KKT
residuals, multiplier recovery and regularised batched linear solves. Everything is batched over the leading
dimension and dtype/device agnostic.

The stopping rule (one rule for every built-in minimiser)
---------------------------------------------------------
Per batch element, with ``L = max(|y|_inf, |y0|_inf)`` (a length, from the start and the iterate; Newton's
methods also include the first accepted step ``|y1 - y0|_inf``, a length that does not vanish when ``y`` is near 0) and the typical
objective scale ``F = max(|f|, |f0|, |g0|_inf L)`` (``f0 = f(y0)``, ``g0 = grad f(y0)``), the first-order measure is

    measure = |g|_inf L / F                    (relative gradient: "the change of f over the length L, relative
                                                 to f", Dennis & Schnabel 7.2)

and an element is optimal when ``measure <= tol``. Because ``F >= |g0| L`` the measure never exceeds
``|g|_inf / |g0|_inf``: the rule also contains the test relative to the first gradient. Where ``L = 0`` (a zero
start that has not moved) there is no length yet and the measure is ``|g|_inf / |g0|_inf``. ``0/0`` counts as 0
(a zero gradient is optimal) and ``x/0`` with ``x > 0`` as ``inf``; NaN and Inf give ``inf``.

The measure is invariant under ``f -> a f`` (``a > 0``) and under rescaling the data and ``y`` together
(``y -> c y``, ``f(y) -> a f(y / c)``); it is not invariant under adding a large constant to ``f`` (which makes
any relative test lax) or under translating ``y``. Constrained solvers use :func:`kkt_measure`, the same
normalisation applied to the Lagrangian gradient, the violation (relative to ``max(|c(y0)|, |J| L)``),
complementarity and the multipliers' signs. :func:`first_order_check` exposes the unconstrained rule for reuse.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError, element_list
from torchddn.solvers.base import Problem
from torchddn.autodiff import batch_jacobian, value_and_batch_grad


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


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` with ``0/0 = 0``, ``x/0 = inf`` (``x > 0``) and non-finite results as ``inf``."""
    out = num / torch.where(den > 0, den, torch.ones_like(den))
    out = torch.where(den > 0, out, torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, float("inf"))))
    return torch.where(torch.isfinite(out), out, torch.full_like(out, float("inf")))


def _amax(t: Tensor) -> Tensor:
    """``max |t|`` over dim 1 (0 for an empty dim), NaN propagated."""
    if t.shape[1] == 0:
        return t.new_zeros(t.shape[0])
    a = t.abs().amax(dim=1)
    return torch.where(torch.isnan(t).any(dim=1), torch.full_like(a, float("nan")), a)


@dataclass
class StartScales:
    """Typical scales taken at the starting point, each ``(b,)``: ``f0 = |f(y0)|``, ``g0 = |grad f(y0)|_inf``,
    ``y0 = |y0|_inf`` and (constrained problems) ``c0 = |c(y0)|_inf`` over the stacked constraints."""

    f0: Tensor
    g0: Tensor
    y0: Tensor
    c0: Optional[Tensor] = None


def start_scales(problem: Problem, y0: Tensor, f0: Optional[Tensor] = None, g0: Optional[Tensor] = None,
                 name: str = "y0") -> StartScales:
    """Evaluate ``f`` and ``grad f`` (and the constraints) at ``y0`` and return the :class:`StartScales`.

    Raises :class:`~torchddn.diagnostics.DDNError` naming the elements where the objective, its gradient or a
    constraint is NaN/Inf at the start (no solver can make progress from there)."""
    if f0 is None or g0 is None:
        with torch.no_grad():
            f0, g0 = value_and_batch_grad(problem.objective, y0)
    bad = ~torch.isfinite(f0)
    if bool(bad.any()):
        raise DDNError(f"the objective is NaN or Inf at the starting point {name} at batch elements "
                       f"{element_list(bad)}")
    bad = ~torch.isfinite(g0).all(dim=1)
    if bool(bad.any()):
        raise DDNError(f"the objective's gradient is NaN or Inf at the starting point {name} at batch elements "
                       f"{element_list(bad)}")
    c0 = None
    c = constraints_fn(problem)
    if c is not None:
        with torch.no_grad():
            cv = c(y0)
        bad = torch.isnan(cv).any(dim=1)
        if bool(bad.any()):
            raise DDNError(f"the constraints are NaN at the starting point {name} at batch elements "
                           f"{element_list(bad)}")
        c0 = torch.nan_to_num(cv, posinf=0.0, neginf=0.0).abs().amax(dim=1) if cv.shape[1] else y0.new_zeros(
            y0.shape[0])
    return StartScales(f0=f0.detach().abs(), g0=_amax(g0.detach()), y0=_amax(y0.detach()), c0=c0)


def objective_scale(f: Tensor, y: Tensor, start: StartScales) -> tuple[Tensor, Tensor]:
    """``(L, F)``: the length ``max(|y|_inf, |y0|_inf)`` and the objective scale ``max(|f|, |f0|, |g0| L)``."""
    L = torch.maximum(_amax(y), start.y0)
    L = torch.where(torch.isfinite(L), L, torch.zeros_like(L))
    fa = torch.where(torch.isfinite(f), f.abs(), torch.zeros_like(f))
    F = torch.maximum(torch.maximum(fa, start.f0), start.g0 * L)
    return L, F


def gradient_measure(g: Tensor, L: Tensor, F: Tensor, g0: Tensor) -> Tensor:
    """The scale-free size of a (Lagrangian or projected) gradient ``g`` (b, m): ``|g|_inf L / F``, or
    ``|g|_inf / |g0|_inf`` where ``L = 0`` (see the module docstring)."""
    gn = _amax(g)
    rel = _ratio(gn * L, F)
    return torch.where(L > 0, rel, _ratio(gn, g0))


def first_order_check(f: Tensor, g: Tensor, y: Tensor, tol: float, f0: Optional[Tensor] = None,
                      g0: Optional[Tensor] = None, y0: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    r"""Scale-invariant first-order optimality test for an unconstrained minimiser, batched.

    Args:
        f: ``(b,)`` objective at ``y``.
        g: ``(b, m)`` gradient at ``y`` (for a constrained problem pass the Lagrangian gradient
            ``grad f - J^T nu``).
        y: ``(b, m)`` the point.
        tol: relative tolerance (used as given).
        f0, g0, y0: the objective ``(b,)``, gradient ``(b, m)`` and point ``(b, m)`` at the solver's start, if
            known; each missing one is replaced by its value at ``y``.

    Returns:
        ``(ok, measure)``, both ``(b,)``: ``measure = |g|_inf L / max(|f|, |f0|, |g0|_inf L)`` with
        ``L = max(|y|_inf, |y0|_inf)`` (``|g|_inf / |g0|_inf`` where ``L = 0``; ``inf`` where anything is NaN/Inf),
        and ``ok = measure <= tol``. Invariant under ``f -> a f`` and under rescaling ``y`` with the data. Without
        ``f0``/``g0`` an objective whose minimum value is 0 (zero-residual least squares) is judged against
        ``|g| |y|`` only, which is stricter; pass the start's values to avoid that.

    Cost: ``O(b m)``.
    """
    f0_ = f if f0 is None else f0
    g0_ = g if g0 is None else g0
    y0_ = y if y0 is None else y0
    start = StartScales(f0=torch.where(torch.isfinite(f0_), f0_.abs(), torch.zeros_like(f0_)),
                        g0=torch.nan_to_num(_amax(g0_), nan=0.0, posinf=0.0),
                        y0=torch.nan_to_num(_amax(y0_), nan=0.0, posinf=0.0))
    m = first_order_measure(f, g, y, start)
    return m <= tol, m


def first_order_measure(f: Tensor, g: Tensor, y: Tensor, start: StartScales) -> Tensor:
    """The measure of :func:`first_order_check` against precomputed :class:`StartScales` (what the solvers use
    every iteration). ``(b,)``, ``inf`` where ``f`` or ``g`` is NaN/Inf."""
    L, F = objective_scale(f, y, start)
    m = gradient_measure(g, L, F, start.g0)
    return torch.where(torch.isfinite(f) & torch.isfinite(g).all(dim=1), m, torch.full_like(m, float("inf")))


def precision_floor(dtype: torch.dtype) -> float:
    """``sqrt(eps)``: the measure below which an element whose line search cannot decrease ``f`` any more (or
    whose step is at rounding level) is at the attainable precision and counts as converged."""
    return torch.finfo(dtype).eps ** 0.5


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


def scaled_kkt(f: Tensor, lag_grad: Tensor, y: Tensor, jac: Optional[Tensor], viol: Tensor,
               comp: Optional[Tensor], sign: Optional[Tensor], start: StartScales) -> Tensor:
    r"""The scale-free KKT measure ``(b,)`` from its absolute parts.

    With ``L``, ``F`` as in :func:`objective_scale` and the constraint scale ``C = max(|c(y0)|_inf, |J|_inf L)``
    (the change of the constraints over the length ``L``), it is the largest of
    ``gradient_measure(grad f - J^T nu)`` (stationarity), ``viol / C`` (feasibility), ``comp / F``
    (complementarity ``|nu_g g|``, in units of ``f``) and ``sign C / F`` (the wrong-signed part of the inequality
    multipliers, in units of ``f / c``). Each part is invariant under ``f -> a f``, ``c -> a' c`` and rescaling
    ``y`` with the data.
    """
    L, F = objective_scale(f, y, start)
    m = gradient_measure(lag_grad, L, F, start.g0)
    c0 = start.c0 if start.c0 is not None else torch.zeros_like(L)
    Jn = _amax(jac.flatten(1)) if jac is not None and jac.numel() else torch.zeros_like(L)
    C = torch.maximum(c0, torch.nan_to_num(Jn, nan=0.0, posinf=0.0) * L)
    m = torch.maximum(m, _ratio(viol, C))
    if comp is not None:
        m = torch.maximum(m, _ratio(comp, F))
    if sign is not None:
        m = torch.maximum(m, _ratio(sign * C, F))
    m = torch.where(torch.isnan(m) | ~torch.isfinite(f), torch.full_like(m, float("inf")), m)
    return m


def kkt_measure(problem: Problem, y: Tensor, nu: Optional[Tensor], start: StartScales) -> tuple[Tensor, Tensor]:
    """``(residual, measure)``: the absolute KKT residual of :func:`kkt_residual` and the scale-free
    :func:`scaled_kkt` measure of ``(y, nu)`` against the start's scales; ``measure <= tol`` is the
    convergence test of the constrained solvers. Cost: one gradient and one constraint Jacobian."""
    b = y.shape[0]
    with torch.no_grad():
        fval, gf = value_and_batch_grad(problem.objective, y)
    c = constraints_fn(problem)
    h, g = constraint_values(problem, y)
    feas = violation(h, g, b, y)
    comp = sign = None
    jac = None
    if c is None or nu is None:
        lag = gf
        if c is not None:
            _, jac = batch_jacobian(c, y)
    else:
        _, jac = batch_jacobian(c, y)
        lag = gf - torch.einsum("bpm,bp->bm", jac, nu)
        p = 0 if h is None else h.shape[1]
        if g is not None and g.shape[1]:
            nug = nu[:, p:]
            comp = (nug * g).abs().amax(dim=1)
            sign = nug.clamp_min(0).amax(dim=1)
    stat = _amax(lag)
    res = stat + torch.maximum(torch.maximum(feas, comp if comp is not None else torch.zeros_like(feas)),
                               sign if sign is not None else torch.zeros_like(feas))
    res = torch.where(torch.isnan(res) | ~torch.isfinite(fval), torch.full_like(res, float("inf")), res)
    return res, scaled_kkt(fval, lag, y, jac, feas, comp, sign, start)


@dataclass
class Normalised:
    """A problem in normalised units: ``u = y / ys``, ``f~(u) = f(ys u) / fs``, ``c~(u) = c(ys u) / cs`` with
    per-element positive scales ``ys``, ``fs``, ``cs`` (b,), so that the constrained solvers' internal constants
    (barrier parameter, penalties, slack floors, merit weights) act on problems of unit scale whatever the data's.
    Multipliers map back as ``nu = nu~ fs / cs`` (from ``grad f = J^T nu``)."""

    problem: Problem
    ys: Tensor
    fs: Tensor
    cs: Tensor

    def to_u(self, y: Tensor) -> Tensor:
        return y / self.ys[:, None]

    def to_y(self, u: Tensor) -> Tensor:
        return u * self.ys[:, None]

    def nu_to_y(self, nu: Optional[Tensor]) -> Optional[Tensor]:
        return None if nu is None else nu * (self.fs / self.cs)[:, None]


def normalise(problem: Problem, y0: Tensor, start: StartScales) -> Normalised:
    """Normalised units for ``problem`` from its start: ``ys = |y0|_inf`` (``|f0| / |g0|_inf`` for a zero start,
    1 if neither is positive), ``fs = max(|f0|, |g0|_inf ys)``, ``cs = max(|c(y0)|_inf, |J(y0)|_inf ys)``
    (1 where a scale is not positive and finite). Cost: one constraint Jacobian."""
    one = torch.ones_like(start.y0)

    def pos(t: Tensor) -> Tensor:
        return torch.where(torch.isfinite(t) & (t > 0), t, one)

    ys = torch.where(start.y0 > 0, start.y0, _ratio(start.f0, start.g0))
    ys = pos(ys)
    fs = pos(torch.maximum(start.f0, start.g0 * ys))
    cs = one
    c = constraints_fn(problem)
    if c is not None:
        with torch.no_grad():
            _, jac = batch_jacobian(c, y0)
        Jn = torch.nan_to_num(_amax(jac.flatten(1)), nan=0.0, posinf=0.0) if jac.numel() else torch.zeros_like(ys)
        cs = pos(torch.maximum(start.c0 if start.c0 is not None else torch.zeros_like(ys), Jn * ys))
    ys_, fs_, cs_ = ys.detach(), fs.detach(), cs.detach()

    def obj(u: Tensor) -> Tensor:
        return problem.objective(u * ys_[:, None]) / fs_

    def wrap(fn):
        if fn is None:
            return None

        def g(u: Tensor) -> Tensor:
            b = u.shape[0]
            return fn(u * ys_[:, None]).reshape(b, -1) / cs_[:, None]
        return g

    return Normalised(Problem(obj, eq=wrap(problem.eq), ineq=wrap(problem.ineq)), ys_, fs_, cs_)


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
        rhs = torch.where(torch.isfinite(rhs), rhs, torch.zeros_like(rhs))
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


def violation_objective(problem: Problem):
    """``y -> 1/2 |h(y)|^2 + 1/2 |g(y)_+|^2`` (b,), the constraint violation as a smooth objective."""
    def v(y: Tensor) -> Tensor:
        h, g = constraint_values(problem, y)
        val = y.new_zeros(y.shape[0])
        if h is not None:
            val = val + 0.5 * (h * h).sum(dim=1)
        if g is not None:
            val = val + 0.5 * (g.clamp_min(0) ** 2).sum(dim=1)
        return val
    return v


def raise_if_infeasible(problem: Problem, y: Tensor, converged: Tensor, tol: float, policy: str,
                        y0: Optional[Tensor] = None) -> None:
    """With ``policy="raise"``, raise :class:`~torchddn.diagnostics.InfeasibleError` naming the unconverged
    elements that are certified infeasible; ``"report"`` leaves them to ``converged``/``residual``.

    The certificate: from the solver's final ``y`` (or ``y0`` where ``y`` is not finite) a Newton solve of
    ``min 1/2 |h|^2 + 1/2 |g_+|^2`` (:func:`violation_objective`) reaches a stationary point of the violation
    at which the violation stays positive (:func:`locally_infeasible`); global when ``h`` is affine and ``g``
    convex. Cost (only for unconverged elements with ``"raise"``): one Newton solve on the violation."""
    if policy == "report":
        return
    if policy != "raise":
        raise DDNError(f"on_infeasible must be 'report' or 'raise', got {policy!r}")
    from torchddn.diagnostics import InfeasibleError
    from torchddn.solvers.newton import newton
    if bool(converged.all()):
        return
    finite = torch.isfinite(y).all(dim=1)
    ys = y if y0 is None else torch.where(finite[:, None], y, y0)
    ys = torch.where(torch.isfinite(ys), ys, torch.zeros_like(ys))
    with torch.no_grad():
        vfun = violation_objective(problem)
        try:
            yv = newton(Problem(vfun), ys, tol=tol, max_iter=100).y
        except DDNError:
            yv = ys
    bad = ~converged & (locally_infeasible(problem, yv, tol) | locally_infeasible(problem, ys, tol))
    if bool(bad.any()):
        raise InfeasibleError(f"the constraints cannot be satisfied at batch elements {element_list(bad)}: the "
                              f"constraint violation has a stationary point with a positive violation (a "
                              f"minimiser of 1/2 |h|^2 + 1/2 |g_+|^2 that is not feasible)")


def finish_normalised(nz, user_problem: Problem, user_start, norm_problem: Problem, u: Tensor, nu_u: Tensor,
                      u0: Tensor, tol_e: float, on_infeasible: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The common end of the constrained solvers, which run in normalised units: a diverged element hands back its
    start (never NaN); ``(u, nu_u)`` are mapped back to the user's units and judged there by :func:`kkt_measure`;
    infeasibility is raised per ``on_infeasible``. Returns ``(y, nu, residual, converged)``."""
    fin = torch.isfinite(u).all(dim=1) & torch.isfinite(nu_u).all(dim=1)
    u = torch.where(fin[:, None], u, u0)
    nu_u = torch.where(fin[:, None], nu_u, torch.zeros_like(nu_u))
    y, nu = nz.to_y(u), nz.nu_to_y(nu_u)
    res, meas = kkt_measure(user_problem, y, nu, user_start)
    conv = meas <= tol_e
    raise_if_infeasible(norm_problem, u, conv, tol_e, on_infeasible, y0=u0)
    return y, nu, res, conv


def enter_normalised(problem: Problem, y: Tensor):
    """The common start of the constrained solvers that run in normalised units: returns ``(nz, user_start,
    norm_problem, u, start)`` -- the :func:`normalise` map, the start scales in the user's units, the normalised
    problem, the normalised start ``u`` and its start scales (so the solvers' constants are scale free)."""
    user_start = start_scales(problem, y)
    nz = normalise(problem, y, user_start)
    u = nz.to_u(y)
    return nz, user_start, nz.problem, u, start_scales(nz.problem, u)
