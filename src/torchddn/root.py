"""Root nodes: ``y`` solves ``F(x, y) = 0``, differentiated implicitly, and the :func:`custom_root` decorator.

For an optimality (root) function ``F(*xs, y)`` with ``∂F/∂y`` invertible at the solution, the implicit function
theorem gives ``Dy = -(∂F/∂y)⁻¹ ∂F/∂x``. The vector-Jacobian product autograd needs is therefore
``grad_x = (∂F/∂x)ᵀ u`` with ``(∂F/∂y)ᵀ u = -v``: one adjoint linear solve (dense LU for small ``m``, batched
GMRES with vector-Jacobian products otherwise) and one vector-Jacobian product with respect to the inputs. Any
solver can produce ``y``; only ``F`` has to be differentiable.

* :class:`RootNode`: subclass and define ``optimality(*xs, y)`` and either ``solve`` or ``initial_guess`` (the
  built-in batched damped Newton method then finds the root).
* :func:`custom_root`: a decorator in the spirit of JAXopt's ``custom_root`` that makes any solver function
  differentiable given its optimality function.
* :func:`newton_root`: the batched Newton solver on flat ``(b, m)`` tensors.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import Tensor

from torchddn.diagnostics import ConvergenceWarning, DDNError, Diagnostics, element_list, report
from torchddn.fixed_point import _check_y, _detach_all, _flat_map, _implicit_vjp, gmres
from torchddn.function import DeclarativeFunction
from torchddn.node import DeclarativeNode
from torchddn.solvers.root import default_tol, newton_root  # noqa: F401  (re-exported)

__all__ = ["RootNode", "custom_root", "newton_root"]

FlatMap = Callable[[Tensor], Tensor]


def _norm(r: Tensor) -> Tensor:
    return torch.nan_to_num(r.norm(dim=1), nan=math.inf, posinf=math.inf)


class RootNode(DeclarativeNode):
    r"""A declarative node whose output ``y`` solves ``F(*xs, y) = 0`` (``F`` with the shape of ``y``).

    Subclass and define ``optimality(self, *xs, y)`` (batched: ``xs`` of shape ``(b, ...)``, ``y`` ``(b, ...)``;
    returns the residual with ``y``'s shape) and either ``solve(self, *xs) -> (y, ctx)`` or
    ``initial_guess(self, *xs)`` for the built-in damped Newton method (:func:`newton_root`).

    Gradient: ``Dy = -(∂F/∂y)⁻¹ ∂F/∂x``; the backward solves ``(∂F/∂y)ᵀ u = -v`` and returns ``(∂F/∂x)ᵀ u`` by one
    vector-Jacobian product. If ``∂F/∂y`` is singular the minimum-norm solution is used and a
    :class:`~torchddn.diagnostics.NonRegularWarning` names the batch elements (never NaN). The adjoint solve is
    itself differentiated implicitly, so double backward and ``torch.func.vmap`` / ``jacrev`` are exact. Use it as
    ``DeclarativeLayer(node)(*xs)`` (an ``nn.Module``) or through :func:`custom_root`.

    Args:
        tol: Newton tolerance on ``||F(y)||`` (default ``1e-12`` in float64, ``~7.6e-6`` in float32).
        max_iter: Newton iterations.
        backward: ``"auto"`` (``"dense"`` if ``m <= dense_max`` else ``"gmres"``), ``"dense"`` (Jacobian by ``m``
            VJPs, LU with a least-squares fallback; ``O(m^3)``) or ``"gmres"`` (matrix-free, one VJP per step).
        backward_tol, backward_max_iter: for GMRES.
        dense_max: the ``"auto"`` threshold, also used to pick the Newton linear solver.
        check_tol: after every forward, elements with ``||F(y)|| > check_tol`` (default ``1e-6`` in float64,
            ``1e-3`` otherwise) are reported as not solved (:attr:`diagnostics` ``converged`` False).
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when Newton, the user's solver or GMRES fails.
        check_inputs: check batch sizes and NaN/Inf of the inputs and the output.
    """

    def __init__(self, *, tol: Optional[float] = None, max_iter: int = 50, backward: str = "auto",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None, dense_max: int = 64,
                 check_tol: Optional[float] = None, on_failure: str = "warn", check_inputs: bool = True) -> None:
        if backward not in ("auto", "dense", "gmres"):
            raise ValueError(f"backward must be 'auto', 'dense' or 'gmres', got {backward!r}")
        super().__init__(tol=tol, max_iter=max_iter, linear_tol=backward_tol, linear_max_iter=backward_max_iter,
                         dense_max=dense_max, check_tol=check_tol, on_failure=on_failure, check_inputs=check_inputs)
        self.backward_method = backward

    # ---- user hooks ---------------------------------------------------------------------------------------------
    def optimality(self, *xs: Any, y: Tensor) -> Tensor:
        """The root function ``F(*xs, y)``, same shape as ``y``; ``y`` is a root when it is zero."""
        raise NotImplementedError(f"{type(self).__name__} must define optimality(self, *xs, y)")

    def initial_guess(self, *xs: Any) -> Tensor:
        """Starting point ``(b, ...)`` for the built-in Newton solver; fixes the shape of ``y``."""
        raise NotImplementedError(f"{type(self).__name__} must define solve(self, *xs) or initial_guess(self, *xs)")

    # ---- forward ------------------------------------------------------------------------------------------------
    def _flat_F(self, xs: tuple, shape: torch.Size) -> FlatMap:
        return _flat_map(lambda y: self.optimality(*xs, y=y), shape, f"{type(self).__name__}.optimality")

    def solve(self, *xs: Any) -> tuple[Tensor, dict]:
        """Find ``y`` with ``F(*xs, y) = 0`` by damped Newton from :meth:`initial_guess`: returns ``(y, ctx)`` with
        the per-element ``converged``, ``iterations`` and ``residual`` (``||F(y)||``)."""
        with torch.no_grad():
            xs = _detach_all(xs)
            y0 = _check_y(self.initial_guess(*xs), f"{type(self).__name__}.initial_guess")
            shape = y0.shape
            F = self._flat_F(xs, shape)
            res = newton_root(F, y0.reshape(shape[0], -1), tol=self.tol, max_iter=self.max_iter,
                              linear_solver="dense" if y0[0].numel() <= self.dense_max else "gmres")
        return res.y.reshape(shape), {"converged": res.converged, "iterations": res.iterations,
                                      "residual": res.residual}

    def _diagnose(self, xs: tuple, y: Tensor, ctx: dict) -> Diagnostics:
        b = y.shape[0]
        with torch.no_grad():
            yf = y.reshape(b, -1)
            residual = _norm(self._flat_F(_detach_all(xs), y.shape)(yf))
        converged = ctx.get("converged")
        is_root = residual <= self._check_tol(y.dtype)
        iterations = ctx.get("iterations")
        if iterations is None:
            iterations = torch.zeros(b, dtype=torch.long, device=y.device)
        diag = Diagnostics(residual=residual, constraint_violation=torch.zeros_like(residual),
                           converged=is_root if converged is None else converged & is_root, iterations=iterations)
        bad = ~diag.converged
        if bool(bad.any()) and self.on_failure != "ignore":
            source = "Newton" if converged is not None else "the solver"
            msg = (f"{type(self).__name__}: {source} did not find a root at batch elements {element_list(bad)} "
                   f"(||F(y)|| up to {float(residual[bad].max()):.3g}); gradients there are not reliable")
            diag.messages = [msg]
            report(self.on_failure, msg, ConvergenceWarning, stacklevel=5)
        return diag

    # ---- backward -----------------------------------------------------------------------------------------------
    def _implicit_gradient(self, xs: tuple, y: Tensor, v: Tensor, ctx: Optional[dict], need: list
                           ) -> tuple[Optional[Tensor], ...]:
        r"""``(∂F/∂x_i)ᵀ u`` with ``(∂F/∂y)ᵀ u = -v`` for the floating-point tensor inputs with ``need[i]``
        (``None`` for the others); :meth:`gradient` and the autograd backward call it."""
        if not any(need):
            return (None,) * len(xs)
        if v.shape != y.shape:
            raise DDNError(f"{type(self).__name__}: incoming gradient has shape {tuple(v.shape)} but y has shape "
                           f"{tuple(y.shape)}")
        method = self.backward_method
        if method == "auto":
            method = "dense" if y[0].numel() <= self.dense_max else "gmres"
        return _implicit_vjp(self, self.optimality, "root", method, xs, y, -v.to(y.dtype), "(∂F/∂y)ᵀ u = -v",
                             "∂F/∂y is singular at the root (the implicit function theorem does not apply)",
                             need=need, tol=self.linear_tol, max_iter=self.linear_max_iter)


class _CustomRootNode(RootNode):
    """A :class:`RootNode` built from an optimality function and an arbitrary solver (see :func:`custom_root`)."""

    def __init__(self, optimality: Callable[..., Tensor], solver: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._optimality = optimality
        self._solver = solver

    def optimality(self, *xs: Any, y: Tensor) -> Tensor:
        return self._optimality(*xs, y)

    def solve(self, *xs: Any) -> tuple[Tensor, Optional[dict]]:
        with torch.no_grad():
            xs = _detach_all(xs)
            y = self._solver(*xs)
            like = next((x for x in xs if isinstance(x, Tensor) and x.is_floating_point()), None)
            if not isinstance(y, Tensor):
                y = torch.as_tensor(np.asarray(y))
            if like is not None and y.is_floating_point():
                y = y.to(dtype=like.dtype, device=like.device)
            name = getattr(self._solver, "__name__", "solver")
            y = _check_y(y, f"custom_root solver {name!r}")
        return y, None


def custom_root(optimality: Callable[..., Tensor], *, backward: str = "auto", backward_tol: Optional[float] = None,
                backward_max_iter: Optional[int] = None, dense_max: int = 64, check_tol: Optional[float] = None,
                on_failure: str = "warn") -> Callable[[Callable[..., Any]], Callable[..., Tensor]]:
    r"""Decorator: make any root solver differentiable by the implicit function theorem.

    ``optimality(*xs, y)`` returns the residual ``F`` (same shape as ``y``), zero at the solution; the decorated
    ``solver(*xs)`` returns ``y`` (a tensor or NumPy array of shape ``(b, ...)``) by any means: bisection, SciPy, a
    Python loop. It is called on detached inputs without autograd. The returned function ``f(*xs)`` gives the same
    ``y`` with gradients ``Dy = -(∂F/∂y)⁻¹ ∂F/∂x`` for every floating-point tensor input (see :class:`RootNode`
    for the backward options and its cost: one adjoint solve and one VJP of ``F``).

    Example::

        @custom_root(lambda x, y: y ** 2 - x)
        def sqrt(x):                      # bisection, batched
            lo, hi = torch.zeros_like(x), x.clamp_min(1.0)
            for _ in range(60):
                mid = (lo + hi) / 2
                lo, hi = torch.where(mid * mid < x, mid, lo), torch.where(mid * mid < x, hi, mid)
            return (lo + hi) / 2

        y = sqrt(x)                       # differentiable: dy/dx = 1 / (2 y)

    The node is available as ``f.node``; its :attr:`diagnostics` hold the per-element ``||F(y)||`` of the last
    call and, after a backward, the adjoint solve's residuals and non-regular flags.
    """
    if not callable(optimality):
        raise TypeError("custom_root(optimality): optimality must be callable F(*xs, y)")

    def decorator(solver: Callable[..., Any]) -> Callable[..., Tensor]:
        node = _CustomRootNode(optimality, solver, backward=backward, backward_tol=backward_tol,
                               backward_max_iter=backward_max_iter, dense_max=dense_max, check_tol=check_tol,
                               on_failure=on_failure)

        @functools.wraps(solver)
        def wrapper(*xs: Any) -> Tensor:
            return DeclarativeFunction.apply(node, *xs)

        wrapper.node = node  # type: ignore[attr-defined]
        return wrapper

    return decorator
