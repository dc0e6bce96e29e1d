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
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from torchddn.backward import Implicit, as_backward
from torchddn.diagnostics import ConvergenceWarning, DDNError, Diagnostics, element_list, report
from torchddn.implicit.root import attach_root, check_y, detach_all, flat_map, root_tangent, root_vjp
from torchddn.linalg import dense_solve_general, gmres  # noqa: F401  (re-exported)
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

    def __init__(self, *, tol: Optional[float] = None, max_iter: int = 50, backward: Any = "auto",
                 backward_tol: Optional[float] = None, backward_max_iter: Optional[int] = None, dense_max: int = 64,
                 check_tol: Optional[float] = None, on_failure: str = "warn", check_inputs: bool = True,
                 shared_inputs: Optional[Sequence[int]] = None) -> None:
        rule = as_backward(backward)
        if not isinstance(rule, Implicit):
            raise ValueError(f"root nodes take backward=Implicit(solver) (or a linear solver, or one of 'auto', "
                             f"'dense', 'gmres', 'minres', 'bicgstab'); got {rule!r}")
        super().__init__(tol=tol, max_iter=max_iter, linear_tol=backward_tol, linear_max_iter=backward_max_iter,
                         dense_max=dense_max, check_tol=check_tol, on_failure=on_failure, check_inputs=check_inputs,
                         backward=rule, shared_inputs=shared_inputs)
        self.backward_method = rule.solver

    # ---- user hooks ---------------------------------------------------------------------------------------------
    def optimality(self, *xs: Any, y: Tensor) -> Tensor:
        """The root function ``F(*xs, y)``, same shape as ``y``; ``y`` is a root when it is zero."""
        raise NotImplementedError(f"{type(self).__name__} must define optimality(self, *xs, y)")

    def initial_guess(self, *xs: Any) -> Tensor:
        """Starting point ``(b, ...)`` for the built-in Newton solver; fixes the shape of ``y``."""
        raise NotImplementedError(f"{type(self).__name__} must define solve(self, *xs) or initial_guess(self, *xs)")

    # ---- forward ------------------------------------------------------------------------------------------------
    def _flat_F(self, xs: tuple, shape: torch.Size) -> FlatMap:
        return flat_map(lambda y: self._F(*xs, y=y), shape, f"{type(self).__name__}.optimality")

    # ---- tuple solutions: (u, nu) and the like are concatenated into one flat (b, m) solution ----------------------
    def _pack(self, y: Any) -> Tensor:
        """A tuple (or list) solution ``(y_1, ..., y_k)``, each ``(b, ...)``, as one ``(b, m)`` tensor; the part
        shapes are remembered by the total size ``m``. A tensor passes through."""
        if isinstance(y, Tensor):
            return y
        if not isinstance(y, (tuple, list)) or not y or not all(isinstance(t, Tensor) for t in y):
            raise DDNError(f"{type(self).__name__}: a solution must be a tensor or a tuple of tensors, got "
                           f"{type(y).__name__}")
        b = y[0].shape[0] if y[0].dim() else None
        if b is None or any(t.dim() == 0 or t.shape[0] != b for t in y):
            raise DDNError(f"{type(self).__name__}: every part of a tuple solution needs the leading batch "
                           f"dimension; got shapes {[tuple(t.shape) for t in y]}")
        dtype = torch.promote_types(y[0].dtype, y[-1].dtype)
        flat = torch.cat([t.reshape(b, -1).to(dtype) for t in y], 1)
        parts = getattr(self, "_tuple_parts", None)
        if parts is None:
            parts = self._tuple_parts = {}
        parts[flat.shape[1]] = tuple(tuple(t.shape[1:]) for t in y)
        return flat

    def _parts_of(self, y: Tensor) -> Optional[tuple]:
        parts = getattr(self, "_tuple_parts", None)
        if not parts or y.dim() != 2:
            return None
        return parts.get(y.shape[1])

    def _unpack(self, y: Tensor) -> Any:
        """The inverse of :meth:`_pack` (differentiable views): the tuple for a packed solution, else ``y``."""
        shapes = self._parts_of(y)
        if shapes is None:
            return y
        sizes = [int(torch.Size(sh).numel()) for sh in shapes]
        return tuple(p.reshape(y.shape[0], *sh) for p, sh in zip(torch.split(y, sizes, 1), shapes))

    def _F(self, *xs: Any, y: Tensor) -> Tensor:
        """``optimality`` on the packed solution: a tuple residual is packed the same way."""
        if self._parts_of(y) is None:
            return self.optimality(*xs, y=y)
        out = self.optimality(*xs, y=self._unpack(y))
        if isinstance(out, Tensor):
            return out
        return torch.cat([t.reshape(y.shape[0], -1) for t in out], 1)

    def _output(self, y: Tensor) -> Any:
        return self._unpack(y)

    def _solve_packed(self, *xs: Any) -> Any:
        out = self.solve(*xs)
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], (tuple, list)):
            return self._pack(tuple(out[0])), out[1]
        return out

    def solve(self, *xs: Any) -> tuple[Tensor, dict]:
        """Find ``y`` with ``F(*xs, y) = 0`` by damped Newton from :meth:`initial_guess`: returns ``(y, ctx)`` with
        the per-element ``converged``, ``iterations`` and ``residual`` (``||F(y)||``)."""
        with torch.no_grad():
            xs = detach_all(xs)
            y0 = check_y(self._pack(self.initial_guess(*xs)), f"{type(self).__name__}.initial_guess")
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
            residual = _norm(self._flat_F(detach_all(xs), y.shape)(yf))
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
        return root_vjp(self, self._F, "root", self._method(y), xs, y, -v.to(y.dtype), *_ROOT_TEXT,
                             need=need, cache=(ctx or {}).get("_cache"), key=v, sign=-1.0, tol=self.linear_tol,
                             max_iter=self.linear_max_iter)

    def _method(self, y: Tensor) -> Any:
        """The adjoint solve: ``"auto"`` is dense LU up to ``dense_max`` unknowns, else MINRES where ``∂F/∂y`` is
        symmetric (probed once per solve) and GMRES otherwise."""
        method = self.backward_method
        if isinstance(method, str) and method == "auto" and y[0].numel() <= self.dense_max:
            return "dense"
        return method

    def _attach(self, xs: tuple, y: Tensor, ctx: dict) -> Tensor:
        return attach_root(self, self._F, "root", self._method(y), xs, y, ctx, *_ROOT_TEXT,
                            tol=self.linear_tol, max_iter=self.linear_max_iter)

    def _implicit_jvp(self, xs: tuple, y: Tensor, tangents: tuple, ctx: Optional[dict]) -> Tensor:
        """Forward mode: ``dy = -(∂F/∂y)⁻¹ ∂F/∂x dx``."""
        return root_tangent(self, self._F, "root", self._method(y), xs, y, tangents,
                                 tol=self.linear_tol, max_iter=self.linear_max_iter)


_ROOT_TEXT = ("(∂F/∂y)ᵀ u = -v", "∂F/∂y is singular at the root (the implicit function theorem does not apply)")


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
            xs = detach_all(xs)
            y = self._solver(*xs)
            like = next((x for x in xs if isinstance(x, Tensor) and x.is_floating_point()), None)

            def as_tensor(t: Any) -> Tensor:
                if not isinstance(t, Tensor):
                    t = torch.as_tensor(np.asarray(t))
                if like is not None and t.is_floating_point():
                    t = t.to(dtype=like.dtype, device=like.device)
                return t

            y = tuple(as_tensor(t) for t in y) if isinstance(y, (tuple, list)) else as_tensor(y)
            name = getattr(self._solver, "__name__", "solver")
            y = check_y(self._pack(y), f"custom_root solver {name!r}")
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
