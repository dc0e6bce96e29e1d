"""Batched linear solvers for implicit differentiation.

Every solver works on a batch of independent systems: vectors have shape ``(*batch, n)`` and the operator acts on
each row independently. Operators are tagged (in the spirit of Lineax) so that the right method is chosen:

* :class:`LinearOperator` ``(matvec, n, symmetric, psd)``; ``materialize()`` builds the dense ``(*batch, n, n)``
  matrix by ``n`` vmapped products when a dense method is wanted.
* :func:`solve` picks ``"dense"`` (Cholesky for PSD, eigendecomposition pseudo-inverse otherwise), ``"cg"``
  (symmetric positive definite, matrix-free) or ``"minres"`` (symmetric indefinite, matrix-free).

Each solve returns a :class:`LinearSolveInfo` with per-element residuals, iteration counts and a ``nonregular``
flag marking elements where the matrix is singular or (for PSD-tagged operators) indefinite; for those the
minimum-norm (pseudo-inverse) solution is returned, never NaN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import vmap

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LinearOperator:
    """A batched square linear operator ``z -> A z`` acting on the last dimension of ``(*batch, n)`` tensors.

    Args:
        matvec: the product; it must accept extra leading dimensions (it is vmapped for multiple right-hand sides).
        n: size of each system.
        symmetric: ``A = A^T`` for every element.
        psd: ``A`` is positive (semi-)definite for every element (enables Cholesky and CG).
    """

    matvec: MatVec
    n: int
    symmetric: bool = True
    psd: bool = False

    def materialize(self, like: Tensor) -> Tensor:
        """Dense ``(*batch, n, n)`` matrix built from ``n`` vmapped products with the unit vectors."""
        eye = torch.eye(self.n, dtype=like.dtype, device=like.device)
        shape = like.shape
        cols = vmap(lambda e: self.matvec(e.expand(shape)))(eye)  # (n, *batch, n): cols[j] = A e_j
        return cols.movedim(0, -1)


@dataclass
class LinearSolveInfo:
    """Per-element outcome of a batched solve: relative residual, iterations, and non-regular flags."""

    residual: Tensor
    iterations: Tensor
    nonregular: Tensor
    indefinite: Tensor
    method: str


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance used by the iterative solvers for a dtype."""
    return 1e-11 if dtype == torch.float64 else 1e-6


def _rcond(n: int, dtype: torch.dtype) -> float:
    return max(n, 1) * torch.finfo(dtype).eps * 100


