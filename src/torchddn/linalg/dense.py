"""Direct batched solves: dense symmetric (Cholesky / eigendecomposition), dense general (LU / SVD), diagonal and
tridiagonal (Gaussian elimination with partial pivoting). Every one returns the minimum-norm solution at singular
elements (flagged ``nonregular``), never NaN."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from torchddn.linalg._common import LinearSolveInfo, _flags, _rcond, _relres

__all__ = ["pinv_solve_symmetric", "dense_solve", "dense_solve_general", "diagonal_solve", "tridiagonal_solve",
           "tridiagonal_matvec"]


def pinv_solve_symmetric(A: Tensor, b: Tensor, rcond: Optional[float] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Minimum-norm solution of symmetric systems ``A x = b`` by eigendecomposition.

    Eigenvalues with ``|lambda| <= rcond * max|lambda|`` are treated as zero. ``A`` is ``(*batch, n, n)``, ``b``
    ``(*batch, n)``. Cost ``O(n^3)`` per element.

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
    """Solve dense batched symmetric systems ``A x = b``, ``A`` ``(*batch, n, n)``, ``b`` ``(*batch, n)``.

    PSD-tagged matrices try Cholesky first; elements whose factorisation fails or is numerically singular (pivot
    ratio below ``n * eps * 100``) fall back to the eigendecomposition pseudo-inverse, as do all elements of
    indefinite (e.g. KKT) matrices. Cost ``O(n^3)`` per element.
    """
    n = A.shape[-1]
    batch = A.shape[:-2]
    zeros = torch.zeros(batch, dtype=torch.long, device=A.device)
    true = ~_flags(batch, A.device)
    if psd:
        L, info = torch.linalg.cholesky_ex(A)
        diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
        dmax = diag.amax(-1).clamp_min(torch.finfo(A.dtype).tiny)
        ok = (info == 0) & ((diag.amin(-1) / dmax) ** 2 > _rcond(n, A.dtype))
        if bool(ok.all()):
            x = torch.cholesky_solve(b.unsqueeze(-1), L).squeeze(-1)
            false = _flags(batch, A.device)
            return x, LinearSolveInfo(_relres(A, x, b), zeros, false, false, "dense", true)
        Lsafe = torch.where(ok[..., None, None], L, torch.eye(n, dtype=A.dtype, device=A.device))
        x_chol = torch.cholesky_solve(b.unsqueeze(-1), Lsafe).squeeze(-1)
        x_pinv, singular, negative = pinv_solve_symmetric(A, b)
        x = torch.where(ok[..., None], x_chol, x_pinv)
        nonreg = ~ok & (singular | negative)
        indefinite = ~ok & negative
        return x, LinearSolveInfo(_relres(A, x, b), zeros, nonreg, indefinite, "dense", true)
    x, singular, _ = pinv_solve_symmetric(A, b)
    false = _flags(batch, A.device)
    return x, LinearSolveInfo(_relres(A, x, b), zeros, singular, false, "dense", true)


def dense_solve_general(A: Tensor, rhs: Tensor, *, rcond: Optional[float] = None) -> tuple[Tensor, LinearSolveInfo]:
    r"""Solve dense batched non-symmetric systems ``A x = rhs``, ``A`` of shape ``(*batch, n, n)``, ``rhs``
    ``(*batch, n)``.

    Elements with ``sigma_min / sigma_max <= rcond`` (default ``100 n eps``) are singular: they get the
    minimum-norm least-squares solution ``pinv(A) rhs`` and are flagged ``nonregular``; the others are solved by
    LU. Cost ``O(n^3)`` per element (singular values plus LU).
    """
    n = A.shape[-1]
    batch = A.shape[:-2]
    rcond = _rcond(n, A.dtype) if rcond is None else float(rcond)
    sv = torch.linalg.svdvals(A)
    smax = sv[..., 0]
    singular = ~(sv[..., -1] > rcond * smax) | ~torch.isfinite(sv).all(dim=-1)
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    A_safe = torch.where(singular[..., None, None], eye.expand_as(A), A)
    x, _ = torch.linalg.solve_ex(A_safe, rhs)
    if bool(singular.any()):
        A_fin = torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0)
        xp = (torch.linalg.pinv(A_fin, rtol=rcond) @ rhs.unsqueeze(-1)).squeeze(-1)
        x = torch.where(singular[..., None], xp, x)
    zeros = torch.zeros(batch, dtype=torch.long, device=A.device)
    return x, LinearSolveInfo(_relres(A, x, rhs), zeros, singular, torch.zeros_like(singular), "dense",
                              torch.ones_like(singular))


def diagonal_solve(d: Tensor, b: Tensor, *, rcond: Optional[float] = None) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``diag(d) x = b`` for ``d`` broadcastable to ``b`` ``(*batch, n)``: ``x_i = b_i / d_i``, and
    ``x_i = 0`` where ``|d_i| <= rcond max_j |d_j|`` (the pseudo-inverse; the element is flagged ``nonregular``).
    Cost ``O(n)`` per element."""
    n = b.shape[-1]
    d, b = torch.broadcast_tensors(d.to(b.dtype), b)
    rcond = _rcond(n, b.dtype) if rcond is None else float(rcond)
    ad = d.abs()
    keep = ad > rcond * ad.amax(-1, keepdim=True)
    x = torch.where(keep, b / torch.where(keep, d, torch.ones_like(d)), torch.zeros_like(b))
    singular = (~keep).any(-1)
    r = (d * x - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)
    zeros = torch.zeros(singular.shape, dtype=torch.long, device=b.device)
    return x, LinearSolveInfo(r, zeros, singular, torch.zeros_like(singular), "diagonal",
                              torch.ones_like(singular))


