"""Differentiable convex quadratic programs (the OptNet layer).

.. math::

    z^\\star(Q, p, G, h, A, b) = \\arg\\min_z \\tfrac12 z^T Q z + p^T z
    \\quad\\text{s.t.}\\quad G z \\le h,\\; A z = b .

The forward is a batched primal-dual interior point method (Mehrotra predictor-corrector) in pure torch, with
per-element convergence; the backward differentiates the KKT conditions (Amos & Kolter, "OptNet", ICML 2017) and
reuses the factorisation of the reduced KKT matrix at the returned point.
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from torchddn.diagnostics import (
    ConvergenceWarning,
    DDNError,
    Diagnostics,
    InfeasibleError,
    NonRegularWarning,
    element_list,
    report,
)

__all__ = ["qp", "QPLayer"]


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _check_finite(name: str, x: Optional[Tensor], batched: bool) -> None:
    if x is None:
        return
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        if batched:
            mask = bad.reshape(x.shape[0], -1).any(-1)
            raise DDNError(f"qp: {name} contains NaN or Inf at batch elements {element_list(mask)}")
        raise DDNError(f"qp: {name} contains NaN or Inf")


def _prepare(Q: Tensor, p: Tensor, G: Optional[Tensor], h: Optional[Tensor], A: Optional[Tensor],
             b: Optional[Tensor], check: bool):
    """Validate shapes, broadcast the batch dimension and return batched tensors plus metadata."""
    if not isinstance(Q, Tensor) or not isinstance(p, Tensor):
        raise DDNError("qp: Q and p must be tensors")
    if (G is None) != (h is None):
        raise DDNError("qp: G and h must be given together")
    if (A is None) != (b is None):
        raise DDNError("qp: A and b must be given together")
    if Q.dim() not in (2, 3) or Q.shape[-1] != Q.shape[-2]:
        raise DDNError(f"qp: Q must have shape (n, n) or (B, n, n), got {tuple(Q.shape)}")
    n = Q.shape[-1]
    if p.dim() not in (1, 2) or p.shape[-1] != n:
        raise DDNError(f"qp: p must have shape ({n},) or (B, {n}) to match Q, got {tuple(p.shape)}")
    mats = {"Q": (Q, 2), "p": (p, 1)}
    if G is not None:
        if G.dim() not in (2, 3) or G.shape[-1] != n:
            raise DDNError(f"qp: G must have shape (m, {n}) or (B, m, {n}), got {tuple(G.shape)}")
        m = G.shape[-2]
        if h.dim() not in (1, 2) or h.shape[-1] != m:
            raise DDNError(f"qp: h must have shape ({m},) or (B, {m}) to match G, got {tuple(h.shape)}")
        mats["G"], mats["h"] = (G, 2), (h, 1)
    if A is not None:
        if A.dim() not in (2, 3) or A.shape[-1] != n:
            raise DDNError(f"qp: A must have shape (k, {n}) or (B, k, {n}), got {tuple(A.shape)}")
        k = A.shape[-2]
        if b.dim() not in (1, 2) or b.shape[-1] != k:
            raise DDNError(f"qp: b must have shape ({k},) or (B, {k}) to match A, got {tuple(b.shape)}")
        mats["A"], mats["b"] = (A, 2), (b, 1)
    sizes = {name: t.shape[0] for name, (t, core) in mats.items() if t.dim() > core}
    distinct = set(sizes.values()) - {1}
    if len(distinct) > 1:
        raise DDNError(f"qp: batch sizes do not broadcast: {sizes}")
    batched = bool(sizes)
    B = distinct.pop() if distinct else 1
    dtype, device = Q.dtype, Q.device
    if not dtype.is_floating_point:
        raise DDNError(f"qp: expected floating point tensors, got {dtype}")
    for name, (t, _) in mats.items():
        if t.dtype != dtype or t.device != device:
            raise DDNError(f"qp: {name} has dtype/device {t.dtype}/{t.device}, expected {dtype}/{device} like Q")
        _check_finite(name, t, t.dim() > mats[name][1])
    if check:
        _check_psd(Q)

    def expand(t: Optional[Tensor], core: int) -> Optional[Tensor]:
        if t is None:
            return None
        if t.dim() == core:
            t = t.unsqueeze(0)
        return t.expand(B, *t.shape[1:])

    Qb, pb = expand(Q, 2), expand(p, 1)
    if G is None:
        Gb = Q.new_zeros(B, 0, n)
        hb = Q.new_zeros(B, 0)
    else:
        Gb, hb = expand(G, 2), expand(h, 1)
    if A is None:
        Ab = Q.new_zeros(B, 0, n)
        bb = Q.new_zeros(B, 0)
    else:
        Ab, bb = expand(A, 2), expand(b, 1)
    return Qb, pb, Gb, hb, Ab, bb, batched


def _check_psd(Q: Tensor) -> None:
    Qb = Q if Q.dim() == 3 else Q.unsqueeze(0)
    scale = Qb.abs().amax(dim=(-2, -1)).clamp_min(1.0)
    asym = (Qb - Qb.transpose(-1, -2)).abs().amax(dim=(-2, -1))
    bad = asym > 1e-5 * scale
    if bool(bad.any()):
        where = f" at batch elements {element_list(bad)}" if Q.dim() == 3 else ""
        raise DDNError(f"qp: Q must be symmetric{where} (max |Q - Q^T| = {float(asym.max()):.3g})")
    eps = torch.finfo(Q.dtype).eps
    n = Qb.shape[-1]
    eye = torch.eye(n, dtype=Q.dtype, device=Q.device)
    shift = (eps ** 0.5) * n * scale
    _, info = torch.linalg.cholesky_ex(0.5 * (Qb + Qb.transpose(-1, -2)) + shift[:, None, None] * eye)
    bad = info != 0
    if bool(bad.any()):
        where = f" at batch elements {element_list(bad)}" if Q.dim() == 3 else ""
        raise DDNError(f"qp: Q must be positive semidefinite{where} (the QP is not convex)")


def _kkt_matrix(Q: Tensor, G: Tensor, A: Tensor, d: Tensor) -> Tensor:
    """Reduced KKT matrix ``[[Q + G^T diag(d) G, A^T], [A, 0]]`` of shape (B, n + k, n + k)."""
    H = torch.baddbmm(Q, G.transpose(-1, -2), d.unsqueeze(-1) * G)
    k = A.shape[-2]
    if k == 0:
        return H
    B = Q.shape[0]
    top = torch.cat([H, A.transpose(-1, -2)], dim=-1)
    bottom = torch.cat([A, A.new_zeros(B, k, k)], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def _augmented_kkt(Q: Tensor, G: Tensor, A: Tensor, d: Tensor) -> Tensor:
    """Row-equilibrated unreduced KKT matrix ``[[Q, -G^T, A^T], [c G, diag(c / d), 0], [A, 0, 0]]``,
    ``c = min(1, d)``, of shape (B, n + m + k, n + m + k).

    Eliminating the middle block gives the reduced matrix ``[[Q + G^T D G, A^T], [A, 0]]``; unlike that one, it
    stays well conditioned as ``d -> inf`` (active) or ``d -> 0`` (inactive), where it tends to the active-set
    KKT matrix (inactive rows become identity rows)."""
    B = Q.shape[0]
    m, k = G.shape[-2], A.shape[-2]
    c = d.clamp(max=1.0)
    diag = torch.diag_embed(torch.where(d > 1, 1.0 / d, torch.ones_like(d)))
    rows = [torch.cat([Q, -G.transpose(-1, -2), A.transpose(-1, -2)], -1),
            torch.cat([c.unsqueeze(-1) * G, diag, G.new_zeros(B, m, k)], -1),
            torch.cat([A, A.new_zeros(B, k, m + k)], -1)]
    return torch.cat(rows, -2)


def _factor(K: Tensor, symmetric_pd: bool):
    """Factorise a batch of KKT matrices: Cholesky when they are symmetric positive definite (no equality
    constraints), falling back to LU with partial pivoting. Returns (kind, factors, info)."""
    if symmetric_pd:
        L, info = torch.linalg.cholesky_ex(K)
        if not bool(info.any()):
            return ("chol", L), info
    lu, piv, info = torch.linalg.lu_factor_ex(K)
    return ("lu", lu, piv), info


def _kkt_solve(fac, rz: Tensor, re: Tensor) -> tuple[Tensor, Tensor]:
    n = rz.shape[-1]
    rhs = torch.cat([rz, re], dim=-1).unsqueeze(-1) if re.shape[-1] else rz.unsqueeze(-1)
    if fac[0] == "chol":
        sol = torch.cholesky_solve(rhs, fac[1]).squeeze(-1)
    else:
        sol = torch.linalg.lu_solve(fac[1], fac[2], rhs).squeeze(-1)
    return sol[..., :n], sol[..., n:]


def _mv(M: Tensor, x: Tensor) -> Tensor:
    """Batched matrix-vector product ``M x`` (B, r, c) x (B, c) -> (B, r)."""
    return (M * x.unsqueeze(-2)).sum(-1)


def _mtv(M: Tensor, x: Tensor) -> Tensor:
    """Batched ``M^T x`` (B, r, c) x (B, r) -> (B, c)."""
    return (M * x.unsqueeze(-1)).sum(-2)


def _max_step(x: Tensor, dx: Tensor) -> Tensor:
    """Largest alpha in (0, inf] with x + alpha dx >= 0, per element (x > 0)."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], float("inf"))
    ratio = torch.where(dx < 0, -x / dx.clamp(max=-torch.finfo(x.dtype).tiny), torch.full_like(x, float("inf")))
    return ratio.amin(dim=-1)


