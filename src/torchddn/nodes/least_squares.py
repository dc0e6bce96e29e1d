r"""Weighted, ridge-regularised linear least squares with a cached factorisation and a closed-form backward.

.. math::
    y(A, b, w, \beta) = \arg\min_u \; \sum_i w_i\,(a_i^\top u - b_i)^2 + \beta \|u\|^2
                      = (A^\top W A + \beta I)^{-1} A^\top W b .

With ``bias=True`` an intercept column of ones is appended to ``A``; the intercept is not penalised by
:math:`\beta`. Writing :math:`G = A^\top W A + \beta D` (``D`` the penalised-column indicator), :math:`r = b - A y`
and :math:`v = G^{-1}\bar y` (one solve with the cached factor of ``G``), the gradients are

.. math::
    \bar b = W A v, \quad \bar A = W\,(r v^\top - A v\, y^\top), \quad \bar w = (A v) \odot r, \quad
    \bar\beta = -v^\top D y .
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor, nn

from torchddn.diagnostics import DDNError, NonRegularWarning, element_list, report

__all__ = ["weighted_least_squares", "WeightedLeastSquares"]


def _factor(a: Tensor, b: Tensor, w: Tensor, beta: Tensor, pen: Tensor, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """Return (y, U, bad) with ``U`` upper triangular, ``U^T U = A^T W A + beta D``."""
    bsz, n, p = a.shape
    if mode == "cholesky":
        aw = a * w[..., None]
        g = aw.transpose(1, 2) @ a
        g = g + torch.diag_embed(beta[:, None] * pen)
        low, info = torch.linalg.cholesky_ex(g)
        u = low.transpose(1, 2)
        bad = info != 0
        rhs = (aw.transpose(1, 2) @ b[..., None])
    else:  # QR of the stacked matrix [W^{1/2} A; sqrt(beta D)]
        sw = w.sqrt()
        stacked = torch.cat([a * sw[..., None], torch.diag_embed((beta[:, None] * pen).sqrt())], dim=1)
        # Householder QR without forming Q: Q^T is applied to the right-hand side with ormqr
        h, tau = torch.geqrf(stacked)
        r = torch.triu(h[:, :p, :])
        rhs_full = torch.cat([sw * b, b.new_zeros(bsz, p)], dim=1)[..., None]
        qtb = torch.ormqr(h, tau, rhs_full, left=True, transpose=True)[:, :p]
        sign = torch.where(torch.diagonal(r, dim1=1, dim2=2) < 0, -1.0, 1.0).to(r.dtype)
        u = r * sign[..., None]  # U^T U = R^T R with a positive diagonal
        bad = torch.zeros(bsz, dtype=torch.bool, device=a.device)
        rhs = r.transpose(1, 2) @ qtb  # = A^T W b, so that the same pair of triangular solves applies below
    diag = torch.diagonal(u, dim1=1, dim2=2)
    scale = diag.abs().amax(1).clamp_min(torch.finfo(a.dtype).tiny)
    bad = bad | (diag.abs() <= scale[:, None] * (p * torch.finfo(a.dtype).eps)).any(1) | ~torch.isfinite(diag).all(1)
    eye = torch.eye(p, dtype=a.dtype, device=a.device)
    u = torch.where(bad[:, None, None], eye, u)
    return _gsolve(u, rhs)[..., 0], u, bad


def _gsolve(u: Tensor, x: Tensor) -> Tensor:
    """Solve ``U^T U z = x`` with the cached upper-triangular factor."""
    z = torch.linalg.solve_triangular(u.transpose(1, 2), x, upper=False)
    return torch.linalg.solve_triangular(u, z, upper=True)


class _WLSFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, w, beta, pen, mode, on_failure):
        y, u, bad = _factor(a, b, w, beta, pen, mode)
        if bool(bad.any()):
            report(on_failure, "weighted_least_squares: A^T W A + beta I is singular (rank-deficient A with beta = 0, "
                               f"or zero weights) at batch elements {element_list(bad)}", NonRegularWarning,
                   stacklevel=4)
            y = torch.where(bad[:, None], torch.full_like(y, float("nan")), y)
        ctx.save_for_backward(a, b, w, beta, pen, y, u)
        return y

    @staticmethod
    def backward(ctx, gy):
        a, b, w, beta, pen, y, u = ctx.saved_tensors
        v = _gsolve(u, gy[..., None])[..., 0]
        av = (a @ v[..., None])[..., 0]
        r = b - (a @ y[..., None])[..., 0]
        gb = w * av if ctx.needs_input_grad[1] else None
        ga = w[..., None] * (r[..., None] * v[:, None, :] - av[..., None] * y[:, None, :]) \
            if ctx.needs_input_grad[0] else None
        gw = av * r if ctx.needs_input_grad[2] else None
        gbeta = -(v * y * pen).sum(1) if ctx.needs_input_grad[3] else None
        return ga, gb, gw, gbeta, None, None, None


def weighted_least_squares(A: Tensor, b: Tensor, weights: Optional[Tensor] = None,
                           beta: Union[float, Tensor] = 0.0, bias: bool = False, mode: str = "cholesky",
                           on_failure: str = "raise") -> Union[Tensor, tuple[Tensor, Tensor]]:
    r"""Weighted ridge regression :math:`y = \arg\min_u \|W^{1/2}(A u - b)\|^2 + \beta\|u\|^2` per batch element.

    Args:
        A: (b, n, p) design matrices, or (n, p) shared by the batch.
        b: (b, n) targets.
        weights: (b, n) non-negative diagonal weights ``W``; ``None`` means all ones.
        beta: ridge weight ``>= 0``: a float, a 0-d tensor or a (b,) tensor (differentiable).
        bias: append an unpenalised intercept column of ones to ``A``; then ``(y, intercept)`` is returned.
        mode: ``"cholesky"`` (normal equations, fastest) or ``"qr"`` (QR of
            :math:`[W^{1/2}A; \sqrt\beta I]`, better conditioned). Both cache an upper-triangular factor ``U``
            with :math:`U^\top U = A^\top W A + \beta I`, which the backward reuses.
        on_failure: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` for a singular normal matrix (the
            solution of those elements is NaN unless raised).

    Returns:
        y: (b, p) coefficients, and with ``bias=True`` also the (b,) intercepts.

    Gradient (exact, closed form; ``v = G^{-1}\bar y`` by two triangular solves with the cached factor):
    :math:`\bar b = W A v`, :math:`\bar A = W(r v^\top - A v y^\top)` with :math:`r = b - A y`,
    :math:`\bar w = (A v)\odot r`, :math:`\bar\beta = -v^\top y` (penalised entries only).

    Cost: forward :math:`O(b\,n\,p^2 + b\,p^3)`; backward :math:`O(b\,n\,p + b\,p^2)`.
    """
    if mode not in ("cholesky", "qr"):
        raise DDNError(f"mode must be 'cholesky' or 'qr', got {mode!r}")
    for name, t in (("A", A), ("b", b)):
        if not torch.is_tensor(t) or not t.is_floating_point():
            raise DDNError(f"{name} must be a floating-point tensor")
    if b.dim() != 2:
        raise DDNError(f"b must have shape (b, n), got {tuple(b.shape)}")
    bsz, n = b.shape
    if A.dim() == 2:
        A = A.expand(bsz, *A.shape)
    if A.dim() != 3 or A.shape[:2] != (bsz, n):
        raise DDNError(f"A must have shape ({bsz}, {n}, p) or ({n}, p), got {tuple(A.shape)}")
    if weights is None:
        weights = torch.ones_like(b)
    if tuple(weights.shape) != (bsz, n):
        raise DDNError(f"weights must have shape {(bsz, n)}, got {tuple(weights.shape)}")
    beta_t = torch.as_tensor(beta, dtype=b.dtype, device=b.device)
    if beta_t.numel() == 1:
        beta_t = beta_t.reshape(1).expand(bsz)
    elif tuple(beta_t.shape) != (bsz,):
        raise DDNError(f"beta must be a scalar or have shape ({bsz},), got {tuple(beta_t.shape)}")
    for name, t in (("A", A), ("b", b), ("weights", weights), ("beta", beta_t)):
        fin = torch.isfinite(t.detach()).reshape(bsz, -1).all(1)
        if not bool(fin.all()):
            raise DDNError(f"{name} contains NaN or Inf at batch elements {element_list(~fin)}")
    neg = (weights.detach() < 0).any(1)
    if bool(neg.any()):
        raise DDNError(f"weights must be non-negative; negative at batch elements {element_list(neg)}")
    if bool((beta_t.detach() < 0).any()):
        raise DDNError(f"beta must be non-negative; negative at batch elements {element_list(beta_t.detach() < 0)}")
    p = A.shape[-1]
    pen = torch.ones(p + int(bias), dtype=b.dtype, device=b.device)
    if bias:
        A = torch.cat([A, torch.ones_like(A[..., :1])], dim=-1)
        pen[-1] = 0.0
    pen = pen.expand(bsz, -1)
    y = _WLSFn.apply(A, b, weights, beta_t, pen, mode, on_failure)
    if bias:
        return y[:, :p], y[:, p]
    return y


class WeightedLeastSquares(nn.Module):
    """Module form of :func:`weighted_least_squares`: ``WeightedLeastSquares(beta, bias, mode)(A, b, weights)``.

    ``beta`` is a fixed float unless ``learn_beta=True``, in which case it is a parameter (kept non-negative by
    a softplus).
    """

    def __init__(self, beta: float = 0.0, bias: bool = False, mode: str = "cholesky", learn_beta: bool = False,
                 on_failure: str = "raise") -> None:
        super().__init__()
        self.bias, self.mode, self.on_failure, self.learn_beta = bias, mode, on_failure, learn_beta
        if learn_beta:
            raw = torch.log(torch.expm1(torch.tensor(max(beta, 1e-6), dtype=torch.float64))).float()
            self.raw_beta = nn.Parameter(raw)
        else:
            self.beta = float(beta)

    def forward(self, A: Tensor, b: Tensor, weights: Optional[Tensor] = None):
        beta = nn.functional.softplus(self.raw_beta).to(b.dtype) if self.learn_beta else self.beta
        return weighted_least_squares(A, b, weights, beta, self.bias, self.mode, self.on_failure)

    def extra_repr(self) -> str:
        return f"bias={self.bias}, mode={self.mode!r}"
