"""Batched forward solvers for fixed points ``z = f(z)``, ``z`` of shape ``(b, n)``: :func:`picard`,
:func:`anderson` and :func:`broyden` (registered in :data:`torchddn.solvers.SOLVERS` with kind ``"fixed_point"``;
:mod:`torchddn.fixed_point` re-exports them for :class:`~torchddn.fixed_point.FixedPointNode`).

Stopping rule (scale free, shared by all three): with the start's scale ``s0 = max(||z0||, ||f(z0)||)`` an
element stops when its relative residual

    ||f(z) - z|| / max(||f(z)||, s0) <= tol

(``0/0 = 0``: a zero map at a zero start is a fixed point). It is invariant under rescaling ``z`` together with
the data of ``f`` (``f_c(z) = c f(z / c)``) and does not depend on an absolute constant. A NaN/Inf start or a
non-finite ``f(z0)`` raises :class:`~torchddn.diagnostics.DDNError` naming the elements.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError, element_list
from torchddn.solvers.base import SolverResult

FlatMap = Callable[[Tensor], Tensor]

__all__ = ["picard", "anderson", "broyden", "default_tol", "fp_residual", "FORWARD_SOLVERS"]



def default_tol(dtype: torch.dtype) -> float:
    """Default forward tolerance on the relative fixed-point residual (``1e-10`` float64, ``~1e-5`` float32)."""
    eps = torch.finfo(dtype).eps
    return max(1e-10, min(100.0 * eps, 1e-2))


def fp_residual(fz: Tensor, z: Tensor, scale: Optional[Tensor] = None) -> Tensor:
    """Per-element relative fixed-point residual ``||f(z) - z|| / max(||f(z)||, scale)`` (b,), ``scale`` (b,)
    the start's ``max(||z0||, ||f(z0)||)`` (default ``||z||``); ``0/0 = 0``, ``x/0 = inf``, NaN becomes ``inf``."""
    fn = fz.norm(dim=1)
    den = torch.maximum(fn, z.norm(dim=1) if scale is None else scale)
    num = (fz - z).norm(dim=1)
    res = num / torch.where(den > 0, den, torch.ones_like(den))
    res = torch.where(den > 0, res, torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, math.inf)))
    # overflowing norms mean divergence, not a small relative residual
    return torch.where(torch.isfinite(fn) & torch.isfinite(res), res, torch.full_like(res, math.inf))


def _start(f: FlatMap, z0: Tensor, name: str) -> tuple[Tensor, Tensor]:
    """Check ``z0`` and ``f(z0)`` (finite, ``(b, n)`` floating) and return ``(f(z0), s0)`` with the scale
    ``s0 = max(||z0||, ||f(z0)||)`` of the stopping rule."""
    if not isinstance(z0, Tensor) or z0.dim() != 2 or not z0.is_floating_point():
        shape = tuple(z0.shape) if isinstance(z0, Tensor) else type(z0).__name__
        raise DDNError(f"{name}: z0 must be a floating point (b, n) tensor, got {shape}")
    bad = ~torch.isfinite(z0).all(dim=1)
    if bool(bad.any()):
        raise DDNError(f"{name}: the starting point z0 contains NaN or Inf at batch elements {element_list(bad)}")
    fz = f(z0)
    if not isinstance(fz, Tensor) or fz.shape != z0.shape:
        raise DDNError(f"{name}: f(z0) must have z0's shape {tuple(z0.shape)}, got "
                       f"{tuple(fz.shape) if isinstance(fz, Tensor) else type(fz).__name__}")
    bad = ~torch.isfinite(fz).all(dim=1)
    if bool(bad.any()):
        raise DDNError(f"{name}: f(z0) is NaN or Inf at batch elements {element_list(bad)}")
    return fz, torch.maximum(z0.norm(dim=1), fz.norm(dim=1))