def _ipm(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, tol: float, max_iter: int):
    """Batched Mehrotra predictor-corrector. Returns z, s, lam, nu, converged, iterations, residual, status."""
    B, n = p.shape
    m, k = h.shape[-1], b.shape[-1]
    dtype = p.dtype

    def amax(x: Tensor) -> Tensor:
        return x.abs().reshape(B, -1).amax(-1) if x[0].numel() else x.new_zeros(B)

    scale = torch.stack([amax(t) for t in (Q, p, G, h, A, b)], -1).amax(-1).clamp_min(1.0)
    big = 1.0 / torch.finfo(dtype).eps ** 0.75
    mu_weight = 1e3 if dtype == torch.float64 else 1.0

    # Initial point (as in CVXOPT): minimise 1/2 z^T Q z + p^T z + 1/2 |G z - h|^2 s.t. A z = b.
    K = _kkt_matrix(Q, G, A, torch.ones_like(h))
    fac, info = _factor(K, k == 0)
    z, nu = _kkt_solve(fac, -p + _mtv(G, h), b)
    if m:
        s = h - _mv(G, z)
        lam = -s
        a_s = -s.amin(-1, keepdim=True)
        s = torch.where(a_s < 0, s, s + 1 + a_s)
        a_l = -lam.amin(-1, keepdim=True)
        lam = torch.where(a_l < 0, lam, lam + 1 + a_l)
    else:
        s = lam = h
    failed = (info != 0) | ~torch.isfinite(z).all(-1) | ~torch.isfinite(nu).all(-1)
    z = torch.where(failed[:, None], torch.zeros_like(z), z)
    nu = torch.where(failed[:, None], torch.zeros_like(nu), nu)
    diverged = torch.zeros_like(failed)
    converged = torch.zeros_like(failed)
    iterations = torch.zeros(B, dtype=torch.long, device=p.device)

    def residuals(z, s, lam, nu):
        rd = _mv(Q, z) + p + _mtv(G, lam) + _mtv(A, nu)
        re = _mv(A, z) - b
        ri = _mv(G, z) + s - h
        mu = (s * lam).sum(-1) / max(m, 1)
        return rd, re, ri, mu

    def direction(Q, G, A, fac, s, lam, rd, re, ri, rc, refine):
        """Newton direction for the right-hand sides (rd, re, ri, rc), with one step of iterative refinement
        against the unreduced equations once the reduced matrix becomes ill-conditioned (near the solution)."""
        dz, dnu = _kkt_solve(fac, -rd - _mtv(G, (rc + lam * ri) / s), -re)
        ds = -ri - _mv(G, dz)
        dlam = (rc - lam * ds) / s
        if not refine:
            return dz, ds, dlam, dnu
        e1 = _mv(Q, dz) + _mtv(G, dlam) + _mtv(A, dnu) + rd
        e2 = _mv(A, dz) + re
        cz, cnu = _kkt_solve(fac, -e1, -e2)
        cs = -_mv(G, cz)
        return dz + cz, ds + cs, dlam - lam * cs / s, dnu + cnu

    def newton_step(Q, G, A, s, lam, rd, re, ri, mu):
        """Mehrotra predictor-corrector step: one factorisation, two directions, fraction-to-boundary 0.99."""
        d = lam / s
        fac, info = _factor(_kkt_matrix(Q, G, A, d), k == 0)
        rc = -s * lam
        refine = bool((d.amax(-1) > 1e6).any()) if m else True
        dz, ds, dlam, dnu = direction(Q, G, A, fac, s, lam, rd, re, ri, rc, refine)  # predictor (affine scaling)
        if m:
            a_aff = torch.minimum(_max_step(s, ds), _max_step(lam, dlam)).clamp(max=1.0)
            mu_aff = ((s + a_aff[:, None] * ds) * (lam + a_aff[:, None] * dlam)).sum(-1) / m
            sigma = (mu_aff / mu.clamp_min(torch.finfo(dtype).tiny)).clamp(0, 1) ** 3
            rc = -s * lam - ds * dlam + (sigma * mu)[:, None]
            dz, ds, dlam, dnu = direction(Q, G, A, fac, s, lam, rd, re, ri, rc, refine)  # corrector
            alpha = (0.99 * torch.minimum(_max_step(s, ds), _max_step(lam, dlam))).clamp(max=1.0)
        else:
            alpha = torch.ones_like(mu)
        ok = (info == 0) & torch.isfinite(dz).all(-1) & torch.isfinite(dnu).all(-1) \
            & torch.isfinite(ds).all(-1) & torch.isfinite(dlam).all(-1) & torch.isfinite(alpha)
        return dz, ds, dlam, dnu, alpha, ok

    def infnorm(x):
        return x.abs().amax(-1) if x.shape[-1] else x.new_zeros(x.shape[0])

    res = p.new_zeros(B)
    best = torch.full_like(res, float("inf"))
    best_kkt, best_mu = best.clone(), best.clone()
    best_state = (z, s, lam, nu)
    since = torch.zeros_like(iterations)
    stalled = torch.zeros_like(failed)
    for it in range(max_iter + 1):
        rd, re, ri, mu = residuals(z, s, lam, nu)
        # Merit: the KKT residual, with the duality measure weighted so that it must fall 1000x lower (the
        # backward's error vanishes with mu, while the residuals stall at the precision of the linear solves).
        kkt = torch.stack([infnorm(rd), infnorm(re), infnorm(ri)], -1).amax(-1)
        res = torch.maximum(kkt, mu_weight * mu * scale)
        res = torch.where(torch.isfinite(res), res, torch.full_like(res, float("inf")))
        improved = (kkt < 0.5 * best_kkt) | (mu < 0.5 * best_mu)
        since = torch.where(improved, torch.zeros_like(since), since + 1)
        best_kkt = torch.minimum(best_kkt, kkt)
        best_mu = torch.minimum(best_mu, mu)
        better = res <= 2 * best
        best = torch.where(better, res, best)
        best_state = tuple(torch.where(better[:, None], new, old) for new, old in zip((z, s, lam, nu), best_state))
        converged = (best <= tol * scale) & ~failed & ~diverged
        # Stop an element whose residual no longer improves: the reduced KKT system has become too
        # ill-conditioned for further progress at this precision.
        stalled = stalled | ((since >= 4) & (best <= 10 * tol * scale))
        if m:
            diverged = diverged | (lam.amax(-1) > big * scale) | (z.abs().amax(-1) > big * scale)
        active = ~(converged | failed | diverged | stalled)
        if it == max_iter or not bool(active.any()):
            break
        iterations = iterations + active.long()
        # Work only on the elements still iterating.
        ia = active.nonzero().squeeze(-1)
        if ia.numel() == B:
            sel = lambda t: t  # noqa: E731
        else:
            sel = lambda t: t.index_select(0, ia)  # noqa: E731
        dz, ds, dlam, dnu, alpha, ok = newton_step(sel(Q), sel(G), sel(A), sel(s), sel(lam), sel(rd), sel(re),
                                                   sel(ri), sel(mu))
        failed = failed.index_put((ia,), sel(failed) | ~ok)
        alpha = torch.where(ok, alpha, torch.zeros_like(alpha))[:, None]
        z = z.index_add(0, ia, alpha * torch.nan_to_num(dz))
        nu = nu.index_add(0, ia, alpha * torch.nan_to_num(dnu))
        s = s.index_add(0, ia, alpha * torch.nan_to_num(ds))
        lam = lam.index_add(0, ia, alpha * torch.nan_to_num(dlam))
    z, s, lam, nu = best_state
    rd, re, ri, mu = residuals(z, s, lam, nu)
    primal = torch.stack([infnorm(re), infnorm(ri)], -1).amax(-1)
    converged = converged | (stalled & ~failed & ~diverged)
    return z, s, lam, nu, converged, iterations, best, primal, scale, failed & ~diverged


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, p, G, h, A, b, opts):
        tol, max_iter, on_failure, diag = opts
        with torch.no_grad():
            Qs = 0.5 * (Q + Q.transpose(-1, -2))
            z, s, lam, nu, conv, iters, res, primal, scale, bad = _ipm(Qs, p, G, h, A, b, tol, max_iter)
            notconv = ~conv
            if bool(notconv.any()):
                infeasible = notconv & (primal > tol ** 0.5 * scale)
                if bool(infeasible.any()):
                    raise InfeasibleError(
                        f"qp: no point satisfies G z <= h, A z = b at batch elements {element_list(infeasible)} "
                        "(the interior point method's primal residual stagnated while the duals diverged)")
                if bool(bad.any()):
                    raise DDNError(f"qp: singular or non-finite KKT system at batch elements {element_list(bad)}: "
                                   "the problem is unbounded below, or Q and the constraints leave directions "
                                   "undetermined (e.g. A lacks full row rank)")
                unbounded = notconv & (z.abs().amax(-1) > 1e6 * scale) if z.shape[-1] else notconv & False
                if bool(unbounded.any()):
                    raise DDNError(f"qp: the objective is unbounded below at batch elements "
                                   f"{element_list(unbounded)} (Q is singular along a feasible direction)")
                report(on_failure, f"qp: the interior point method did not reach tol={tol:.1e} at batch elements "
                       f"{element_list(notconv)} (residual {float(res[notconv].max()):.3g})", ConvergenceWarning,
                       stacklevel=5)
            m = h.shape[-1]
            d = lam / s
            # Weakly active: slack and multiplier both vanish (to within tol^0.6 of the data's scale).
            tau = tol ** 0.6 * scale[:, None]
            weak = (s <= tau) & (lam <= tau) & conv[:, None]
            fac = None
            if any(ctx.needs_input_grad[:6]):
                lu, piv, _ = torch.linalg.lu_factor_ex(_augmented_kkt(Qs, G, A, d))
                fac = ("lu", lu, piv)
            if diag is not None:
                diag.residual = res
                diag.constraint_violation = primal
                diag.active = lam > s if m else torch.zeros_like(s, dtype=torch.bool)
                diag.converged = conv
                diag.iterations = iters
                diag.nonregular = weak.any(-1)
        ctx.weak = weak.any(-1)
        ctx.kind = None if fac is None else fac[0]
        ctx.save_for_backward(z, lam, nu, d, Qs, G, A, *([] if fac is None else fac[1:]))
        ctx.mark_non_differentiable(s)
        return z, lam, nu, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, glam, gnu, _gs):
        z, lam, nu, d, Q, G, A, *factors = ctx.saved_tensors
        fac = (ctx.kind, *factors)
        if bool(ctx.weak.any()):
            warnings.warn(
                f"qp: weakly active constraints (zero slack and zero multiplier) at batch elements "
                f"{element_list(ctx.weak)}: the solution is not differentiable there; the gradient returned is "
                "that of the interior point method's central path at the final barrier parameter", NonRegularWarning,
                stacklevel=2)
        gz = torch.zeros_like(z) if gz is None else gz
        glam = torch.zeros_like(lam) if glam is None else glam
        gnu = torch.zeros_like(nu) if gnu is None else gnu
        # Adjoint system [[Q, -G^T, A^T], [G, 1/D, 0], [A, 0, 0]] [w_z; u; w_nu] = [g_z; g_lam; g_nu], solved in
        # its row-equilibrated unreduced form (eliminating u = D (g_lam - G w_z) would amplify the errors in w_z
        # by D, which is huge on active constraints).
        n, m = z.shape[-1], lam.shape[-1]
        rhs = torch.cat([gz, d.clamp(max=1.0) * glam, gnu], -1).unsqueeze(-1)
        sol = torch.linalg.lu_solve(fac[1], fac[2], rhs).squeeze(-1)
        wz, u, wnu = sol[..., :n], sol[..., n:n + m], sol[..., n + m:]
        dQ = -0.5 * (wz.unsqueeze(-1) * z.unsqueeze(-2) + z.unsqueeze(-1) * wz.unsqueeze(-2))
        dp = -wz
        dG = -lam.unsqueeze(-1) * wz.unsqueeze(-2) + u.unsqueeze(-1) * z.unsqueeze(-2)
        dh = -u
        dA = -nu.unsqueeze(-1) * wz.unsqueeze(-2) - wnu.unsqueeze(-1) * z.unsqueeze(-2)
        db = wnu
        return dQ, dp, dG, dh, dA, db, None


