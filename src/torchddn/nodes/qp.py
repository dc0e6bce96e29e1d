"""Differentiable convex quadratic programs (the OptNet layer).

.. math::

    z^\\star(Q, p, G, h, A, b) = \\arg\\min_z \\tfrac12 z^T Q z + p^T z
    \\quad\\text{s.t.}\\quad G z \\le h,\\; A z = b .

The forward is a batched primal-dual interior point method (Mehrotra predictor-corrector) in pure torch, with
per-element convergence; the backward differentiates the KKT conditions (Amos & Kolter, "OptNet", ICML 2017),
solving the adjoint system at the returned point by iterative refinement preconditioned with each element's last
forward factorisation of the reduced KKT matrix (Cholesky, or LU with equality constraints); only elements for
which that does not converge are factorised again.
"""
from __future__ import annotations

import threading
import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from torchddn.nodes._callable import make_callable
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


_SCRATCH_MAX_BYTES = 1 << 26  # 64 MiB per thread and dtype


class _Scratch(threading.local):
    def __init__(self) -> None:
        self.buffers: dict = {}


_SCRATCH = _Scratch()


def _scratch(numel: int, like: Tensor) -> Tensor:
    """A flat, uninitialised buffer of ``numel`` elements for temporaries that do not outlive the call that asks
    for it. On CPU it is kept per thread and dtype (up to 64 MiB) and handed out again to later calls: there,
    allocating and releasing blocks of a few MiB on every call costs page faults that can take longer than the
    arithmetic of a small batch of QPs. Elsewhere (e.g. CUDA, with its caching allocator) it is a fresh tensor."""
    if like.device.type != "cpu" or numel * like.element_size() > _SCRATCH_MAX_BYTES:
        return torch.empty(numel, dtype=like.dtype, device=like.device)
    buf = _SCRATCH.buffers.get(like.dtype)
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor, writable inside and outside inference mode
            buf = torch.empty(numel, dtype=like.dtype)
        _SCRATCH.buffers[like.dtype] = buf
    return buf[:numel]


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def _check_finite(name: str, x: Optional[Tensor], batched: bool) -> None:
    if x is None:
        return
    with torch.no_grad():
        if bool(torch.isfinite(x.sum())):  # one cheap pass; an overflowing sum falls through to the exact check
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
    with torch.no_grad():
        Qs = torch.add(Q, Q.transpose(-1, -2)).mul_(0.5)  # the symmetric part, which the solver uses
        if check:
            _check_psd(Q, Qs)

    def expand(t: Optional[Tensor], core: int) -> Optional[Tensor]:
        if t is None:
            return None
        if t.dim() == core:
            t = t.unsqueeze(0)
        return t.expand(B, *t.shape[1:])

    Qb, Qsb, pb = expand(Q, 2), expand(Qs, 2), expand(p, 1)
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
    return Qb, Qsb, pb, Gb, hb, Ab, bb, batched


def _check_psd(Q: Tensor, Qs: Tensor) -> None:
    """Check that ``Q`` is symmetric and its symmetric part ``Qs`` positive semidefinite (one Cholesky)."""
    Qb = Q if Q.dim() == 3 else Q.unsqueeze(0)
    Qsb = Qs if Qs.dim() == 3 else Qs.unsqueeze(0)
    B, n = Qb.shape[0], Qb.shape[-1]
    work = _scratch(2 * B * n * n, Qsb).view(2, B, n, n)
    scale = torch.abs(Qb, out=work[0]).amax(dim=(-2, -1)).clamp_min(1.0)
    asym = 2 * torch.sub(Qb, Qsb, out=work[0]).abs_().amax(dim=(-2, -1))  # max |Q - Q^T|
    bad = asym > 1e-5 * scale
    if bool(bad.any()):
        where = f" at batch elements {element_list(bad)}" if Q.dim() == 3 else ""
        raise DDNError(f"qp: Q must be symmetric{where} (max |Q - Q^T| = {float(asym.max()):.3g})")
    eps = torch.finfo(Q.dtype).eps
    shift = (eps ** 0.5) * n * scale
    K = work[0].copy_(Qsb)
    K.diagonal(0, -2, -1).add_(shift.unsqueeze(-1))
    _, info = torch.linalg.cholesky_ex(K, upper=True, out=(work[1].mT, torch.empty(B, dtype=torch.int32,
                                                                                     device=Q.device)))
    bad = info != 0
    if bool(bad.any()):
        where = f" at batch elements {element_list(bad)}" if Q.dim() == 3 else ""
        raise DDNError(f"qp: Q must be positive semidefinite{where} (the QP is not convex)")


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


