"""The analytic centre of a polytope as a differentiable layer.

.. math::

    y^\\star(G, h) = \\arg\\min_y\\; -\\sum_i \\log(h_i - g_i^T y), \\qquad P = \\{y : G y \\le h\\}.

Forward: damped Newton on the self-concordant log barrier from a strictly feasible point (found by a phase-1
problem solved with :func:`torchddn.nodes.qp.qp` when ``y = 0`` is not interior). Backward: closed form via the
implicit function theorem with ``H = G^T D^2 G``, ``D = diag(1 / (h - G y))``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from torchddn.nodes._callable import make_callable
from torchddn.diagnostics import ConvergenceWarning, DDNError, Diagnostics, element_list, report

__all__ = ["analytic_centre", "AnalyticCentre"]


def _mv(M: Tensor, x: Tensor) -> Tensor:
    return (M * x.unsqueeze(-2)).sum(-1)


def _mtv(M: Tensor, x: Tensor) -> Tensor:
    return (M * x.unsqueeze(-1)).sum(-2)


def _prepare(G: Tensor, h: Tensor):
    if not isinstance(G, Tensor) or not isinstance(h, Tensor):
        raise DDNError("analytic_centre: G and h must be tensors")
    if G.dim() not in (2, 3):
        raise DDNError(f"analytic_centre: G must have shape (m, n) or (B, m, n), got {tuple(G.shape)}")
    m, n = G.shape[-2:]
    if h.dim() not in (1, 2) or h.shape[-1] != m:
        raise DDNError(f"analytic_centre: h must have shape ({m},) or (B, {m}) to match G, got {tuple(h.shape)}")
    if not G.dtype.is_floating_point or G.dtype != h.dtype or G.device != h.device:
        raise DDNError("analytic_centre: G and h must be floating point tensors of one dtype and device")
    if m <= n:
        raise DDNError(f"analytic_centre: a bounded polytope in R^{n} needs more than {n} constraints, got m={m}")
    batched = G.dim() == 3 or h.dim() == 2
    sizes = {s for s in (G.shape[0] if G.dim() == 3 else 1, h.shape[0] if h.dim() == 2 else 1)}
    if len(sizes - {1}) > 1:
        raise DDNError(f"analytic_centre: batch sizes of G {tuple(G.shape)} and h {tuple(h.shape)} differ")
    B = max(sizes)
    Gb = (G if G.dim() == 3 else G.unsqueeze(0)).expand(B, m, n)
    hb = (h if h.dim() == 2 else h.unsqueeze(0)).expand(B, m)
    for name, t in (("G", Gb), ("h", hb)):
        bad = ~torch.isfinite(t).reshape(B, -1).all(-1)
        if bool(bad.any()):
            raise DDNError(f"analytic_centre: {name} contains NaN or Inf at batch elements {element_list(bad)}")
    return Gb, hb, batched


def _interior_point(G: Tensor, h: Tensor) -> Tensor:
    """A strictly feasible point per element, or DDNError naming the elements with an empty interior."""
    B, m, n = G.shape
    y0 = G.new_zeros(B, n)
    if bool((h > 0).all()):
        return y0
    from torchddn.nodes.qp import qp

    # Phase 1: maximise the common slack t (capped at 1) with a small proximal term keeping y bounded.
    scale = h.abs().amax(-1).clamp_min(1.0)
    eps = 1e-6
    Q = eps * torch.eye(n + 1, dtype=G.dtype, device=G.device).expand(B, n + 1, n + 1)
    p = torch.cat([G.new_zeros(B, n), -torch.ones_like(h[:, :1])], -1)
    Gp = torch.cat([torch.cat([G, torch.ones_like(h).unsqueeze(-1)], -1),
                    torch.cat([G.new_zeros(B, 1, n), G.new_ones(B, 1, 1)], -1)], -2)
    hp = torch.cat([h, scale.unsqueeze(-1)], -1)
    with torch.no_grad():
        sol = qp(Q, p, Gp, hp, on_failure="ignore")
    y, t = sol[:, :n], sol[:, n]
    empty = t <= 1e3 * torch.finfo(G.dtype).eps ** 0.5 * scale
    if bool(empty.any()):
        raise DDNError(f"analytic_centre: the polytope {{y : G y <= h}} has an empty interior at batch elements "
                       f"{element_list(empty)}")
    return y


def _newton(G: Tensor, h: Tensor, y: Tensor, tol: float, max_iter: int):
    B, m, n = G.shape
    big = 1.0 / torch.finfo(G.dtype).eps ** 0.5
    converged = torch.zeros(B, dtype=torch.bool, device=G.device)
    singular = torch.zeros_like(converged)
    iterations = torch.zeros(B, dtype=torch.long, device=G.device)
    dec = G.new_full((B,), float("inf"))
    for _ in range(max_iter):
        s = h - _mv(G, y)
        r = 1.0 / s
        grad = _mtv(G, r)
        H = G.transpose(-1, -2) @ (r.square().unsqueeze(-1) * G)
        L, info = torch.linalg.cholesky_ex(H)
        singular = singular | (info != 0)
        dy = -torch.cholesky_solve(grad.unsqueeze(-1), L).squeeze(-1)
        dy = torch.where((info != 0)[:, None] | ~torch.isfinite(dy), torch.zeros_like(dy), dy)
        dec = (-(grad * dy).sum(-1)).clamp_min(0).sqrt()  # Newton decrement
        converged = dec <= tol
        active = ~converged & ~singular
        if not bool(active.any()):
            break
        # Damped Newton step: stays strictly feasible for self-concordant barriers.
        step = torch.where(dec > 0.25, 1.0 / (1.0 + dec), torch.ones_like(dec))
        y = y + (step * active)[:, None] * dy
        iterations = iterations + active.long()
        if bool((y.abs().amax(-1) > big).any()):
            break
    unbounded = singular | (y.abs().amax(-1) > big) | (~converged & (dec > 0.25))
    return y, converged, iterations, dec, unbounded


class _ACFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, G, h, opts):
        tol, max_iter, on_failure, diag = opts
        with torch.no_grad():
            y0 = _interior_point(G, h)
            y, conv, iters, dec, unbounded = _newton(G, h, y0, tol, max_iter)
            if bool(unbounded.any()):
                raise DDNError(f"analytic_centre: the polytope is unbounded (or G lacks full column rank) at batch "
                               f"elements {element_list(unbounded)}: the log barrier has no minimiser")
            if bool((~conv).any()):
                report(on_failure, f"analytic_centre: Newton did not converge at batch elements "
                       f"{element_list(~conv)} (decrement {float(dec.max()):.3g})", ConvergenceWarning, stacklevel=5)
            s = h - _mv(G, y)
            r = 1.0 / s
            L, _ = torch.linalg.cholesky_ex(G.transpose(-1, -2) @ (r.square().unsqueeze(-1) * G))
            if diag is not None:
                diag.residual = _mtv(G, r).abs().amax(-1)
                diag.constraint_violation = (-s).clamp_min(0).amax(-1)
                diag.converged = conv
                diag.iterations = iters
        ctx.save_for_backward(G, y, r, L)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        G, y, r, L = ctx.saved_tensors
        v = torch.cholesky_solve(gy.unsqueeze(-1), L).squeeze(-1)
        gh = r.square() * _mv(G, v)
        gG = -gh.unsqueeze(-1) * y.unsqueeze(-2) - r.unsqueeze(-1) * v.unsqueeze(-2)
        return gG, gh, None


def analytic_centre(G: Tensor, h: Tensor, *, tol: Optional[float] = None, max_iter: int = 100,
                    on_failure: str = "warn", diagnostics: Optional[Diagnostics] = None) -> Tensor:
    r"""Analytic centre of the polytope ``{y : G y <= h}``, differentiable w.r.t. ``G`` and ``h``.

    .. math::

        y^\star = \arg\min_y -\sum_{i=1}^m \log(h_i - g_i^T y)

    Args:
        G: ``(m, n)`` or ``(B, m, n)``, of full column rank, ``m > n``.
        h: ``(m,)`` or ``(B, m)``.
        tol: Newton decrement tolerance (default ``1e-10`` for float64, ``1e-5`` for float32).
        max_iter: maximum Newton iterations.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` for elements that do not converge.
        diagnostics: optional :class:`~torchddn.diagnostics.Diagnostics` to fill.

    Returns:
        ``y`` of shape ``(B, n)`` (``(n,)`` when neither argument has a batch dimension).

    Gradient: with ``s = h - G y``, ``D = diag(1 / s)`` and ``H = G^T D^2 G``, ``v = H^{-1} g_y``:
    ``dL/dh = D^2 G v`` and ``dL/dG = -(D^2 G v) y^T - (D 1) v^T``. The Cholesky factor of ``H`` at the solution
    is computed once in the forward. Cost ``O(B (m n^2 + n^3))`` per Newton step and once for the backward.

    Raises:
        DDNError: on bad shapes or NaN/Inf; an empty interior; an unbounded polytope (no minimiser).
    """
    Gb, hb, batched = _prepare(G, h)
    if tol is None:
        tol = 1e-10 if Gb.dtype == torch.float64 else 1e-5
    y = _ACFunction.apply(Gb, hb, (tol, max_iter, on_failure, diagnostics))
    return y if batched else y[0]


class AnalyticCentre(nn.Module):
    """Module form of :func:`analytic_centre`: ``layer(G, h) -> y``; ``layer.diagnostics`` after each call."""

    def __init__(self, *, tol: Optional[float] = None, max_iter: int = 100, on_failure: str = "warn") -> None:
        super().__init__()
        self.tol, self.max_iter, self.on_failure = tol, max_iter, on_failure
        self.diagnostics = Diagnostics()

    def forward(self, G: Tensor, h: Tensor) -> Tensor:
        self.diagnostics = Diagnostics()
        return analytic_centre(G, h, tol=self.tol, max_iter=self.max_iter, on_failure=self.on_failure,
                               diagnostics=self.diagnostics)


make_callable(__name__)  # torchddn.nodes.analytic_centre is this module and calls analytic_centre(...) (see nodes/_callable.py)