def qp(Q: Tensor, p: Tensor, G: Optional[Tensor] = None, h: Optional[Tensor] = None, A: Optional[Tensor] = None,
       b: Optional[Tensor] = None, *, return_multipliers: bool = False, tol: Optional[float] = None,
       max_iter: int = 100, check: bool = True, on_failure: str = "warn",
       diagnostics: Optional[Diagnostics] = None) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
    r"""Solve a batch of convex quadratic programs and differentiate through them.

    .. math::

        z^\star = \arg\min_z \tfrac12 z^T Q z + p^T z \quad\text{s.t.}\quad G z \le h,\; A z = b

    Args:
        Q: ``(n, n)`` or ``(B, n, n)`` symmetric positive semidefinite.
        p: ``(n,)`` or ``(B, n)``.
        G, h: ``(m, n)`` / ``(B, m, n)`` and ``(m,)`` / ``(B, m)``; inequality constraints (optional).
        A, b: ``(k, n)`` / ``(B, k, n)`` and ``(k,)`` / ``(B, k)``; equality constraints (optional, ``A`` of full
            row rank).
        return_multipliers: also return ``lam`` ``(B, m)`` (``>= 0``) and ``nu`` ``(B, k)``, the multipliers of
            the Lagrangian ``1/2 z^T Q z + p^T z + lam^T (G z - h) + nu^T (A z - b)``. (The core nodes' convention
            ``grad f = J^T nu`` with ``g = G z - h`` has multipliers ``-lam``.) Both are differentiable.
        tol: tolerance on the KKT residuals (stationarity, primal feasibility), relative to the largest entry of
            the data (at least 1); the duality measure ``s^T lam / m`` must fall below ``1e-3 tol`` (absolute; ``tol``
            in single precision). Default
            ``1e-10`` (float64) or ``1e-5`` (float32).
        max_iter: maximum interior point iterations.
        check: check that ``Q`` is symmetric positive semidefinite (one Cholesky per distinct ``Q``).
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` for elements that do not converge.
        diagnostics: optional :class:`~torchddn.diagnostics.Diagnostics` filled with per-element results.

    Returns:
        ``z`` of shape ``(B, n)`` (``(n,)`` when no argument has a batch dimension), or ``(z, lam, nu)``.
        Parameters shared across the batch are broadcast and their gradients summed over the batch.

    Forward: batched primal-dual interior point method (Mehrotra predictor-corrector), each iteration one LU
    factorisation of the reduced KKT matrix ``[[Q + G^T D G, A^T], [A, 0]]``, ``D = diag(lam / s)``, and two
    solves; elements stop updating once converged. Cost ``O(B (n + k)^3)`` per iteration, typically 10-25.

    Backward: the OptNet adjoint. With ``[[Q + G^T D G, A^T], [A, 0]] [w_z; w_nu] = [g_z + G^T D g_lam; g_nu]``
    (one solve with the forward's final factorisation) and ``u = D (g_lam - G w_z)``:
    ``dQ = -sym(w_z z^T)``, ``dp = -w_z``, ``dG = -lam w_z^T + u z^T``, ``dh = -u``,
    ``dA = -nu w_z^T - w_nu z^T``, ``db = w_nu``. As the barrier parameter vanishes this is the exact active-set
    gradient. Weakly active constraints (zero slack and zero multiplier) make the solution non-differentiable;
    a :class:`~torchddn.diagnostics.NonRegularWarning` names those elements.

    Raises:
        DDNError: on bad shapes, NaN/Inf inputs, or a ``Q`` that is not symmetric PSD; on unbounded problems.
        InfeasibleError: naming the batch elements whose constraints cannot be satisfied.
    """
    Qb, pb, Gb, hb, Ab, bb, batched = _prepare(Q, p, G, h, A, b, check)
    if tol is None:
        tol = _default_tol(Qb.dtype)
    z, lam, nu, _ = _QPFunction.apply(Qb, pb, Gb, hb, Ab, bb, (tol, max_iter, on_failure, diagnostics))
    if not batched:
        z, lam, nu = z[0], lam[0], nu[0]
    if return_multipliers:
        return z, lam, nu
    return z


