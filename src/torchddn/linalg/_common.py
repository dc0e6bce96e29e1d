"""Shared pieces of :mod:`torchddn.linalg`: the solve report, tolerances and small batched helpers."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass
class LinearSolveInfo:
    """Per-element outcome of a batched solve ``A x = b`` with ``b`` of shape ``(*batch, n)``.

    Attributes:
        residual: ``(*batch,)`` true relative residual ``||A x - b|| / ||b||`` (0 where ``b = 0``).
        iterations: ``(*batch,)`` operator products spent on the element (0 for direct methods).
        nonregular: ``(*batch,)`` bool, the matrix is (numerically) singular at the element and the minimum-norm
            (pseudo-inverse / least-squares) solution was returned; for PSD-tagged dense solves also an indefinite
            matrix.
        indefinite: ``(*batch,)`` bool, a PSD-tagged operator showed negative curvature (CG) or eigenvalues.
        method: the method(s) used, e.g. ``"dense"``, ``"cg"``, ``"cg+minres"``, ``"gmres+lstsq"``.
        converged: ``(*batch,)`` bool, the element met its stopping test (relative residual within ``10 tol``
            for iterative methods, or the least-squares test where ``nonregular``); ``None`` when unknown.
    """

    residual: Tensor
    iterations: Tensor
    nonregular: Tensor
    indefinite: Tensor
    method: str
    converged: Optional[Tensor] = None


def default_tol(dtype: torch.dtype) -> float:
    """Relative residual tolerance used by the iterative solvers for a dtype (``1e-11`` float64, ``1e-6``
    otherwise)."""
    return 1e-11 if dtype == torch.float64 else 1e-6


def _rcond(n: int, dtype: torch.dtype) -> float:
    return max(n, 1) * torch.finfo(dtype).eps * 100


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum(-1)


def _relres_mv(matvec: MatVec, x: Tensor, b: Tensor) -> Tensor:
    """True relative residual ``||A x - b|| / ||b||`` (one product; 0 where ``b = 0`` and ``A x = 0``)."""
    r = (matvec(x) - b).norm(dim=-1)
    bn = b.norm(dim=-1)
    res = r / bn.clamp_min(torch.finfo(b.dtype).tiny)
    res = torch.where((bn == 0) & (r == 0), torch.zeros_like(res), res)
    return torch.nan_to_num(res, nan=float("inf"))


def _relres(A: Tensor, x: Tensor, b: Tensor) -> Tensor:
    return _relres_mv(lambda z: (A @ z.unsqueeze(-1)).squeeze(-1), x, b)


def _flags(shape: torch.Size, device: torch.device) -> Tensor:
    return torch.zeros(shape, dtype=torch.bool, device=device)


def _merge(mask: Tensor, x: Tensor, info: LinearSolveInfo, x2: Tensor, info2: LinearSolveInfo, method: str
           ) -> tuple[Tensor, LinearSolveInfo]:
    """Take ``x2``/``info2`` where ``mask`` holds; iteration counts add up, ``indefinite`` flags are kept."""
    x = torch.where(mask[..., None], x2, x)
    conv = None
    if info.converged is not None and info2.converged is not None:
        conv = torch.where(mask, info2.converged, info.converged)
    return x, LinearSolveInfo(torch.where(mask, info2.residual, info.residual),
                              info.iterations + torch.where(mask, info2.iterations,
                                                            torch.zeros_like(info2.iterations)),
                              torch.where(mask, info2.nonregular, info.nonregular),
                              info.indefinite | (mask & info2.indefinite), method, conv)
