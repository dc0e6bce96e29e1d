"""The interface every forward solver follows, and batched derivative helpers built on ``torch.func``.

A solver is any callable ``solver(problem, y0, *, tol, max_iter) -> SolverResult``. It works on a flat, batched
variable ``y`` of shape ``(b, m)``; the node reshapes to and from the user's shape. Batch elements are independent:
``problem.objective(y)`` returns ``(b,)`` and element ``i`` depends only on ``y[i]``, so the gradient of the batch
sum is the stack of per-element gradients, and one Hessian-vector product serves the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

BatchFn = Callable[[Tensor], Tensor]


@dataclass
class Problem:
    """A batched problem ``min_y f(y) s.t. h(y) = 0, g(y) <= 0`` over flat ``y`` of shape ``(b, m)``.

    Attributes:
        objective: ``(b, m) -> (b,)``.
        eq: ``(b, m) -> (b, p)`` equality constraints ``h(y) = 0``, or None.
        ineq: ``(b, m) -> (b, q)`` inequality constraints ``g(y) <= 0``, or None.
        project: optional Euclidean projection ``(b, m) -> (b, m)`` onto the feasible set, for projected methods.
        residuals: optional ``(b, m) -> (b, k)`` residuals of a least-squares objective ``1/2 ||r(y)||^2``, for the
            least-squares solvers (:mod:`torchddn.solvers.least_squares`); ``objective`` must then equal it.
    """

    objective: BatchFn
    eq: Optional[BatchFn] = None
    ineq: Optional[BatchFn] = None
    project: Optional[BatchFn] = None
    residuals: Optional[BatchFn] = None

    def constrained(self) -> bool:
        return self.eq is not None or self.ineq is not None


@dataclass
class SolverResult:
    """What a solver returns.

    Attributes:
        y: (b, m) the solution.
        nu: (b, p + q) multipliers in the convention ``grad f = J^T nu`` with ``J`` the stacked Jacobian of
            ``[h; g]`` (the paper's Lagrangian ``f - nu^T [h; g]``; inequality multipliers are ``<= 0``), or None.
        converged: (b,) bool.
        iterations: (b,) int64.
        residual: (b,) KKT residual (norm of the Lagrangian gradient plus constraint violation).
        method: which algorithm produced ``y`` (e.g. ``"newton"``, ``"newton_cg"``, ``"lbfgs"``, ``"anderson"``),
            or None for a solver that does not say.
    """

    y: Tensor
    nu: Optional[Tensor]
    converged: Tensor
    iterations: Tensor
    residual: Tensor
    method: Optional[str] = None


def batch_grad(fn: BatchFn, y: Tensor) -> Tensor:
    """Per-element gradient ``(b, m)`` of a batched scalar function ``fn: (b, m) -> (b,)``."""
    return grad(lambda u: fn(u).sum())(y)


def value_and_batch_grad(fn: BatchFn, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(fn(y), batch_grad(fn, y))`` in one pass."""

    def total(u: Tensor) -> tuple[Tensor, Tensor]:
        val = fn(u)
        return val.sum(), val

    g, val = grad(total, has_aux=True)(y)
    return val, g


def batch_hvp(fn: BatchFn, y: Tensor, v: Tensor) -> Tensor:
    """Per-element Hessian-vector products ``H_i v_i``, shape ``(b, m)`` (forward-over-reverse)."""
    return jvp(lambda u: batch_grad(fn, u), (y,), (v,))[1]


def batch_hessian(fn: BatchFn, y: Tensor) -> Tensor:
    """Dense per-element Hessians ``(b, m, m)`` from ``m`` vmapped Hessian-vector products."""
    b, m = y.shape
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    cols = vmap(lambda e: batch_hvp(fn, y, e.expand(b, m)))(eye)  # (m, b, m): cols[j, i] = H_i e_j
    return cols.permute(1, 2, 0)


def batch_jacobian(fn: BatchFn, y: Tensor) -> tuple[Tensor, Tensor]:
    """Value ``(b, p)`` and per-element Jacobian ``(b, p, m)`` of ``fn: (b, m) -> (b, p)``, by ``p`` vmapped VJPs."""
    val, vjp_fn = vjp(fn, y)
    b, p = val.shape
    eye = torch.eye(p, dtype=val.dtype, device=val.device)
    rows = vmap(lambda e: vjp_fn(e.expand(b, p))[0])(eye)  # (p, b, m)
    return val, rows.permute(1, 0, 2)