class _Tracker:
    """Per-element bookkeeping shared by the forward solvers: convergence masks, iteration counts and the best
    iterate seen so far (returned for elements that never converge, so a diverging element cannot return NaN)."""

    def __init__(self, z: Tensor, res: Tensor, tol: float) -> None:
        self.tol = tol
        self.best = z.clone()
        self.best_res = res.clone()
        self.converged = res <= tol
        self.failed = ~torch.isfinite(res)
        self.iterations = torch.zeros(z.shape[0], dtype=torch.long, device=z.device)

    @property
    def done(self) -> Tensor:
        return self.converged | self.failed

    def update(self, z: Tensor, res: Tensor) -> None:
        active = ~self.done
        self.iterations = self.iterations + active.long()
        better = active & (res < self.best_res)
        self.best = torch.where(better[:, None], z, self.best)
        self.best_res = torch.where(better, res, self.best_res)
        self.converged = self.converged | (active & (res <= self.tol))
        self.failed = self.failed | (active & ~torch.isfinite(res))

    def result(self, method: str) -> SolverResult:
        return SolverResult(y=self.best, nu=None, converged=self.converged, iterations=self.iterations,
                            residual=self.best_res, method=method)


# ----------------------------------------------------------------------------------------------------------------
# forward solvers for z = f(z), z of shape (b, n)
# ----------------------------------------------------------------------------------------------------------------

def picard(f: FlatMap, z0: Tensor, *, tol: Optional[float] = None, max_iter: int = 500,
           damping: float = 1.0) -> SolverResult:
    r"""Damped Picard iteration ``z <- (1 - damping) z + damping f(z)`` on a batch ``z`` of shape ``(b, n)``.

    Each element stops when its relative residual ``||f(z) - z|| / max(||f(z)||, s0) <= tol`` (``s0 = max(||z0||,
    ||f(z0)||)``, scale free; see the module docstring) and is frozen. Elements
    that never converge return their best iterate (``converged`` False). Cost: one ``f`` per iteration.
    """
    tol = default_tol(z0.dtype) if tol is None else float(tol)
    z = z0
    fz, s0 = _start(f, z0, "picard")
    track = _Tracker(z, fp_residual(fz, z, s0), tol)
    for _ in range(max_iter):
        if bool(track.done.all()):
            break
        z = torch.where(track.done[:, None], z, (1.0 - damping) * z + damping * fz)
        fz = f(z)
        track.update(z, fp_residual(fz, z, s0))
    return track.result("picard")


def anderson(f: FlatMap, z0: Tensor, *, tol: Optional[float] = None, max_iter: int = 500, memory: int = 5,
             damping: float = 1.0, lam: Optional[float] = None) -> SolverResult:
    r"""Batched Anderson acceleration (type II) for ``z = f(z)``, ``z`` of shape ``(b, n)``.

    With the last ``k <= memory`` iterates ``X`` and residuals ``G = f(X) - X``, each step solves the regularised
    constrained least-squares problem ``min_a ||G^T a||^2 + lam s ||a||^2`` s.t. ``sum(a) = 1`` (``s`` the mean
    squared residual norm, so ``lam`` is scale free) through its bordered ``(k+1) x (k+1)`` system, and sets
    ``z = damping * f(X) a + (1 - damping) X a``. Elements stop independently (see :func:`picard`); a failed small
    solve falls back to a plain damped step. Cost per iteration: one ``f`` plus ``O(b k^2 n)``.
    """
    tol = default_tol(z0.dtype) if tol is None else float(tol)
    lam = math.sqrt(torch.finfo(z0.dtype).eps) if lam is None else float(lam)
    b, n = z0.shape
    m = max(int(memory), 1)
    X = z0.new_zeros(b, m, n)
    F = z0.new_zeros(b, m, n)
    z = z0
    fz, s0 = _start(f, z0, "anderson")
    track = _Tracker(z, fp_residual(fz, z, s0), tol)
    X[:, 0], F[:, 0] = z, fz
    for k in range(1, max_iter + 1):
        if bool(track.done.all()):
            break
        h = min(k, m)
        G = F[:, :h] - X[:, :h]                                   # (b, h, n)
        GG = G @ G.transpose(1, 2)                                # (b, h, h)
        scale = torch.diagonal(GG, dim1=1, dim2=2).mean(-1).clamp_min(torch.finfo(z0.dtype).tiny)
        A = z0.new_zeros(b, h + 1, h + 1)
        A[:, 0, 1:] = 1.0
        A[:, 1:, 0] = 1.0
        A[:, 1:, 1:] = GG + (lam * scale)[:, None, None] * torch.eye(h, dtype=z0.dtype, device=z0.device)
        rhs = z0.new_zeros(b, h + 1)
        rhs[:, 0] = 1.0
        sol, info = torch.linalg.solve_ex(A, rhs)
        alpha = sol[:, 1:].unsqueeze(-1)                          # (b, h, 1)
        z_new = damping * (alpha * F[:, :h]).sum(1) + (1.0 - damping) * (alpha * X[:, :h]).sum(1)
        plain = (1.0 - damping) * z + damping * fz
        ok = (info == 0) & torch.isfinite(z_new).all(dim=1)
        z_new = torch.where(ok[:, None], z_new, plain)
        z = torch.where(track.done[:, None], z, z_new)
        fz = f(z)
        X[:, k % m], F[:, k % m] = z, fz
        track.update(z, fp_residual(fz, z, s0))
    return track.result("anderson")


