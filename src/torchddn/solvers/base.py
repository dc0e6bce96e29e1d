"""The interface every forward solver follows, and batched derivative helpers built on ``torch.func``.

A solver is any callable ``solver(problem, y0, *, tol, max_iter) -> SolverResult``. It works on a flat, batched
variable ``y`` of shape ``(b, m)``; the node reshapes to and from the user's shape. Batch elements are independent:
``problem.objective(y)`` returns ``(b,)`` and element ``i`` depends only on ``y[i]``, so the gradient of the batch
sum is the stack of per-element gradients, and one Hessian-vector product serves the whole batch.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor

from torchddn.autodiff import (BatchFn, batch_grad, batch_hessian, batch_hvp,  # noqa: F401  (re-exported)
                               batch_jacobian, value_and_batch_grad)


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