def _factor(Q: Tensor, G: Tensor, A: Tensor, d: Tensor, ws: Optional[tuple] = None, low: Optional[tuple] = None):
    """Factorise the reduced KKT matrices ``[[Q + G^T diag(d) G, A^T], [A, 0]]`` (``d`` of shape (B, m, 1)):
    Cholesky when there are no equality constraints (they are then symmetric positive definite unless singular),
    LU with partial pivoting otherwise or when the Cholesky factorisation fails. Returns (factors, info).

    ``ws``: optional workspace from :func:`_workspace` (for at least B elements) that the (B, n, n) intermediates
    and the Cholesky factor are written to instead of fresh allocations (on CPU, allocating and releasing large
    blocks every iteration costs page faults that can exceed the arithmetic). ``low``: optional single precision
    workspace from :func:`_workspace` whose data slot holds ``[Q; G]`` in single precision (no equality
    constraints); the reduced matrix is then formed and factorised in single precision, at about half the cost
    of the product."""
    B, k = Q.shape[0], A.shape[-2]
    if low is not None:
        n = Q.shape[-1]
        Q32, G32 = low[4][:B, :n], low[4][:B, n:]
        H = torch.baddbmm(Q32, G32.mT, torch.mul(d.to(G32.dtype), G32, out=low[0][:B]), out=low[1][:B])
        ws = low
    elif ws is None:
        H = torch.baddbmm(Q, G.mT, d * G)
    else:
        H = torch.baddbmm(Q, G.mT, torch.mul(d, G, out=ws[0][:B]), out=ws[1][:B])
    if k == 0:
        if ws is None:
            U, info = torch.linalg.cholesky_ex(H, upper=True)  # H = U^T U (cheaper than the lower factor on CPU)
        else:
            U, info = torch.linalg.cholesky_ex(H, upper=True, out=(ws[2][:B], ws[3][:B]))
        if not bool(info.any()):
            return ("chol", U), info
        K = H
    else:
        K = torch.cat([torch.cat([H, A.mT], -1), torch.cat([A, A.new_zeros(B, k, k)], -1)], -2)
    lu, piv, info = torch.linalg.lu_factor_ex(K)
    return ("lu", lu, piv), info


def _workspace(B: int, m: int, n: int, L: int, like: Tensor, dtype: Optional[torch.dtype] = None,
               copies: int = 1) -> tuple:
    """Scratch for the interior point iteration (in ``dtype``, default that of ``like``): D G (B, m, n) and the
    reduced matrix (B, n, n) for :func:`_factor`, its Cholesky factor (column-major, the layout of LAPACK's
    factors), the info vector, and room (copies, B, L, n) for copies of the data."""
    dtype = like.dtype if dtype is None else dtype
    work = _scratch(B * (m * n + 2 * n * n + copies * L * n), like.new_empty(0, dtype=dtype))
    dG, H, U, data = work.split([B * m * n, B * n * n, B * n * n, copies * B * L * n])
    data = data.view(copies, B, L, n)
    return (dG.view(B, m, n), H.view(B, n, n), U.view(B, n, n).mT,
            torch.empty(B, dtype=torch.int32, device=like.device), data[0] if copies == 1 else data)


def _solve(fac, rhs: Tensor) -> Tensor:
    """Solve ``K x = rhs`` for row vectors ``rhs`` of shape (B, 1, n + k) with the factors from :func:`_factor`
    (two triangular solves for Cholesky: faster on CPU than ``cholesky_solve``)."""
    if fac[1].dtype != rhs.dtype:  # single precision factors (see _ipm)
        return _solve(fac, rhs.to(fac[1].dtype)).to(rhs.dtype)
    if fac[0] == "chol":
        U = fac[1]
        y = torch.linalg.solve_triangular(U.mT, rhs.mT, upper=False)
        return torch.linalg.solve_triangular(U, y, upper=True).mT
    return torch.linalg.lu_solve(fac[1], fac[2], rhs.mT).mT


def _cap(qs: Tensor, gs: Tensor) -> Tensor:
    """Cap on D = lam / s in the reduced matrix ``Q + G^T min(D, cap) G`` that the forward and the backward
    factorise: ``1e7 max(1, max|Q| / max|G|^2)``, so that the constraint part stays within 1e7 of the larger of the
    two scales (a well-conditioned factorisation), while ``1 / cap`` is negligible next to the active-set KKT
    system that the capped one approximates (fast refinement). ``qs``, ``gs``: max |Q|, max |G| per element."""
    eps = torch.finfo(qs.dtype).eps
    return (1e7 * torch.maximum(qs / gs.square().clamp_min(torch.finfo(qs.dtype).tiny), torch.ones_like(qs))
            ).clamp_(max=1.0 / eps)


