"""Batched damped Newton method for root finding, ``F(y) = 0`` on flat ``(b, m)`` tensors (registered in
:data:`torchddn.solvers.SOLVERS` with kind ``"root"``; :mod:`torchddn.root` re-exports it for
:class:`~torchddn.root.RootNode`).

Stopping rule (scale free): with the length ``L = max(||y||, ||y0||)`` and the Jacobian's size
``|J| = ||J||_F / sqrt(m)`` (the RMS column norm; for the matrix-free path the estimate ``||J 1|| / sqrt(m)``), an
element stops when

    ||F(y)|| <= tol * |J| L,

i.e. the residual is ``tol`` times the change of ``F`` over the length ``L``. It is invariant under ``F -> a F`` and
under rescaling ``y`` with the data, and it does not compare ``||F||`` with an absolute number (nor with
``||F(y0)||``, which would stop early from a distant start). ``0 <= 0`` holds: an exact root stops.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import jvp

from torchddn.diagnostics import DDNError, element_list
from torchddn.solvers.base import SolverResult
from torchddn.autodiff import batch_jacobian

FlatMap = Callable[[Tensor], Tensor]

__all__ = ["newton_root", "default_tol"]


def default_tol(dtype: torch.dtype) -> float:
    """Default Newton tolerance of the relative rule: ``1e-12`` in float64, ``~7.6e-6`` in float32."""
    return max(1e-12, min(64.0 * torch.finfo(dtype).eps, 1e-2))


def _norm(r: Tensor) -> Tensor:
    return torch.nan_to_num(r.norm(dim=1), nan=math.inf, posinf=math.inf)


def newton_root(F: FlatMap, y0: Tensor, *, tol: Optional[float] = None, max_iter: int = 50,
                linear_solver: str = "dense", max_backtracks: int = 30) -> SolverResult:
    r"""Batched damped Newton method for ``F(y) = 0`` with ``F: (b, m) -> (b, m)`` acting element-wise on the batch.

    Each step solves ``(∂F/∂y) d = -F`` (``"dense"``: Jacobian by ``m`` vmapped VJPs and LU, minimum-norm step
    where singular; ``"gmres"``: matrix-free with Jacobian-vector products) and backtracks (halving) until
    ``||F(y + t d)|| <= (1 - 1e-4 t) ||F(y)||``. Elements stop by the scale-free rule of the module docstring,
    ``||F(y)|| <= tol |J| max(||y||, ||y0||)``, and are frozen; an element whose line search finds no decrease
    has stopped at a local minimum of ``||F||`` that is not a root (``converged`` False). A NaN/Inf ``y0`` or
    ``F(y0)`` raises :class:`~torchddn.diagnostics.DDNError` naming the elements. ``residual`` is ``||F(y)||``.

    Cost per iteration: ``m`` VJPs + ``O(b m^3)`` (dense) or one JVP per GMRES step plus one for ``|J|``, plus
    the line search.
    """
    # the batched linear solvers are shared with the fixed-point node's backward
    from torchddn.linalg import dense_solve_general, gmres

    if linear_solver not in ("dense", "gmres"):
        raise ValueError(f"linear_solver must be 'dense' or 'gmres', got {linear_solver!r}")
    if not isinstance(y0, Tensor) or y0.dim() != 2 or not y0.is_floating_point():
        shape = tuple(y0.shape) if isinstance(y0, Tensor) else type(y0).__name__
        raise DDNError(f"newton_root: y0 must be a floating point (b, m) tensor, got {shape}")
    bad = ~torch.isfinite(y0).all(dim=1)
    if bool(bad.any()):
        raise DDNError(f"newton_root: the starting point y0 contains NaN or Inf at batch elements {element_list(bad)}")
    tol = default_tol(y0.dtype) if tol is None else float(tol)
    y = y0
    b, m = y.shape
    r = F(y)
    bad = ~torch.isfinite(r).all(dim=1)
    if bool(bad.any()):
        raise DDNError(f"newton_root: F(y0) is NaN or Inf at batch elements {element_list(bad)}")
    rn = _norm(r)
    y0n = y0.norm(dim=1)
    ones = torch.full_like(y, 1.0 / math.sqrt(max(m, 1)))

    def jac_step(y_: Tensor, r_: Tensor) -> tuple[Tensor, Tensor]:
        """Newton step and the Jacobian size ``|J|`` (b,) at ``y_``."""
        if linear_solver == "dense":
            _, J = batch_jacobian(F, y_)
            d, _ = dense_solve_general(J, -r_)
            size = torch.linalg.matrix_norm(J) / math.sqrt(max(m, 1))
        else:
            jf = lambda z: jvp(F, (y_,), (z,))[1]  # noqa: E731
            d, _ = gmres(jf, -r_)
            size = jf(ones).norm(dim=1)
        return d, torch.nan_to_num(size, nan=0.0, posinf=0.0)

    def test(rn_: Tensor, y_: Tensor, size: Tensor) -> Tensor:
        L = torch.maximum(y_.norm(dim=1), y0n)
        return torch.isfinite(rn_) & (rn_ <= tol * size * L)

    converged = rn == 0
    failed = ~torch.isfinite(rn)
    iters = torch.zeros(b, dtype=torch.long, device=y.device)
    d, size = jac_step(y, r) if max_iter > 0 else (torch.zeros_like(y), torch.zeros_like(rn))
    converged = converged | test(rn, y, size)
    for _ in range(max_iter):
        active = ~(converged | failed)
        if not bool(active.any()):
            break
        t = torch.ones_like(rn)
        pending = active.clone()
        y_new, r_new, rn_new = y, r, rn
        for _ in range(max_backtracks):
            cand = y + t[:, None] * d
            rc = F(cand)
            rnc = _norm(rc)
            ok = pending & (rnc <= (1 - 1e-4 * t) * rn)
            y_new = torch.where(ok[:, None], cand, y_new)
            r_new = torch.where(ok[:, None], rc, r_new)
            rn_new = torch.where(ok, rnc, rn_new)
            pending = pending & ~ok
            if not bool(pending.any()):
                break
            t = torch.where(pending, 0.5 * t, t)
        stalled = pending  # no decrease along the Newton direction: a local minimum of ||F|| that is not a root
        y, r, rn = y_new, r_new, rn_new
        iters = iters + active.long()
        d, size = jac_step(y, r)
        converged = converged | (active & ((rn == 0) | test(rn, y, size)))
        failed = failed | (active & stalled & ~converged)
    return SolverResult(y=y, nu=None, converged=converged, iterations=iters, residual=rn, method="newton_root")