def tridiagonal_matvec(lower: Tensor, diag: Tensor, upper: Tensor, z: Tensor) -> Tensor:
    """``A z`` for the tridiagonal ``A`` with ``A[i+1, i] = lower[i]``, ``A[i, i] = diag[i]``,
    ``A[i, i+1] = upper[i]``; ``lower``/``upper`` ``(*batch, n-1)``, ``diag`` and ``z`` ``(*batch, n)``.
    Cost ``O(n)``."""
    return (diag * z + F.pad(upper * z[..., 1:], (0, 1)) + F.pad(lower * z[..., :-1], (1, 0)))


def tridiagonal_dense(lower: Tensor, diag: Tensor, upper: Tensor) -> Tensor:
    """The dense ``(*batch, n, n)`` tridiagonal matrix."""
    return torch.diag_embed(diag) + torch.diag_embed(lower, -1) + torch.diag_embed(upper, 1)


def tridiagonal_solve(lower: Tensor, diag: Tensor, upper: Tensor, b: Tensor, *, rcond: Optional[float] = None
                      ) -> tuple[Tensor, LinearSolveInfo]:
    r"""Batched tridiagonal solve ``A x = b`` by Gaussian elimination with partial (row) pivoting, as LAPACK's
    ``gtsv``: at step ``i`` rows ``i`` and ``i+1`` are swapped where ``|A[i+1, i]| > |A[i, i]|``, which fills one
    second super-diagonal. So ``[[1e-20, 1], [1, 1]] x = [1, 2]`` gives ``[1, 1]`` to rounding.

    Args:
        lower: ``(*batch, n-1)`` sub-diagonal ``A[i+1, i]``; diag: ``(*batch, n)``; upper: ``(*batch, n-1)``
            super-diagonal ``A[i, i+1]`` (all broadcastable against ``b``).
        b: ``(*batch, n)``.
        rcond: an element whose smallest pivot is ``<= rcond max|A|`` (default ``100 n eps``) is singular: it gets
            the minimum-norm least-squares solution from the dense pseudo-inverse (of those elements only) and
            is flagged ``nonregular``.

    Cost: ``O(n)`` per element, as ``n`` steps each vectorised over the batch (plus ``O(n^3)`` for each singular
    element).
    """
    n = b.shape[-1]
    dtype = b.dtype
    rcond = _rcond(n, dtype) if rcond is None else float(rcond)
    batch = torch.broadcast_shapes(lower.shape[:-1], diag.shape[:-1], upper.shape[:-1], b.shape[:-1])
    L = lower.to(dtype).expand(*batch, n - 1)
    D = diag.to(dtype).expand(*batch, n)
    U = upper.to(dtype).expand(*batch, n - 1)
    B = b.expand(*batch, n)
    scale = torch.cat([L.abs(), D.abs(), U.abs()], -1).amax(-1)
    d, dl, du, r = list(D.unbind(-1)), list(L.unbind(-1)), list(U.unbind(-1)), list(B.unbind(-1))
    zero = torch.zeros(batch, dtype=dtype, device=b.device)
    du2 = [zero] * max(n - 2, 0)
    for i in range(n - 1):
        swap = dl[i].abs() > d[i].abs()
        nz = d[i] != 0
        f_keep = torch.where(nz, dl[i] / torch.where(nz, d[i], torch.ones_like(d[i])), zero)
        f_swap = d[i] / torch.where(swap, dl[i], torch.ones_like(dl[i]))
        d_next = torch.where(swap, du[i] - f_swap * d[i + 1], d[i + 1] - f_keep * du[i])
        r_i = torch.where(swap, r[i + 1], r[i])
        r_next = torch.where(swap, r[i] - f_swap * r[i + 1], r[i + 1] - f_keep * r[i])
        d_i = torch.where(swap, dl[i], d[i])
        du_i = torch.where(swap, d[i + 1], du[i])
        if i < n - 2:
            du2[i] = torch.where(swap, du[i + 1], zero)
            du[i + 1] = torch.where(swap, -f_swap * du[i + 1], du[i + 1])
        d[i], d[i + 1], du[i], r[i], r[i + 1] = d_i, d_next, du_i, r_i, r_next
    piv = torch.stack(d, -1).abs()
    singular = ~(piv.amin(-1) > rcond * scale) | ~torch.isfinite(piv).all(-1)
    safe = [torch.where(singular, torch.ones_like(di), di) for di in d]
    x: list = [zero] * n
    for i in range(n - 1, -1, -1):
        acc = r[i]
        if i + 1 < n:
            acc = acc - du[i] * x[i + 1]
        if i + 2 < n:
            acc = acc - du2[i] * x[i + 2]
        x[i] = acc / safe[i]
    xs = torch.stack(x, -1)
    xs = torch.where(singular[..., None], torch.zeros_like(xs), xs)
    if bool(singular.any()):
        A = tridiagonal_dense(L[singular], D[singular], U[singular])
        A = torch.nan_to_num(A, nan=0.0, posinf=0.0, neginf=0.0)
        xp = (torch.linalg.pinv(A, rtol=rcond) @ B[singular].unsqueeze(-1)).squeeze(-1)
        xs = xs.index_put((singular,), xp)
    res = (tridiagonal_matvec(L, D, U, xs) - B).norm(dim=-1) / B.norm(dim=-1).clamp_min(torch.finfo(dtype).tiny)
    zeros = torch.zeros(batch, dtype=torch.long, device=b.device)
    return xs, LinearSolveInfo(res, zeros, singular, torch.zeros_like(singular), "tridiagonal",
                               torch.ones_like(singular))