def broyden(f: FlatMap, z0: Tensor, *, tol: Optional[float] = None, max_iter: int = 500, memory: int = 30,
            damping: float = 1.0) -> SolverResult:
    r"""Batched limited-memory ("good") Broyden method for the root of ``g(z) = f(z) - z``, ``z`` of shape ``(b, n)``.

    The inverse Jacobian of ``g`` is approximated as ``-damping I + U V^T`` with at most ``memory`` rank-one terms
    (the oldest is overwritten when full); the step is ``dz = -J^{-1} g``. Elements stop independently (see
    :func:`picard`); updates with a vanishing denominator are skipped. Cost per iteration: one ``f`` plus
    ``O(b n memory)``.
    """
    tol = default_tol(z0.dtype) if tol is None else float(tol)
    b, n = z0.shape
    M = max(int(memory), 1)
    U = z0.new_zeros(b, n, M)
    VT = z0.new_zeros(b, M, n)
    tiny = torch.finfo(z0.dtype).tiny

    def matvec(x: Tensor) -> Tensor:      # J^{-1} x
        return -damping * x + (U * (VT * x.unsqueeze(1)).sum(-1).unsqueeze(1)).sum(-1)

    def rmatvec(x: Tensor) -> Tensor:     # x^T J^{-1}
        return -damping * x + ((x.unsqueeze(-1) * U).sum(1).unsqueeze(-1) * VT).sum(1)

    z = z0
    fz, s0 = _start(f, z0, "broyden")
    g = fz - z
    track = _Tracker(z, fp_residual(fz, z, s0), tol)
    dz = -matvec(g)
    for k in range(max_iter):
        if bool(track.done.all()):
            break
        active = ~track.done
        dz = torch.where(active[:, None], dz, torch.zeros_like(dz))
        z_new = z + dz
        fz_new = f(z_new)
        g_new = fz_new - z_new
        res = fp_residual(fz_new, z_new, s0)
        finite = torch.isfinite(res)
        dg = g_new - g
        vT = rmatvec(dz)
        denom = (vT * dg).sum(dim=1)
        upd = active & finite & (denom.abs() > 1e3 * tiny * (dz.norm(dim=1) * dg.norm(dim=1) + tiny))
        safe = torch.where(upd, denom, torch.ones_like(denom))
        u = torch.where(upd[:, None], (dz - matvec(dg)) / safe[:, None], torch.zeros_like(dz))
        vT = torch.where(upd[:, None], vT, torch.zeros_like(vT))
        slot = k % M
        U[:, :, slot] = torch.where(upd[:, None], u, U[:, :, slot])
        VT[:, slot] = torch.where(upd[:, None], vT, VT[:, slot])
        keep = active & finite
        z = torch.where(keep[:, None], z_new, z)
        g = torch.where(keep[:, None], g_new, g)
        track.update(z_new, res)
        dz = -matvec(g)
    return track.result("broyden")


FORWARD_SOLVERS: dict[str, Callable[..., SolverResult]] = {"anderson": anderson, "broyden": broyden,
                                                           "picard": picard}