def pinv_solve_symmetric(A: Tensor, b: Tensor, rcond: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Minimum-norm solution of symmetric systems ``A x = b`` by eigendecomposition.

    Eigenvalues with ``|lambda| <= rcond * max|lambda|`` are treated as zero.

    Returns:
        ``(x, singular, negative)``: the solution ``(*batch, n)``, and per-element flags for a (numerically)
        singular matrix and for a matrix with negative eigenvalues beyond the cutoff.
    """
    n = A.shape[-1]
    rcond = _rcond(n, A.dtype) if rcond is None else rcond
    A = 0.5 * (A + A.transpose(-1, -2))
    evals, evecs = torch.linalg.eigh(A)
    scale = evals.abs().amax(-1, keepdim=True)
    cutoff = rcond * scale
    keep = evals.abs() > cutoff
    inv = torch.where(keep, 1.0 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    coeff = (evecs.transpose(-1, -2) @ b.unsqueeze(-1)).squeeze(-1) * inv
    x = (evecs @ coeff.unsqueeze(-1)).squeeze(-1)
    singular = (~keep).any(-1) | (scale.squeeze(-1) == 0)
    negative = (evals < -cutoff).any(-1)
    return x, singular, negative


def dense_solve(A: Tensor, b: Tensor, psd: bool) -> tuple[Tensor, LinearSolveInfo]:
    """Solve dense batched symmetric systems.

    PSD-tagged matrices try Cholesky first; elements whose factorisation fails or is numerically singular (pivot
    ratio below ``n * eps * 100``) fall back to the eigendecomposition pseudo-inverse, as do all elements of
    indefinite (e.g. KKT) matrices. Cost ``O(n^3)`` per element.
    """
    n = A.shape[-1]
    batch = A.shape[:-2]
    zeros = torch.zeros(batch, dtype=torch.long, device=A.device)
    if psd:
        L, info = torch.linalg.cholesky_ex(A)
        diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
        dmax = diag.amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
        ok = (info == 0) & ((diag.amin(-1) / dmax) ** 2 > _rcond(n, A.dtype))
        if bool(ok.all()):
            x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
            false = torch.zeros(batch, dtype=torch.bool, device=A.device)
            res = _relres(A, x, b)
            return x, LinearSolveInfo(res, zeros, false, false, "dense")
        Lsafe = torch.where(ok[..., None, None], L, torch.eye(n, dtype=A.dtype, device=A.device))
        x_chol = torch.cholesky_solve(b.unsqueeze(-1), Lsafe).squeeze(-1)
        x_pinv, singular, negative = pinv_solve_symmetric(A, b)
        x = torch.where(ok[..., None], x_chol, x_pinv)
        nonreg = ~ok & (singular | negative)
        indefinite = ~ok & negative
        return x, LinearSolveInfo(_relres(A, x, b), zeros, nonreg, indefinite, "dense")
    x, singular, _ = pinv_solve_symmetric(A, b)
    false = torch.zeros(batch, dtype=torch.bool, device=A.device)
    return x, LinearSolveInfo(_relres(A, x, b), zeros, singular, false, "dense")


def _relres(A: Tensor, x: Tensor, b: Tensor) -> Tensor:
    r = (A @ x.unsqueeze(-1)).squeeze(-1) - b
    return r.norm(dim=-1) / b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)


def cg(matvec: MatVec, b: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None
       ) -> tuple[Tensor, LinearSolveInfo]:
    """Batched conjugate gradients for symmetric positive definite systems, matrix-free.

    Each element stops when ``||r|| <= tol * ||b||`` and is frozen from then on. Elements that meet negative
    curvature (flagged ``indefinite``) or zero curvature (flagged ``nonregular``) stop; :func:`solve` falls back to
    :func:`minres` for them.
    Cost: one ``matvec`` per iteration for the whole batch.
    """
    tol = default_tol(b.dtype) if tol is None else tol
    n = b.shape[-1]
    max_iter = 10 * n + 50 if max_iter is None else max_iter
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r)
    bnorm = rs.sqrt()
    target = (tol * bnorm) ** 2
    done = rs <= target
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
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), torch.zeros_like(rs))
        x = x + alpha[..., None] * p
        r = r - alpha[..., None] * Ap
        rs_new = _dot(r, r)
        iters = iters + active.long()
        beta = torch.where(active, rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = torch.where(active[..., None], r + beta[..., None] * p, p)
        rs = torch.where(active, rs_new, rs)
        done = done | (rs <= target)
    res = rs.sqrt() / bnorm.clamp_min(tiny)
    res = torch.where(bnorm == 0, torch.zeros_like(res), res)
    return x, LinearSolveInfo(res, iters, bad & ~negative, negative, "cg")


def minres(matvec: MatVec, b: Tensor, tol: Optional[float] = None, max_iter: Optional[int] = None
           ) -> tuple[Tensor, LinearSolveInfo]:
    """Batched MINRES (Paige & Saunders) for symmetric, possibly indefinite or singular systems, matrix-free.

    From ``x0 = 0`` the iterates stay in the Krylov space of ``A``, so for a singular consistent system MINRES
    returns the minimum-norm solution. Each element stops when its residual estimate ``<= tol * ||b||``.
    Cost: one ``matvec`` per iteration for the whole batch.
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
    y = b.clone()
    beta1 = b.norm(dim=-1)
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
    r = matvec(x) - b
    res = r.norm(dim=-1) / beta1.clamp_min(tiny)
    res = torch.where(beta1 <= tiny, torch.zeros_like(res), res)
    false = torch.zeros(batch, dtype=torch.bool, device=b.device)
    return x, LinearSolveInfo(res, iters, false, false, "minres")


def solve(op: LinearOperator, b: Tensor, method: str = "auto", tol: Optional[float] = None,
          max_iter: Optional[int] = None, dense_max: int = 128) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``A x = b`` for a batched symmetric :class:`LinearOperator`.

    Args:
        op: the operator (tags choose the method for ``"auto"``).
        b: right-hand sides ``(*batch, n)``.
        method: ``"auto"`` (dense if ``n <= dense_max``, else CG for PSD operators and MINRES otherwise),
            ``"dense"``, ``"cg"`` or ``"minres"``. CG elements that meet negative curvature are re-solved with MINRES
            and flagged ``indefinite``.
        tol, max_iter: for the iterative methods.

    Returns:
        ``(x, info)``.
    """
    if not op.symmetric:
        raise ValueError("only symmetric operators are supported by torchddn.linalg.solve")
    if method == "auto":
        method = "dense" if op.n <= dense_max else ("cg" if op.psd else "minres")
    if method == "dense":
        return dense_solve(op.materialize(b), b, op.psd)
    if method not in ("cg", "minres"):
        raise ValueError(f"unknown linear solve method {method!r}; use 'auto', 'dense', 'cg' or 'minres'")
    tol_ = default_tol(b.dtype) if tol is None else tol
    if method == "cg":
        x, info = cg(op.matvec, b, tol, max_iter)
        failed = info.indefinite | info.nonregular | (info.residual > 10 * tol_)
        if bool(failed.any()):
            x2, info2 = minres(op.matvec, b, tol, max_iter)
            x, info = _merge(failed, x, info, x2, info2, "cg+minres")
    else:
        x, info = minres(op.matvec, b, tol, max_iter)
    inconsistent = info.residual > 10 * tol_
    if bool(inconsistent.any()):
        # singular and inconsistent: MINRES on the normal equations A^2 x = A b stays in range(A), so it
        # returns the minimum-norm least-squares solution
        x3, info3 = minres(lambda z: op.matvec(op.matvec(z)), op.matvec(b), tol, max_iter)
        res3 = (op.matvec(x3) - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
        # where the normal equations are solved, the system is singular and inconsistent (non-regular); where
        # they are not, the iteration limit was hit: keep whichever answer has the smaller residual
        singular = inconsistent & (info3.residual <= 10 * tol_)
        take = singular | (inconsistent & (res3 < info.residual))
        info3 = LinearSolveInfo(res3, info3.iterations, singular, info.indefinite, info3.method)
        x, info = _merge(take, x, info, x3, info3, info.method + "+lstsq")
    return x, info


def _merge(mask: Tensor, x: Tensor, info: LinearSolveInfo, x2: Tensor, info2: LinearSolveInfo, method: str
           ) -> tuple[Tensor, LinearSolveInfo]:
    """Take ``x2``/``info2`` where ``mask`` holds; iteration counts add up."""
    x = torch.where(mask[..., None], x2, x)
    return x, LinearSolveInfo(torch.where(mask, info2.residual, info.residual),
                              info.iterations + torch.where(mask, info2.iterations, torch.zeros_like(info2.iterations)),
                              torch.where(mask, info2.nonregular, info.nonregular), info.indefinite, method)
