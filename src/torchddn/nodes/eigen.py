r"""Eigenvectors of symmetric matrices as a declarative node, with a backward that is safe at repeated eigenvalues.

The eigenvectors of a real symmetric :math:`X` solve :math:`\min_{v} -v^\top X v` s.t. :math:`v^\top v = 1` (the
top one) and, more generally, :math:`X V = V\Lambda`, :math:`V^\top V = I`. The backward is the classic one,

.. math::
    \bar X = V\big(F\odot(V^\top\bar V) + \operatorname{diag}(\bar\lambda)\big)V^\top, \qquad
    F_{ij} = \frac{1}{\lambda_j - \lambda_i}\ (i \ne j),\ F_{ii} = 0,

symmetrised (the input is read as :math:`(X + X^\top)/2`). Where :math:`|\lambda_j - \lambda_i|` is below a
tolerance, :math:`F_{ij}` is set to 0. Inside a degenerate eigenspace a single eigenvector is not a differentiable
function of :math:`X` (any rotation of the eigenspace is a valid output), so its gradient does not exist; losses that
are invariant to sign flips and to rotations within each degenerate eigenspace (projectors :math:`VV^\top`,
:math:`\sum_j (v_j^\top a)^2`, ...) have :math:`V_S^\top\bar V_S` symmetric on each degenerate block ``S`` and the
masked formula is then exact. When the antisymmetric part of a masked block is not negligible, the loss depends on
the arbitrary basis and a :class:`NonRegularWarning` names the batch elements (the returned gradient is the one
that ignores rotations within the eigenspace, never NaN).
"""
from __future__ import annotations

import warnings
from typing import Optional, Union

import torch
from torch import Tensor, nn

from torchddn.diagnostics import DDNError, NonRegularWarning, element_list

__all__ = ["eigenvectors", "Eigenvectors"]


class _EighFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, gap_tol):
        Xs = 0.5 * (X + X.transpose(-1, -2))
        lam, V = torch.linalg.eigh(Xs)
        ctx.save_for_backward(lam, V)
        ctx.gap_tol = gap_tol
        return lam, V

    @staticmethod
    def backward(ctx, glam, gV):
        lam, V = ctx.saved_tensors
        n = lam.shape[-1]
        scale = lam.abs().amax(-1, keepdim=True).clamp_min(1.0)
        tol = ctx.gap_tol * scale[..., None]
        gap = lam[..., None, :] - lam[..., :, None]  # gap[i, j] = lam_j - lam_i
        eye = torch.eye(n, dtype=torch.bool, device=lam.device)
        masked = (gap.abs() <= tol) & ~eye
        F = torch.where(masked | eye, torch.zeros_like(gap), 1.0 / torch.where(masked | eye, torch.ones_like(gap), gap))
        inner = torch.zeros_like(gap)
        if gV is not None:
            vtg = V.transpose(-1, -2) @ gV
            inner = F * vtg
            if bool(masked.any()):
                anti = torch.where(masked, vtg - vtg.transpose(-1, -2), torch.zeros_like(vtg))
                ref = vtg.abs().flatten(-2).amax(-1).clamp_min(torch.finfo(vtg.dtype).tiny)
                nonreg = anti.abs().flatten(-2).amax(-1) > 10 * torch.finfo(vtg.dtype).eps ** 0.5 * ref
                if bool(nonreg.any()):
                    warnings.warn("eigenvectors: repeated eigenvalues and a loss that depends on the basis chosen "
                                  "inside the degenerate eigenspace (its gradient does not exist) at batch elements "
                                  f"{element_list(nonreg)}; returning the gradient that ignores rotations within "
                                  "the eigenspace", NonRegularWarning, stacklevel=2)
        if glam is not None:
            inner = inner + torch.diag_embed(glam)
        gX = V @ inner @ V.transpose(-1, -2)
        return 0.5 * (gX + gX.transpose(-1, -2)), None


def eigenvectors(X: Tensor, top_k: Optional[int] = None, return_eigenvalues: bool = False,
                 gap_tol: Optional[float] = None) -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Eigenvectors of the symmetric matrices ``X`` (columns, ascending eigenvalue) with a safe exact backward.

    Args:
        X: (b, n, n) or (n, n) symmetric matrices; read as :math:`(X + X^\top)/2`.
        top_k: return only the eigenvectors of the ``top_k`` largest eigenvalues (the last ``top_k`` columns).
        return_eigenvalues: also return the matching eigenvalues (ascending).
        gap_tol: relative eigenvalue gap below which two eigenvalues are treated as equal in the backward
            (scaled by ``max(1, max|lambda|)``); default ``1e3 * eps`` of the dtype.

    Returns:
        V: (b, n, k) eigenvectors as columns (k = n or ``top_k``); with ``return_eigenvalues`` also
        ``lam``: (b, k).

    Gradient: :math:`\bar X = \operatorname{sym}\big(V(F\odot V^\top\bar V + \operatorname{diag}\bar\lambda)
    V^\top\big)` with :math:`F_{ij} = 1/(\lambda_j - \lambda_i)`, masked to 0 for near-equal eigenvalues (see the
    module docstring: exact for sign/subspace-invariant losses, :class:`NonRegularWarning` otherwise).
    Eigenvector signs are those of ``torch.linalg.eigh``.

    Cost: :math:`O(b\,n^3)` forward (``eigh``) and backward (matrix products).
    """
    if not torch.is_tensor(X) or not X.is_floating_point():
        raise DDNError("X must be a floating-point tensor")
    squeeze = X.dim() == 2
    Xb = X[None] if squeeze else X
    if Xb.dim() != 3 or Xb.shape[-1] != Xb.shape[-2]:
        raise DDNError(f"X must have shape (b, n, n) or (n, n), got {tuple(X.shape)}")
    n = Xb.shape[-1]
    fin = torch.isfinite(Xb.detach()).flatten(1).all(1)
    if not bool(fin.all()):
        raise DDNError(f"X contains NaN or Inf at batch elements {element_list(~fin)}")
    if top_k is not None and not (1 <= int(top_k) <= n):
        raise DDNError(f"top_k must be in [1, {n}], got {top_k}")
    gap_tol = 1e3 * torch.finfo(X.dtype).eps if gap_tol is None else float(gap_tol)
    lam, V = _EighFn.apply(Xb, gap_tol)
    if top_k is not None:
        lam, V = lam[:, n - top_k:], V[:, :, n - top_k:]
    if squeeze:
        lam, V = lam[0], V[0]
    return (V, lam) if return_eigenvalues else V


class Eigenvectors(nn.Module):
    """Module form of :func:`eigenvectors`: ``Eigenvectors(top_k)(X) -> V`` (or ``(V, lam)``)."""

    def __init__(self, top_k: Optional[int] = None, return_eigenvalues: bool = False,
                 gap_tol: Optional[float] = None) -> None:
        super().__init__()
        self.top_k, self.return_eigenvalues, self.gap_tol = top_k, return_eigenvalues, gap_tol

    def forward(self, X: Tensor):
        return eigenvectors(X, self.top_k, self.return_eigenvalues, self.gap_tol)

    def extra_repr(self) -> str:
        return f"top_k={self.top_k}"