class QPLayer(nn.Module):
    r"""Module form of :func:`qp`: ``layer(Q, p, G, h, A=None, b=None)``.

    After each call ``layer.diagnostics`` holds per-element ``residual``, ``constraint_violation`` (primal
    residual), ``active`` (``lam > s``), ``converged``, ``iterations`` and ``nonregular`` (weakly active).
    """

    def __init__(self, *, return_multipliers: bool = False, tol: Optional[float] = None, max_iter: int = 100,
                 check: bool = True, on_failure: str = "warn") -> None:
        super().__init__()
        self.return_multipliers = return_multipliers
        self.tol = tol
        self.max_iter = max_iter
        self.check = check
        self.on_failure = on_failure
        self.diagnostics = Diagnostics()

    def forward(self, Q: Tensor, p: Tensor, G: Optional[Tensor] = None, h: Optional[Tensor] = None,
                A: Optional[Tensor] = None, b: Optional[Tensor] = None):
        self.diagnostics = Diagnostics()
        return qp(Q, p, G, h, A, b, return_multipliers=self.return_multipliers, tol=self.tol,
                  max_iter=self.max_iter, check=self.check, on_failure=self.on_failure,
                  diagnostics=self.diagnostics)

    def extra_repr(self) -> str:
        return f"tol={self.tol}, max_iter={self.max_iter}, return_multipliers={self.return_multipliers}"
