"""Matrix-free batched Krylov and stationary solvers: CG, MINRES, GMRES, BiCGStab, CGLS and the Neumann series.

Each works on a batch of independent systems ``A x = b`` with ``b`` of shape ``(*batch, n)`` (GMRES and the Neumann
iteration on ``(b, n)``); ``matvec`` applies every element's operator in one call. Elements converge, and are
frozen, independently; the reported residuals are true residuals ``||A x - b|| / ||b||``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from torchddn.linalg._common import LinearSolveInfo, MatVec, _dot, _flags, _relres_mv, default_tol

__all__ = ["cg", "minres", "gmres", "bicgstab", "cgls", "neumann"]

Precond = Optional[Callable[[Tensor], Tensor]]


def _lin_tol(dtype: torch.dtype) -> float:
    return default_tol(dtype)


def cg(matvec: MatVec, b: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None,
       precond: Precond = None) -> tuple[Tensor, LinearSolveInfo]:
    r"""Batched (preconditioned) conjugate gradients for symmetric positive definite ``A x = b``, matrix-free.

    Args:
        matvec: ``(*batch, n) -> (*batch, n)``.
        b: ``(*batch, n)``.
        tol: each element stops when ``||r|| <= tol ||b||`` (recursive residual) and is frozen.
        max_iter: default ``10 n + 50``.
        precond: optional ``M^{-1}``, ``(*batch, n) -> (*batch, n)``, symmetric positive definite.

    From ``x0 = 0`` without a preconditioner the iterates stay in ``range(A)``, so a singular consistent system
    gets its minimum-norm solution; with one, the minimum ``M``-norm solution. Elements that meet negative
    curvature (flagged ``indefinite``) or zero curvature (flagged ``nonregular``) stop;
    :class:`torchddn.linalg.CG` falls back to MINRES for them.
    Cost: one ``matvec`` (and one ``precond``) per iteration for the whole batch, plus one for the true residual.
    """
    tol = default_tol(b.dtype) if tol is None else tol
    n = b.shape[-1]
    max_iter = 10 * n + 50 if max_iter is None else max_iter
    x = torch.zeros_like(b)
    r = b.clone()
    z = r if precond is None else precond(r)
    p = z.clone()
    rz = _dot(r, z)
    rr = _dot(r, r)
    bnorm = rr.sqrt()
    target = (tol * bnorm) ** 2
    done = rr <= target
    bad = torch.zeros_like(done)
    negative = torch.zeros_like(done)
    iters = torch.zeros(b.shape[:-1], dtype=torch.long, device=b.device)
    tiny = torch.finfo(b.dtype).tiny
    eps = torch.finfo(b.dtype).eps
    for _ in range(max_iter):
        if bool(done.all()):
            break
        Ap = matvec(p)
        pAp = _dot(p, Ap)
        small = pAp.abs() <= 100 * eps * p.norm(dim=-1) * Ap.norm(dim=-1) + tiny
        curv_bad = ((pAp < 0) | small) & ~done
        negative = negative | ((pAp < 0) & ~small & ~done)
        bad = bad | curv_bad
        done = done | curv_bad
        active = ~done
        alpha = torch.where(active, rz / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rz))
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * Ap
        z = r if precond is None else precond(r)
        rz_new = _dot(r, z)
        rr_new = _dot(r, r)
        iters = iters + active.long()
        reached = rr_new <= target
        # a preconditioner that is not positive definite breaks the recurrence
        broke = active & ~reached & ~(rz_new > 0)
        bad = bad | broke
        done = done | broke
        active = active & ~broke
        beta = torch.where(active, rz_new / rz.abs().clamp_min(tiny), torch.zeros_like(rz))
        p = torch.where(active[..., None], z + beta[..., None] * p, p)
        rz = torch.where(active, rz_new, rz)
        rr = torch.where(active, rr_new, rr)
        done = done | (active & reached)
    res = _relres_mv(matvec, x, b)
    return x, LinearSolveInfo(res, iters, bad & ~negative, negative, "cg")


def minres(matvec: MatVec, b: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None,
           precond: Precond = None) -> tuple[Tensor, LinearSolveInfo]:
    r"""Batched (preconditioned) MINRES (Paige & Saunders) for symmetric, possibly indefinite or singular systems,
    matrix-free.

    Args:
        matvec: ``(*batch, n) -> (*batch, n)``, symmetric.
        b: ``(*batch, n)``.
        tol: each element stops when its residual estimate (in the ``M^{-1}``-norm with a preconditioner)
            ``<= tol ||b||``.
        max_iter: default ``10 n + 50``.
        precond: optional ``M^{-1}``, symmetric positive definite.

    From ``x0 = 0`` without a preconditioner the iterates stay in the Krylov space of ``A``, so for a singular
    consistent system MINRES returns the minimum-norm solution.
    Cost: one ``matvec`` (and one ``precond``) per iteration for the whole batch, plus one for the true residual.
    """
    tol = default_tol(b.dtype) if tol is None else tol
    n = b.shape[-1]
    max_iter = 10 * n + 50 if max_iter is None else max_iter
    eps = torch.finfo(b.dtype).eps
    tiny = torch.finfo(b.dtype).tiny
    batch = b.shape[:-1]
    x = torch.zeros_like(b)
    r1 = b.clone()
    r2 = b.clone()
    y = b.clone() if precond is None else precond(b)
    beta1 = _dot(b, y).clamp_min(0).sqrt()
    zeros = torch.zeros_like(beta1)
    oldb, beta, dbar, epsln, phibar = zeros, beta1.clone(), zeros, zeros, beta1.clone()
    cs, sn = -torch.ones_like(beta1), zeros
    w = torch.zeros_like(b)
    w2 = torch.zeros_like(b)
    done = beta1 <= tiny
    iters = torch.zeros(batch, dtype=torch.long, device=b.device)
    for itn in range(max_iter):
        if bool(done.all()):
            break
        active = ~done
        s = torch.where(active & (beta > tiny), 1.0 / torch.where(beta > tiny, beta, torch.ones_like(beta)), zeros)
        v = s[..., None] * y
        y = matvec(v)
        if itn >= 1:
            y = y - (beta / torch.where(oldb > tiny, oldb, torch.ones_like(oldb)))[..., None] * r1
        alfa = _dot(v, y)
        y = y - (alfa * s)[..., None] * r2
        r1 = r2
        r2 = y
        if precond is not None:
            y = precond(r2)
        oldb = beta
        beta = _dot(r2, y).clamp_min(0).sqrt()
        oldeps = epsln
        delta = cs * dbar + sn * alfa
        gbar = sn * dbar - cs * alfa
        epsln = sn * beta
        dbar = -cs * beta
        gamma = torch.sqrt(gbar ** 2 + beta ** 2).clamp_min(eps * beta1.clamp_min(tiny))
        cs_new = gbar / gamma
        sn_new = beta / gamma
        phi = cs_new * phibar
        w_new = (v - oldeps[..., None] * w2 - delta[..., None] * w) / gamma[..., None]
        # freeze finished elements
        m = active[..., None]
        x = torch.where(m, x + phi[..., None] * w_new, x)
        w2 = torch.where(m, w, w2)
        w = torch.where(m, w_new, w)
        cs = torch.where(active, cs_new, cs)
        sn = torch.where(active, sn_new, sn)
        phibar = torch.where(active, sn_new * phibar, phibar)
        iters = iters + active.long()
        done = done | (phibar <= tol * beta1) | (beta <= tiny)
    # true residual (one extra product) for an honest report
    res = _relres_mv(matvec, x, b)
    false = _flags(batch, b.device)
    return x, LinearSolveInfo(res, iters, false, false, "minres")


def bicgstab(matvec: MatVec, b: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None
             ) -> tuple[Tensor, LinearSolveInfo]:
    r"""Batched BiCGStab (van der Vorst, 1992) for non-symmetric ``A x = b``, matrix-free, ``b`` ``(*batch, n)``.

    Each element stops when ``||r|| <= tol ||b||`` (default tolerance :func:`default_tol`) and is frozen. On a
    breakdown (``<r_hat, r>``, ``<r_hat, A p>`` or ``||A s||`` vanishing) the element restarts from its current
    iterate with ``r_hat = r``; two breakdowns in a row stop it (not converged; :class:`torchddn.linalg.BiCGStab`
    then falls back to least squares). Right preconditioning is applied by the solver value by passing
    ``A M^{-1}``. ``max_iter`` (default ``10 n + 50``) counts iterations of two products each.
    Cost: two ``matvec`` per iteration for the whole batch, plus one for the true residual.
    """
    tol = default_tol(b.dtype) if tol is None else tol
    n = b.shape[-1]
    max_iter = 10 * n + 50 if max_iter is None else max_iter
    eps = torch.finfo(b.dtype).eps
    tiny = torch.finfo(b.dtype).tiny
    batch = b.shape[:-1]
    x = torch.zeros_like(b)
    r = b.clone()
    rhat = b.clone()
    p = torch.zeros_like(b)
    v = torch.zeros_like(b)
    one = torch.ones(batch, dtype=b.dtype, device=b.device)
    rho, alpha, omega = one.clone(), one.clone(), one.clone()
    bnorm = b.norm(dim=-1)
    target = tol * bnorm
    done = bnorm <= target
    stall = torch.zeros(batch, dtype=torch.long, device=b.device)
    iters = torch.zeros(batch, dtype=torch.long, device=b.device)

    def safe(den: Tensor, ok: Tensor) -> Tensor:
        return torch.where(ok, den, torch.ones_like(den))

    for _ in range(max_iter):
        if bool(done.all()):
            break
        active = ~done
        rnorm = r.norm(dim=-1)
        rho_new = _dot(rhat, r)
        ok_rho = rho_new.abs() > eps * rhat.norm(dim=-1) * rnorm + tiny
        beta = (rho_new / safe(rho, rho != 0)) * (alpha / safe(omega, omega != 0))
        p_new = r + beta[..., None] * (p - omega[..., None] * v)
        v_new = matvec(p_new)
        den = _dot(rhat, v_new)
        ok_den = den.abs() > eps * rhat.norm(dim=-1) * v_new.norm(dim=-1) + tiny
        ok1 = active & ok_rho & ok_den
        alpha_new = torch.where(ok1, rho_new / safe(den, ok1), torch.zeros_like(den))
        s = r - alpha_new[..., None] * v_new
        x_half = x + alpha_new[..., None] * p_new
        t = matvec(s)
        tt = _dot(t, t)
        half_done = s.norm(dim=-1) <= target
        ok_t = tt > (eps * s.norm(dim=-1)) ** 2 + tiny
        ok2 = ok1 & ok_t & ~half_done
        omega_new = torch.where(ok2, _dot(t, s) / safe(tt, ok2), torch.zeros_like(tt))
        ok2 = ok2 & (omega_new != 0)
        x_new = torch.where(ok2[..., None], x_half + omega_new[..., None] * s, x_half)
        r_new = torch.where(ok2[..., None], s - omega_new[..., None] * t, s)
        # elements that made the half step keep it; breakdowns restart with r_hat = r
        x = torch.where(ok1[..., None], x_new, x)
        r = torch.where(ok1[..., None], r_new, r)
        restart = active & ~ok2
        stall = torch.where(restart, stall + 1, torch.zeros_like(stall))
        rhat = torch.where(restart[..., None], r, rhat)
        p = torch.where(restart[..., None], torch.zeros_like(p), torch.where(active[..., None], p_new, p))
        v = torch.where(restart[..., None], torch.zeros_like(v), torch.where(active[..., None], v_new, v))
        rho = torch.where(restart, one, torch.where(active, rho_new, rho))
        alpha = torch.where(restart, one, torch.where(active, alpha_new, alpha))
        omega = torch.where(restart, one, torch.where(active, omega_new, omega))
        iters = iters + 2 * active.long()
        done = done | (active & (r.norm(dim=-1) <= target)) | (stall >= 2)
    res = _relres_mv(matvec, x, b)
    bad = ~torch.isfinite(x).all(dim=-1)
    x = torch.where(bad[..., None], torch.zeros_like(x), x)
    res = torch.where(bad, torch.full_like(res, math.inf), res)
    false = _flags(batch, b.device)
    return x, LinearSolveInfo(res, iters, false, false, "bicgstab")


def cgls(matvec: MatVec, rmatvec: MatVec, b: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None
         ) -> tuple[Tensor, LinearSolveInfo]:
    r"""Batched CGLS: CG on the normal equations ``Aᵀ A x = Aᵀ b`` without forming them, ``b`` ``(*batch, n)``.

    From ``x0 = 0`` the iterates stay in ``range(Aᵀ)``, so each element converges to the minimum-norm
    least-squares solution ``pinv(A) b`` whether or not ``A`` is singular or the system consistent. An element
    stops when ``||A x - b|| <= tol ||b||`` or ``||Aᵀ (A x - b)|| <= tol ||Aᵀ b||``; elements stopping on the second
    test with a residual above ``10 tol`` are singular and inconsistent, flagged ``nonregular``. Convergence goes
    with ``cond(A)^2``; it is the fallback of the non-symmetric solvers, not a first choice. ``max_iter`` default
    ``10 n + 50``. Cost: one ``matvec`` and one ``rmatvec`` per iteration, plus one for the true residual.
    """
    tol = default_tol(b.dtype) if tol is None else tol
    n = b.shape[-1]
    max_iter = 10 * n + 50 if max_iter is None else max_iter
    tiny = torch.finfo(b.dtype).tiny
    batch = b.shape[:-1]
    x = torch.zeros_like(b)
    r = b.clone()
    s = rmatvec(r)
    p = s.clone()
    gamma = _dot(s, s)
    bnorm = b.norm(dim=-1)
    snorm0 = gamma.sqrt()
    small_r = bnorm <= tol * bnorm
    small_s = snorm0 <= tiny
    done = small_r | small_s
    normal_done = small_s & ~small_r
    iters = torch.zeros(batch, dtype=torch.long, device=b.device)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        active = ~done
        q = matvec(p)
        qq = _dot(q, q)
        ok = active & (qq > tiny)
        alpha = torch.where(ok, gamma / torch.where(ok, qq, torch.ones_like(qq)), torch.zeros_like(qq))
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * q
        s = rmatvec(r)
        gamma_new = _dot(s, s)
        iters = iters + 2 * active.long()
        reached_r = r.norm(dim=-1) <= tol * bnorm
        reached_s = gamma_new.sqrt() <= tol * snorm0
        normal_done = normal_done | (active & ~reached_r & (reached_s | ~ok))
        done = done | (active & (reached_r | reached_s | ~ok))
        beta = torch.where(active & ~done, gamma_new / gamma.clamp_min(tiny), torch.zeros_like(gamma))
        p = torch.where((active & ~done)[..., None], s + beta[..., None] * p, p)
        gamma = torch.where(active, gamma_new, gamma)
    res = _relres_mv(matvec, x, b)
    singular = normal_done & (res > 10 * tol)
    false = _flags(batch, b.device)
    return x, LinearSolveInfo(res, iters, singular, false, "cgls", (res <= 10 * tol) | singular)


def gmres(matvec: MatVec, rhs: Tensor, *, tol: Optional[float] = None,
          restart: Optional[int] = None, max_iter: Optional[int] = None) -> tuple[Tensor, LinearSolveInfo]:
    r"""Batched restarted GMRES for non-symmetric systems ``A x = rhs``, matrix-free.

    Args:
        matvec: ``(b, n) -> (b, n)``, the per-element product ``A_i x_i``.
        rhs: ``(b, n)``.
        tol: relative residual tolerance ``||A x - rhs|| <= tol ||rhs||`` (default ``1e-11`` in float64,
            ``1e-6`` otherwise).
        restart: Krylov dimension per cycle (default ``min(n, 30)``).
        max_iter: total Arnoldi steps (default ``max(10 n, 100)``, at most 2000).

    Each element keeps its own residual (Givens rotations); finished elements are frozen, as are elements whose
    residual does not decrease over a whole restart cycle (stagnation). If the Arnoldi process of
    an element breaks down (the Krylov space is invariant) before its residual is small, its matrix is singular
    and the right-hand side is outside its range: the element stops with the least-squares solution of the cycle
    (minimum norm in the Krylov space, never NaN) and is flagged ``nonregular``.
    Cost: one ``matvec`` per iteration for the whole batch plus ``O(b n restart)`` orthogonalisation.

    Returns:
        ``(x, info)`` with per-element relative residual, iterations and the ``nonregular`` flag.
    """
    b, n = rhs.shape
    dtype, device = rhs.dtype, rhs.device
    tol = _lin_tol(dtype) if tol is None else float(tol)
    restart = min(n, 30) if restart is None else max(int(restart), 1)
    max_iter = min(max(10 * n, 100), 2000) if max_iter is None else int(max_iter)
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    x = torch.zeros_like(rhs)
    bnorm = rhs.norm(dim=1)
    target = tol * bnorm
    r = rhs.clone()
    beta = bnorm.clone()
    converged = beta <= target
    singular = torch.zeros(b, dtype=torch.bool, device=device)
    iters = torch.zeros(b, dtype=torch.long, device=device)
    total = 0
    stagnant = torch.zeros(b, dtype=torch.bool, device=device)
    while total < max_iter and not bool((converged | singular | stagnant).all()):
        k = min(restart, max_iter - total)
        active0 = ~(converged | singular | stagnant)
        V = rhs.new_zeros(b, k + 1, n)
        V[:, 0] = r / beta.clamp_min(tiny)[:, None]
        H = rhs.new_zeros(b, k + 1, k)
        # product of the Givens rotations so far, applied as one small matrix product per step
        Q = torch.eye(k + 1, dtype=dtype, device=device).repeat(b, 1, 1)
        active = active0.clone()
        steps = torch.zeros(b, dtype=torch.long, device=device)   # Krylov dimension used by each element
        broke = torch.zeros(b, dtype=torch.bool, device=device)
        used = 0
        for j in range(k):
            w = matvec(V[:, j])
            wnorm = w.norm(dim=1)
            # classical Gram-Schmidt, twice (numerically as good as modified GS, and batched)
            Vj = V[:, : j + 1]
            h = (Vj * w.unsqueeze(1)).sum(-1)
            w = w - (h.unsqueeze(-1) * Vj).sum(1)
            h2 = (Vj * w.unsqueeze(1)).sum(-1)
            w = w - (h2.unsqueeze(-1) * Vj).sum(1)
            h = h + h2
            hn = w.norm(dim=1)
            brk = hn <= 100 * eps * wnorm + tiny
            V[:, j + 1] = torch.where(brk[:, None], torch.zeros_like(w), w / hn.clamp_min(tiny)[:, None])
            hn = torch.where(brk, torch.zeros_like(hn), hn)
            H[:, : j + 1, j] = h
            H[:, j + 1, j] = hn
            # Givens rotations: previous ones applied to column j, then the new one zeroing H[j + 1, j]
            col = torch.cat([h, hn.unsqueeze(1)], dim=1)          # (b, j + 2)
            col = (Q[:, : j + 2, : j + 2] * col.unsqueeze(1)).sum(-1)
            a, c2 = col[:, j], col[:, j + 1]
            rr = torch.sqrt(a * a + c2 * c2)
            nz = rr > 100 * eps * wnorm + tiny   # relative to ||A v_j||, the norm of the whole column
            # a zero column (c, s) = (0, 1) keeps the residual where it is: the step made no progress
            c = torch.where(nz, a / torch.where(nz, rr, torch.ones_like(rr)), torch.zeros_like(rr))[:, None]
            s = torch.where(nz, c2 / torch.where(nz, rr, torch.ones_like(rr)), torch.ones_like(rr))[:, None]
            qj, qj1 = Q[:, j, : j + 2], Q[:, j + 1, : j + 2]
            Q[:, j, : j + 2], Q[:, j + 1, : j + 2] = c * qj + s * qj1, c * qj1 - s * qj
            res = (beta * Q[:, j + 1, 0]).abs()                   # |last entry of the rotated beta e1|
            steps = steps + active.long()
            iters = iters + active.long()
            used = j + 1
            reached = active & (res <= target)
            stuck = active & brk & ~reached
            broke = broke | stuck
            active = active & ~reached & ~brk
            if not bool(active.any()):
                break
        total += used
        # least-squares solution of min ||beta e1 - H_s y|| per element, truncated to its own Krylov dimension
        Hs = H[:, : used + 1, :used]
        cols = torch.arange(used, device=device)
        mask = (cols[None, :] < steps[:, None]).to(dtype)
        Hm = Hs * mask[:, None, :]
        e1 = rhs.new_zeros(b, used + 1)
        e1[:, 0] = beta
        y = (torch.linalg.pinv(Hm) @ e1.unsqueeze(-1)).squeeze(-1)
        dx = (y.unsqueeze(-1) * V[:, :used]).sum(1)
        x = torch.where(active0[:, None], x + dx, x)
        r = rhs - matvec(x)
        beta_old, beta = beta, r.norm(dim=1)
        converged = converged | (active0 & (beta <= target * (1 + 10 * eps)))
        singular = singular | (active0 & broke & ~converged)
        # a whole cycle without progress: rounding-level stagnation, stop (reported as not converged)
        stagnant = stagnant | (active0 & ~converged & ~singular & ~(beta < (1 - 1e-6) * beta_old))
    relres = beta / bnorm.clamp_min(tiny)
    relres = torch.where(bnorm == 0, torch.zeros_like(relres), relres)
    return x, LinearSolveInfo(relres, iters, singular, torch.zeros_like(singular), "gmres")


def neumann(rmatvec: MatVec, v: Tensor, *, tol: Optional[float] = None, max_iter: int = 500,
            damping: float = 1.0, steps: Optional[int] = None) -> tuple[Tensor, LinearSolveInfo]:
    r"""Damped fixed-point (Neumann series) iteration ``u <- (1 - damping) u + damping (v + Jᵀ u)`` from ``u = 0``
    for ``(I - Jᵀ) u = v``, with ``rmatvec(u) = Jᵀ u`` batched on ``(b, n)``.

    With ``steps=k`` exactly ``k`` steps are taken (the phantom gradient); otherwise each element stops when
    ``||(I - Jᵀ) u - v|| <= tol ||v||``. Converges when the spectral radius of ``(1 - damping) I + damping J`` is
    below one. Cost: one ``rmatvec`` per step.
    """
    b = v.shape[0]
    tol = _lin_tol(v.dtype) if tol is None else float(tol)
    tiny = torch.finfo(v.dtype).tiny
    vnorm = v.norm(dim=1)
    u = torch.zeros_like(v)
    iters = torch.zeros(b, dtype=torch.long, device=v.device)
    if steps is not None:
        for _ in range(int(steps)):
            u = (1.0 - damping) * u + damping * (v + rmatvec(u))
        iters = iters + int(steps)
        relres = ((u - rmatvec(u)) - v).norm(dim=1) / vnorm.clamp_min(tiny)
        return u, LinearSolveInfo(relres, iters, torch.zeros(b, dtype=torch.bool, device=v.device),
                                  torch.zeros(b, dtype=torch.bool, device=v.device), "phantom")
    done = vnorm <= tiny
    relres = torch.zeros_like(vnorm)
    for _ in range(max_iter):
        if bool(done.all()):
            break
        Ju = rmatvec(u)
        relres = torch.nan_to_num(((u - Ju) - v).norm(dim=1) / vnorm.clamp_min(tiny), nan=math.inf)
        done = done | (relres <= tol)
        active = ~done
        u = torch.where(active[:, None], (1.0 - damping) * u + damping * (v + Ju), u)
        iters = iters + active.long()
    relres = ((u - rmatvec(u)) - v).norm(dim=1) / vnorm.clamp_min(tiny)
    relres = torch.where(vnorm <= tiny, torch.zeros_like(relres), torch.nan_to_num(relres, nan=math.inf))
    # a diverging iteration must not hand back Inf/NaN
    bad = ~torch.isfinite(u).all(dim=1)
    u = torch.where(bad[:, None], torch.zeros_like(u), u)
    return u, LinearSolveInfo(relres, iters, bad, torch.zeros_like(bad), "fixed_point")