# Codes of the interior point method's per-element outcome.
_CONVERGED, _STALLED, _DIVERGED, _FAILED, _MAX_ITER = 0, 1, 2, 3, 4


def _ipm(Q: Tensor, p: Tensor, G: Tensor, h: Tensor, A: Tensor, b: Tensor, tol: float, max_iter: int):
    """Batched Mehrotra predictor-corrector. Returns z, s, lam, nu, converged, iterations, residual, primal
    residual, scale, status (singular/non-finite), magnitudes (max |Q|, |G|, |A|), the stacked data [Q; A; G] and
    each element's last factorisation (for the backward, see :func:`_adjoint`).

    Vectors are kept as batched rows of shape (B, 1, .) (per-element scalars as (B, 1, 1)), so that every
    matrix-vector product is a single batched row-times-matrix product (on CPU much faster than a batched
    matrix-vector product or a broadcast multiply-and-sum) and nothing needs reshaping. The iteration works on the
    elements still running only: an element that finishes (converged, stalled, diverged, failed) leaves the
    compacted state, with its best iterate written to the result."""
    B, n = p.shape
    m, k = h.shape[-1], b.shape[-1]
    dtype = p.dtype
    tiny = torch.finfo(dtype).tiny
    inf = float("inf")

    def amax(x: Tensor) -> Tensor:
        return x.abs().reshape(B, -1).amax(-1) if x[0].numel() else x.new_zeros(B)

    mags = torch.stack([amax(t) for t in (Q, G, A, p, h, b)], -1)
    scale = mags.amax(-1).clamp_min(1.0)
    big = 1.0 / torch.finfo(dtype).eps ** 0.75
    mu_weight = 1e3 if dtype == torch.float64 else 1.0
    sc = scale.view(B, 1, 1)
    # Per-element thresholds [tol, stall, divergence, merit weight of the duality measure s^T lam / m], packed so
    # that compacting them is one index_select.
    # the duality measure above which single precision factors may be used, and the cap on D (see _cap).
    limits = torch.cat([tol * sc, 10 * tol * sc, big * sc, (mu_weight / max(m, 1)) * sc, 1e-4 * m * sc,
                        _cap(mags[:, 0], mags[:, 1]).view(B, 1, 1)], -1)
    mu_floor = 0.1 * tol / mu_weight  # a tenth of the duality measure at which the iteration stops

    # The data stacked once as rows M = [Q; A; G] and the iterate as X = [z, nu, lam, s]: the dual residual
    # Q z + A^T nu + G^T lam + p is one product with M, the primal ones [A z - b, G z - h] one with M[n:] = [A; G],
    # and the pair (lam, s) that the step length looks at is contiguous.
    M = torch.cat([Q, A, G], -2)
    L1 = n + k + m
    p1 = p.unsqueeze(1)
    nhb = torch.cat([b, h], -1).neg().unsqueeze(1)

    # While the duality measure is large (above 1e-4 of the data's scale) and the reduced matrix well conditioned
    # (D <= 1e6), the reduced matrix is formed and factorised in single precision for double precision data of
    # moderate magnitude without equality constraints: the Newton directions then need few digits (the residuals
    # are formed in double precision, so that later iterations remove any error). A factorisation that fails in
    # single precision switches to double precision for good.
    low = None
    if dtype == torch.float64 and k == 0 and m and bool((scale < 1e15).all()):
        low = _workspace(B, m, n, L1, p, torch.float32)
        low[4].copy_(M)
    # Initial point (as in CVXOPT): minimise 1/2 z^T Q z + p^T z + 1/2 |G z - h|^2 s.t. A z = b.
    Gv = M[:, n + k:]
    ws = _workspace(B, m, n, L1, p, copies=2)
    fac, info = _factor(M[:, :n], Gv, M[:, n:n + k], torch.ones_like(h).unsqueeze(-1), ws)
    rhs = torch.baddbmm(p1, h.unsqueeze(1), Gv, beta=-1)  # G^T h - p
    sol = _solve(fac, torch.cat([rhs, b.unsqueeze(1)], -1) if k else rhs)  # [z, nu]
    if m:
        s = torch.baddbmm(h.unsqueeze(1), sol[..., :n], Gv.mT, alpha=-1)  # h - G z
        lam = -s
        a_s = -s.amin(-1, keepdim=True)
        s = torch.where(a_s < 0, s, s + 1 + a_s)
        a_l = -lam.amin(-1, keepdim=True)
        lam = torch.where(a_l < 0, lam, lam + 1 + a_l)
    else:
        s = lam = h.unsqueeze(1)
    failed = (info != 0).view(B, 1, 1) | ~torch.isfinite(sol).all(-1, keepdim=True)
    X = torch.cat([torch.where(failed, 0.0, sol), lam, s], -1)

    # Results, written as the elements finish.
    X_out = torch.empty_like(X)
    res_out = torch.empty(B, dtype=dtype, device=p.device)
    code_out = torch.empty(B, dtype=torch.long, device=p.device)
    iters_out = torch.empty(B, dtype=torch.long, device=p.device)
    # State of the elements still running (global indices idx), compacted as elements finish.
    idx = torch.arange(B, device=p.device)
    Ma, pa, nhba, lim = M, p1, nhb, limits
    since = torch.zeros(B, 1, 1, dtype=torch.long, device=p.device)
    best = torch.full_like(sc, inf)
    best_km = torch.full((B, 1, 2), inf, dtype=dtype, device=p.device)  # best KKT residual, duality measure
    best_X = X
    buffer = 0  # which copy of the data in ws holds Ma
    # Each element's last factorisation, kept for the backward (see _adjoint): the factors, the pivots (LU),
    # the D they were formed with, and whether the element has one.
    N = n + k
    kind = "chol" if k == 0 else "lu"
    store = (kind, torch.empty(B, N, N, dtype=dtype, device=p.device),
             torch.empty(B, N, dtype=torch.int32, device=p.device) if k else None,
             torch.empty(B, 1, m, dtype=dtype, device=p.device), torch.zeros(B, dtype=torch.bool, device=p.device))
    prev = (fac, torch.ones_like(h).unsqueeze(1))  # the factorisation behind the current iterate
    def max_step(v: Tensor, dv: Tensor) -> Tensor:
        """min(1, largest alpha with v + alpha dv >= 0) for v > 0."""
        q = (dv / v).amin(-1, keepdim=True).clamp_(max=-tiny)
        return q.reciprocal_().neg_().clamp_(max=1.0)

    def step_length(v: Tensor, dv: Tensor) -> Tensor:
        """Mehrotra's step length heuristic (as in OOQP): with ``a_max = min(1, largest step to the boundary)``,
        step so that the blocking pair's product is 1% of the mean complementarity at ``a_max``, but at least
        ``0.99 a_max`` (a fixed fraction to the boundary would shrink the duality measure only 100x per iteration
        near the solution)."""
        q, j = (dv / v).min(-1, keepdim=True)
        a_max = q.clamp(max=-tiny).reciprocal_().neg_().clamp_(max=1.0)
        w = torch.addcmul(v, a_max, dv)
        mu_full = torch.bmm(w[..., :m], w[..., m:].mT).mul_(0.01 / m)
        partner = torch.remainder(j + m, 2 * m)  # lam_i <-> s_i
        a = (mu_full / w.gather(-1, partner) - v.gather(-1, j)) / dv.gather(-1, j)
        a = torch.fmin(torch.fmax(a, 0.99 * a_max), a_max)
        return torch.where(q < 0, a, 1.0).mul_(1.0 - 1e-8)

    for it in range(max_iter + 1):
        rd = torch.baddbmm(pa, X[..., :L1], Ma)  # Q z + A^T nu + G^T lam + p
        rp = torch.baddbmm(nhba, X[..., :n], Ma[:, n:].mT)  # [A z - b, G z - h]
        rp[..., k:] += X[..., L1:]  # G z + s - h
        mus = torch.bmm(X[..., L1:], X[..., n + k:L1].mT)  # s^T lam
        # Merit: the KKT residual, with the duality measure weighted so that it must fall 1000x lower (the
        # backward's error vanishes with mu, while the residuals stall at the precision of the linear solves).
        kkt = torch.cat([rd, rp], -1).abs().amax(-1, keepdim=True)
        km = torch.cat([kkt, mus], -1)
        res = torch.maximum(kkt, lim[..., 3:4] * mus).nan_to_num_(nan=inf, posinf=inf)
        since = torch.where((km < 0.5 * best_km).any(-1, keepdim=True), 0, since + 1)
        best_km = torch.minimum(best_km, km)
        better = res <= 2 * best
        best = torch.where(better, res, best)
        best_X = torch.where(better, X, best_X)
        converged = best <= lim[..., 0:1]
        # Stop an element whose residual no longer improves: the reduced KKT system has become too
        # ill-conditioned for further progress at this precision.
        stalled = (since >= 4) & (best <= lim[..., 1:2])
        done = converged | stalled | failed
        if m:
            diverged = torch.maximum(X[..., n + k:L1].amax(-1, keepdim=True),  # lam
                                     X[..., :n].abs().amax(-1, keepdim=True)) > lim[..., 2:3]  # z
            done = done | diverged
        last = it == max_iter
        if last or bool(done.any()):
            fin = done.view(-1).nonzero().view(-1) if not last else torch.arange(idx.numel(), device=p.device)
            code = torch.where(converged, _CONVERGED, torch.where(stalled, _STALLED, _MAX_ITER))
            if m:
                code = torch.where(diverged, _DIVERGED, code)
            code = torch.where(failed, _FAILED, code)
            where = idx[fin]
            X_out.index_copy_(0, where, best_X[fin])
            res_out.index_copy_(0, where, best[fin].view(-1))
            code_out.index_copy_(0, where, code[fin].view(-1))
            iters_out.index_fill_(0, where, it)
            pf, pd = prev
            if pf[0] == kind and pf[1].dtype == dtype:
                store[1].index_copy_(0, where, pf[1][fin])
                if k:
                    store[2].index_copy_(0, where, pf[2][fin])
                store[3].index_copy_(0, where, pd[fin])
                store[4].index_fill_(0, where, True)
            if last or fin.numel() == idx.numel():
                break
            keep = (~done).view(-1).nonzero().view(-1)
            idx = idx[keep]
            buffer = 1 - buffer
            Ma = torch.index_select(Ma, 0, keep, out=ws[4][buffer][:keep.numel()])
            pa, nhba, lim, since, best, best_km, best_X, X, rd, rp, mus, failed = (
                t.index_select(0, keep) for t in (pa, nhba, lim, since, best, best_km, best_X, X, rd, rp, mus, failed))
            low = None  # (single precision data for the whole batch only)
        Ga, Ca_t = Ma[:, n + k:], Ma[:, n:].mT
        re, ri = rp[..., :k], rp[..., k:]
        vs = X[..., n + k:]  # [lam, s]
        lam, s = vs[..., :m], vs[..., m:]
        # Mehrotra predictor-corrector step: one factorisation, two directions, Mehrotra's step length.
        # Near the solution D = lam / s is huge on active constraints and the reduced matrix Q + G^T D G
        # ill-conditioned: there it is factorised with D capped (as in the backward, which reuses the factors) and
        # the directions are refined against the unreduced equations (see _adjoint).
        d = lam / s
        refine = bool((d > lim[..., 5:6].clamp(max=1e6)).any()) if m else True
        dc = torch.minimum(d, lim[..., 5:6]) if refine and m else d
        use_low = low is not None and not refine and bool((mus > lim[..., 4:5]).all())
        if not use_low:
            low = None
        fac = None
        if use_low:
            fac, info = _factor(Ma[:, :n], Ga, Ma[:, n:n + k], d.mT, ws, low)
            if fac[0] != "chol":  # not positive definite in single precision
                fac, low = None, None
        if fac is None:
            fac, info = _factor(Ma[:, :n], Ga, Ma[:, n:n + k], dc.mT, ws)
        prev = (fac, dc)
        c = d.clamp(max=1.0)  # the rows of (G dz - dlam / D) are scaled by c = min(1, D): c / D = min(1, 1 / D)
        e = c / d
        f = dc / c

        def psolve(r1: Tensor, rnu: Tensor, r2: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            """Exact solve of [[Q, A^T, G^T], [A, 0, 0], [c G, 0, -c / D_c]] [dz; dnu; dlam] = [r1; rnu; r2]
            (D capped) by the reduced matrix. Returns [dz, dnu], dlam and [A dz, G dz]."""
            fr2 = f * r2
            sol = _solve(fac, torch.cat([torch.baddbmm(r1, fr2, Ga), rnu], -1) if k else torch.baddbmm(r1, fr2, Ga))
            Cw = torch.bmm(sol[..., :n], Ca_t)
            return sol, torch.addcmul(fr2.neg_(), dc, Cw[..., k:]), Cw

        def direction(rcs: Tensor, refine: bool) -> Tensor:
            """Newton direction [dz, dnu, dlam, ds] for the residuals (rd, re, ri) and complementarity
            right-hand side rc = s * rcs (dlam = rcs + D (G dz + ri), ds = -(G dz + ri)): the equations
            [[Q, A^T, G^T], [A, 0, 0], [c G, 0, -c / D]] [dz; dnu; dlam] = [-rd; -re; -(c / D) rcs - c ri], solved
            with D capped, plus one step of iterative refinement against them if asked (near the solution)."""
            r2 = torch.addcmul(c * ri, e, rcs).neg_()
            sol, dlam, Cw = psolve(rd.neg(), re.neg(), r2)
            if refine:
                R1 = torch.baddbmm(rd, torch.cat([sol, dlam], -1), Ma).neg_()  # -rd - (Q dz + A^T dnu + G^T dlam)
                R2 = torch.addcmul(r2, e, dlam).sub_(c * Cw[..., k:])
                s2, dlam2, Cw2 = psolve(R1, (re + Cw[..., :k]).neg_(), R2)
                sol, dlam, Cw = sol + s2, dlam + dlam2, Cw + Cw2
            return torch.cat([sol, dlam, (ri + Cw[..., k:]).neg_()], -1)

        dX = direction(lam.neg(), refine and not m)  # predictor (affine scaling)
        if m:
            dv = dX[..., n + k:]
            w = torch.addcmul(vs, max_step(vs, dv), dv)
            mu_aff = torch.bmm(w[..., :m], w[..., m:].mT)
            sigma = (mu_aff / mus.clamp_min(tiny)).clamp_(0, 1).pow_(3)
            # Centring target sigma mu, but at least 1e-4 mu (steps that shrink mu faster land on inaccurate
            # directions near the solution) and 0.1 x the duality measure at which the iteration stops.
            target = torch.maximum(sigma.mul_(mus), 1e-4 * mus).mul_(1.0 / m).clamp_min_(mu_floor)
            rcs = torch.addcmul(target, dX[..., L1:], dX[..., n + k:L1], value=-1.0).div_(s).sub_(lam)
            dX = direction(rcs, refine)  # corrector
            alpha = step_length(vs, dX[..., n + k:])
        else:
            alpha = torch.ones_like(mus)
        ok = torch.isfinite(alpha * dX.sum(-1, keepdim=True))
        if fac[0] != "chol":
            ok = ok & (info == 0).view(-1, 1, 1)
        if bool(ok.all()):
            X = torch.addcmul(X, alpha, dX)
        else:
            X = X + torch.where(ok, alpha * dX, 0.0)
            failed = failed | ~ok
    X = X_out
    rp = torch.baddbmm(nhb, X[..., :n], M[:, n:].mT)
    rp[..., k:] += X[..., L1:]
    primal = rp.abs().amax(-1).view(B) if k + m else rp.new_zeros(B)
    converged = code_out <= _STALLED
    X = X.view(B, -1)
    z, nu, lam, s = X[:, :n].clone(), X[:, n:n + k].clone(), X[:, n + k:L1].clone(), X[:, L1:].clone()
    return (z, s, lam, nu, converged, iters_out, res_out, primal, scale, code_out == _FAILED, mags[:, :3], M,
            store)


def _adjoint(M: Tensor, s: Tensor, lam: Tensor, gz: Tensor, glam: Tensor, gnu: Tensor, mags: Tensor,
             stored: Optional[tuple] = None):
    """Solve the adjoint KKT system ``[[Q, -G^T, A^T], [G, 1/D, 0], [A, 0, 0]] [w_z; u; w_nu] = [g_z; g_lam; g_nu]``
    (``D = diag(lam / s)``) in its row-equilibrated unreduced form (second block row scaled by ``c = min(1, d)``).

    It is solved by iterative refinement on that system, preconditioned by the reduced matrix
    ``[[Q + G^T D_c G, A^T], [A, 0]]`` with ``D_c = min(D, cap)`` (:func:`_cap`): eliminating ``u`` with the true
    ``D`` would amplify the errors in ``w_z`` by ``D``, which is huge on active constraints, while the capped matrix
    is well conditioned and differs from the true one only by ``1/cap`` in the (tiny) ``1/D`` block, so that each
    refinement step gains many digits.

    ``stored``: the forward's factorisations (kind, factors, pivots, the capped D they were formed with, and a
    mask of the elements that have one), from :func:`_ipm`. They are used as the preconditioner first (no new
    factorisation); elements whose refinement does not converge with them are solved again with a fresh
    factorisation. Where that does not converge either (a singular or badly conditioned reduced matrix) those
    elements fall back to an LU factorisation of the unreduced matrix.
    ``M`` is the stacked data [Q; A; G] and ``mags`` holds max |Q|, max |G|, max |A| per element. Returns w_z, u,
    w_nu."""
    B, n = gz.shape
    m, k = glam.shape[-1], gnu.shape[-1]
    Q, A, G = M[:, :n], M[:, n:n + k], M[:, n + k:]
    eps = torch.finfo(gz.dtype).eps
    s1, lam1, gz1, glam1, gnu1 = (t.unsqueeze(1) for t in (s, lam, gz, glam, gnu))
    act = lam1 > s1
    d = lam1 / s1
    c = torch.where(act, 1.0, d)  # min(1, d)
    e = torch.where(act, s1 / lam1, 1.0)  # min(1, 1 / d): the scaled (2, 2) block c / d
    mags = mags.view(B, 3, 1)
    qs, gs = mags[:, 0:1], mags[:, 1:2]
    cap = _cap(qs, gs)
    Gt, Ct = G.mT, M[:, n:].mT
    rhs = torch.cat([gz1, gnu1, c * glam1], -1)  # the unknowns are x = [w_z, w_nu, v], v = -u
    bnorm = rhs.abs().amax(-1, keepdim=True)
    mscale = mags.amax(1, keepdim=True).clamp_min(1.0)

    def residual(x: Tensor) -> Tensor:
        Cw = torch.bmm(x[..., :n], Ct)  # [A w_z, G w_z]
        Kx = torch.cat([torch.bmm(x, M), Cw[..., :k], c * Cw[..., k:] - e * x[..., n + k:]], -1)
        return rhs - Kx

    def refine(fac, dd: Tensor, steps: int, loose: bool) -> tuple[Tensor, Tensor]:
        """Iterative refinement preconditioned by the exact solve of the system whose D is ``dd``, with ``fac``
        factorising (approximately) its reduced matrix ``Q + G^T diag(dd) G``: v = f (c G w_z - r_2), f = dd / c.
        Returns the solution and which elements reached a residual below eps^0.75 (eps^0.5 if ``loose``) of the
        data's scale."""
        f = dd / c

        def psolve(r: Tensor) -> Tensor:
            fr2 = f * r[..., n + k:]
            y = torch.baddbmm(r[..., :n], fr2, G)
            sol = _solve(fac, torch.cat([y, r[..., n:n + k]], -1) if k else y)
            return torch.cat([sol, (dd * torch.bmm(sol[..., :n], Gt)).sub_(fr2)], -1)

        x = psolve(rhs)
        for _ in range(steps):
            r = residual(x)
            err = r.abs().amax(-1, keepdim=True)
            ref = bnorm + x.abs().amax(-1, keepdim=True) * mscale
            if bool((err <= eps ** 0.75 * ref).all()):
                return x, torch.ones(B, dtype=torch.bool, device=x.device)
            x = x + psolve(r)
        return x, (err <= (eps ** 0.5 if loose else eps ** 0.75) * ref).view(B)

    if stored is not None and bool(stored[4].any()):
        # The forward's last factorisation of each element, of Q + G^T min(D', cap) G with D' the iterate's D one
        # step before the end. As a preconditioner it is accurate where D' and the final D agree to within what
        # the KKT system cannot see: on inactive constraints (both ~0; the final D is used) and on active ones
        # (both capped). Elements where the refinement does not converge (e.g. a constraint still between the two)
        # are solved again with a fresh factorisation.
        kind, F, piv, dprev, have = stored
        dmix = torch.where((d >= 1) & (dprev >= 1), torch.minimum(dprev, cap), torch.minimum(d, cap))
        x, ok = refine((kind, F, piv) if piv is not None else (kind, F), dmix, 3, False)
        ok = ok & have
        if not bool(ok.all()):
            bad = (~ok).nonzero().view(-1)
            sub = _adjoint(M[bad], s[bad], lam[bad], gz[bad], glam[bad], gnu[bad], mags.view(B, 3)[bad])
            x = x.view(B, -1)
            wz, u, wnu = x[:, :n].clone(), -x[:, n + k:], x[:, n:n + k].clone()
            for out, val in zip((wz, u, wnu), sub):
                out[bad] = val
            return wz, u, wnu
        x = x.view(B, -1)
        return x[:, :n], -x[:, n + k:], x[:, n:n + k]
    dc = torch.minimum(d, cap)
    fac, info = _factor(Q, G, A, dc.mT, _workspace(B, m, n, 0, gz))
    x = None
    if fac[0] == "chol" or not bool(info.any()):
        x, ok = refine(fac, dc, 4, True)
        if not bool(ok.all()):
            x = None
    if x is None:
        rhs_lu = torch.cat([gz, c.view(B, m) * glam, gnu], -1).unsqueeze(-1)
        lu, piv, _ = torch.linalg.lu_factor_ex(_augmented_kkt(Q, G, A, d.view(B, m)))
        sol = torch.linalg.lu_solve(lu, piv, rhs_lu).squeeze(-1)
        return sol[:, :n], sol[:, n:n + m], sol[:, n + m:]
    x = x.view(B, -1)
    return x[:, :n], -x[:, n + k:], x[:, n:n + k]


class _QPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, Q, p, G, h, A, b, opts):
        tol, max_iter, on_failure, diag, Qs = opts  # Qs: the symmetric part of Q
        with torch.no_grad():
            (z, s, lam, nu, conv, iters, res, primal, scale, bad, mags, M,
             store) = _ipm(Qs, p, G, h, A, b, tol, max_iter)
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
            # Weakly active: slack and multiplier both vanish (to within tol^0.6 of the data's scale).
            tau = tol ** 0.6 * scale[:, None]
            weak = (s <= tau) & (lam <= tau) & conv[:, None]
            if diag is not None:
                diag.residual = res
                diag.constraint_violation = primal
                diag.active = lam > s if m else torch.zeros_like(s, dtype=torch.bool)
                diag.converged = conv
                diag.iterations = iters
                diag.nonregular = weak.any(-1)
        ctx.weak = weak.any(-1)
        ctx.kind = store[0]
        ctx.save_for_backward(z, lam, nu, s, M, mags, *store[1:])
        ctx.mark_non_differentiable(s)
        return z, lam, nu, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gz, glam, gnu, _gs):
        z, lam, nu, s, M, mags, *store = ctx.saved_tensors
        if bool(ctx.weak.any()):
            warnings.warn(
                f"qp: weakly active constraints (zero slack and zero multiplier) at batch elements "
                f"{element_list(ctx.weak)}: the solution is not differentiable there; the gradient returned is "
                "that of the interior point method's central path at the final barrier parameter", NonRegularWarning,
                stacklevel=2)
        gz = torch.zeros_like(z) if gz is None else gz
        glam = torch.zeros_like(lam) if glam is None else glam
        gnu = torch.zeros_like(nu) if gnu is None else gnu
        wz, u, wnu = _adjoint(M, s, lam, gz, glam, gnu, mags, (ctx.kind, *store))
        need = ctx.needs_input_grad
        # dQ = -sym(w_z z^T), dG = -lam w_z^T + u z^T, dA = -nu w_z^T - w_nu z^T.
        zr, wr = z.unsqueeze(-2), wz.unsqueeze(-2)
        dQ = torch.addcmul(wz.unsqueeze(-1) * zr, z.unsqueeze(-1), wr).mul_(-0.5) if need[0] else None
        dG = torch.addcmul(u.unsqueeze(-1) * zr, lam.unsqueeze(-1), wr, value=-1.0) if need[2] else None
        dA = torch.addcmul(wnu.unsqueeze(-1) * zr, nu.unsqueeze(-1), wr).neg_() if need[4] else None
        return dQ, -wz, dG, -u, dA, wnu, None


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

    Forward: batched primal-dual interior point method (Mehrotra predictor-corrector with Mehrotra's step length
    heuristic), each iteration one factorisation of the reduced KKT matrix ``[[Q + G^T D G, A^T], [A, 0]]``,
    ``D = diag(lam / s)`` capped near the solution (Cholesky without equality constraints, else LU), and two to
    four solves; elements leave the batch once converged. Cost ``O(B (n + k)^3)`` per iteration, typically 8-15 iterations.

    Backward: the OptNet adjoint. With ``[[Q + G^T D G, A^T], [A, 0]] [w_z; w_nu] = [g_z + G^T D g_lam; g_nu]``
    and ``u = D (g_lam - G w_z)`` (solved in the unreduced form of this system by iterative refinement,
    preconditioned with the forward's last factorisation of the reduced matrix, ``D`` capped; elements for which
    that does not converge are factorised again):
    ``dQ = -sym(w_z z^T)``, ``dp = -w_z``, ``dG = -lam w_z^T + u z^T``, ``dh = -u``,
    ``dA = -nu w_z^T - w_nu z^T``, ``db = w_nu``. As the barrier parameter vanishes this is the exact active-set
    gradient. Weakly active constraints (zero slack and zero multiplier) make the solution non-differentiable;
    a :class:`~torchddn.diagnostics.NonRegularWarning` names those elements.

    Raises:
        DDNError: on bad shapes, NaN/Inf inputs, or a ``Q`` that is not symmetric PSD; on unbounded problems.
        InfeasibleError: naming the batch elements whose constraints cannot be satisfied.
    """
    Qb, Qsb, pb, Gb, hb, Ab, bb, batched = _prepare(Q, p, G, h, A, b, check)
    if tol is None:
        tol = _default_tol(Qb.dtype)
    z, lam, nu, _ = _QPFunction.apply(Qb, pb, Gb, hb, Ab, bb, (tol, max_iter, on_failure, diagnostics, Qsb))
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


make_callable(__name__)  # torchddn.nodes.qp is this module and calls qp(...) (see nodes/_callable.py)
