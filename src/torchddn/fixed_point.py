"""Fixed-point (deep equilibrium) nodes: ``y = T(x, y)``, differentiated implicitly.

The output of a :class:`FixedPointNode` is a fixed point ``y*`` of a user map ``T(*xs, y)``. Writing the fixed
point as the root of ``F(x, y) = y - T(x, y)``, the implicit function theorem gives

    Dy = (I - ∂T/∂y)⁻¹ ∂T/∂x,

so the vector-Jacobian product needed by autograd is ``grad_x = (∂T/∂x)ᵀ u`` with ``u`` solving the adjoint
system ``(I - ∂T/∂y)ᵀ u = v``. This module provides, all batched over the leading dimension and matrix-free:

* forward solvers :func:`anderson`, :func:`broyden` and :func:`picard` for ``z = f(z)`` on ``(b, n)`` tensors;
* :func:`gmres` (restarted, per-element convergence) and :func:`dense_solve_general` (LU with a minimum-norm
  fallback) for non-symmetric linear systems;
* :class:`FixedPointNode`, a declarative node whose backward solves the adjoint system with GMRES, a fixed-point
  (Neumann) iteration, a dense LU, or the phantom gradient of Geng et al. (2021): ``k`` steps of the damped
  Neumann iteration, i.e. the exact gradient of ``k`` damped unrolled steps started at ``y*``;
* :func:`fixed_point`, the functional form.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor

from torchddn.diagnostics import (ConvergenceWarning, DDNError, Diagnostics, element_list,
                                  report)
from torchddn.function import DeclarativeFunction
from torchddn.implicit.root import attach_root, check_y, detach_all, flat_map, root_tangent, root_vjp
from torchddn.linalg import dense_solve_general, gmres, neumann  # noqa: F401  (re-exported)
from torchddn.backward import Implicit, JacobianFree, Phantom, Truncated, Unrolled, as_backward
from torchddn.node import DeclarativeNode
from torchddn.solvers.fixed_point import (FORWARD_SOLVERS, anderson, broyden, default_tol, fp_residual, picard)

_fp_residual = fp_residual

FlatMap = Callable[[Tensor], Tensor]

__all__ = ["FixedPointNode", "fixed_point", "anderson", "broyden", "picard", "gmres", "dense_solve_general",
           "neumann", "FORWARD_SOLVERS", "BACKWARD_SOLVERS"]


# forward solvers for z = f(z) (anderson, broyden, picard) live in torchddn.solvers.fixed_point, the one registry
# of forward solvers; they are re-exported here


# ----------------------------------------------------------------------------------------------------------------
# non-symmetric batched linear solves: they live in torchddn.linalg and are re-exported here
# ----------------------------------------------------------------------------------------------------------------

BACKWARD_SOLVERS = ("gmres", "fixed_point", "dense", "auto", "minres", "bicgstab")


# ----------------------------------------------------------------------------------------------------------------
# the node
# ----------------------------------------------------------------------------------------------------------------

class FixedPointNode(DeclarativeNode):
    r"""Deep equilibrium node: ``y`` is a fixed point ``y = T(*xs, y)``.

    Subclass and define

    * ``T(self, *xs, y)``: batched, ``xs`` of shape ``(b, ...)``, ``y`` of shape ``(b, ...)``; returns a tensor
      with ``y``'s shape. Only the floating-point tensor inputs receive gradients, so pass weights as inputs
      (expanded to the batch, e.g. ``W.expand(b, n, n)``: every tensor input has the leading batch dimension).
    * ``initial_guess(self, *xs)``: ``y0`` of shape ``(b, ...)``; it fixes ``y``'s shape.

    Use it as ``DeclarativeLayer(node)(*xs)`` (an ``nn.Module``) or through :func:`fixed_point`.

    Gradient: with ``J_y = ∂T/∂y`` and ``J_x = ∂T/∂x`` at the fixed point, ``Dy = (I - J_y)⁻¹ J_x``. The backward
    solves the adjoint system ``(I - J_y)ᵀ u = v`` matrix-free with vector-Jacobian products of ``T`` and returns
    ``J_xᵀ u`` by one more VJP. It requires ``I - J_y`` to be invertible (e.g. ``T`` contractive in ``y``); where
    it is singular the least-squares solution is used and a :class:`~torchddn.diagnostics.NonRegularWarning` names
    the elements. The adjoint solve is itself differentiated implicitly, so double backward and ``torch.func``
    transforms (``vmap``, ``jacrev``) are exact; the phantom gradient is first-order only.

    Args:
        forward_solver: ``"anderson"`` (default), ``"broyden"``, ``"picard"`` or a callable
            ``solver(f, z0, tol=, max_iter=, damping=) -> SolverResult`` on flat ``(b, n)`` tensors.
        tol: forward tolerance on ``||T(y) - y|| / (1 + ||T(y)||)`` per element (default ``1e-10`` in float64,
            ``~1e-5`` in float32).
        max_iter: forward iterations.
        backward_solver: ``"gmres"`` (default; restarted, ``O(b n restart)`` memory, one VJP per step),
            ``"fixed_point"`` (the Neumann iteration ``u <- v + J_yᵀ u``, damped; needs ``T`` contractive),
            or ``"dense"`` (``n`` VJPs to form ``J_y``, LU with a least-squares fallback; small ``n`` only).
        phantom: ``None`` (exact gradient) or ``k``: the phantom gradient, ``k`` steps of the damped Neumann
            iteration ``u <- (1 - damping) u + damping (v + J_yᵀ u)`` from ``u = 0``, which is the exact gradient of
            ``k`` damped unrolled steps ``y <- (1 - damping) y + damping T(x, y)`` started at ``y*``. Cost ``k + 1``
            VJPs; it converges to the exact gradient as ``k`` grows when the iteration is contractive.
        damping: relaxation in ``(0, 1]`` for the Picard and Anderson mixing, the Broyden initial inverse Jacobian,
            the Neumann iteration and the phantom gradient.
        memory: history size of Anderson (default 5) or Broyden (default 30).
        backward_tol, backward_max_iter, backward_restart: for the iterative backward solves.
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` on non-convergence of the forward or backward solve.
        check_inputs: check batch sizes and NaN/Inf of the inputs and the output.

    After a call :attr:`diagnostics` holds the per-element fixed-point residual, convergence flags and iterations,
    and after a backward the linear solve's relative residual, iterations and non-regular flags.
    """

    def __init__(self, *, forward_solver: Any = "anderson", tol: Optional[float] = None, max_iter: int = 500,
                 backward_solver: str = "gmres", phantom: Optional[int] = None, damping: float = 1.0,
                 memory: Optional[int] = None, backward_tol: Optional[float] = None,
                 backward_max_iter: Optional[int] = None, backward_restart: Optional[int] = None,
                 on_failure: str = "warn", check_inputs: bool = True, backward: Any = None,
                 shared_inputs: Optional[Sequence[int]] = None) -> None:
        super().__init__(tol=tol, max_iter=max_iter, on_failure=on_failure, check_inputs=check_inputs,
                         linear_tol=backward_tol, linear_max_iter=backward_max_iter, shared_inputs=shared_inputs)
        if not callable(forward_solver) and forward_solver not in FORWARD_SOLVERS:
            raise ValueError(f"forward_solver must be one of {sorted(FORWARD_SOLVERS)} or a callable, got "
                             f"{forward_solver!r}")
        if backward is not None:
            rule = as_backward(backward)
            if isinstance(rule, Implicit):
                backward_solver = "gmres" if rule.solver == "auto" else rule.solver
            elif isinstance(rule, Phantom):
                phantom, damping = rule.steps, rule.damping
            elif isinstance(rule, JacobianFree):
                phantom, damping = 1, 1.0  # u = v: the Jacobian-free backward of Fung et al.
            elif isinstance(rule, Truncated):
                phantom = rule.steps  # the exact gradient of `steps` damped iterations started at y*
            elif isinstance(rule, Unrolled):
                self.backward = "unrolled"
                self.unroll_steps = rule.steps
        if isinstance(backward_solver, str) and backward_solver not in BACKWARD_SOLVERS:
            raise ValueError(f"backward_solver must be one of {BACKWARD_SOLVERS} or a torchddn.linalg solver, got "
                             f"{backward_solver!r}")
        if phantom is not None and (int(phantom) != phantom or phantom < 1):
            raise ValueError(f"phantom must be None or a positive number of steps, got {phantom!r}")
        if not 0.0 < float(damping) <= 1.0:
            raise ValueError(f"damping must be in (0, 1], got {damping!r}")
        self.forward_solver = forward_solver
        self.backward_solver = backward_solver
        self.phantom = None if phantom is None else int(phantom)
        self.damping = float(damping)
        self.memory = memory
        self.backward_restart = backward_restart
        if self.backward != "unrolled":
            self.backward_rule = Phantom(self.phantom, self.damping) if self.phantom is not None else \
                Implicit(backward_solver)

    def _unrolled_forward(self, *xs: Any) -> Tensor:
        """``backward=Unrolled(steps)``: autograd through ``steps`` damped Picard iterations from the initial
        guess (default ``max_iter``)."""
        self._check_batch(xs)
        detached = detach_all(xs)
        with torch.no_grad():
            y = check_y(self.initial_guess(*detached), f"{type(self).__name__}.initial_guess").detach()
        steps = self.max_iter if self.unroll_steps is None else int(self.unroll_steps)
        for _ in range(steps):
            y = (1.0 - self.damping) * y + self.damping * self.T(*xs, y=y)
        return y

    # ---- user hooks ---------------------------------------------------------------------------------------------
    def T(self, *xs: Any, y: Tensor) -> Tensor:
        """The map ``T(*xs, y)``, batched, returning a tensor with ``y``'s shape."""
        raise NotImplementedError(f"{type(self).__name__} must define T(self, *xs, y)")

    def initial_guess(self, *xs: Any) -> Tensor:
        """Starting point ``y0`` of shape ``(b, ...)``; fixes ``y``'s shape."""
        raise NotImplementedError(f"{type(self).__name__} must define initial_guess(self, *xs) returning y0 of "
                                  f"shape (b, ...)")

    # ---- forward ------------------------------------------------------------------------------------------------
    def _flat_T(self, xs: tuple, shape: torch.Size) -> FlatMap:
        return flat_map(lambda y: self.T(*xs, y=y), shape, f"{type(self).__name__}.T")

    def solve(self, *xs: Any) -> tuple[Tensor, dict]:
        """Find the fixed point with the forward solver from :meth:`initial_guess`: returns ``(y, ctx)`` with
        ``ctx`` holding the per-element ``converged``, ``iterations`` and ``residual``."""
        with torch.no_grad():
            xs = detach_all(xs)
            y0 = check_y(self.initial_guess(*xs), f"{type(self).__name__}.initial_guess")
            shape = y0.shape
            f = self._flat_T(xs, shape)
            solver = self.forward_solver if callable(self.forward_solver) else FORWARD_SOLVERS[self.forward_solver]
            kwargs: dict = {"tol": self.tol, "max_iter": self.max_iter, "damping": self.damping}
            if self.memory is not None:
                kwargs["memory"] = self.memory
            res = solver(f, y0.reshape(shape[0], -1), **kwargs)
        return res.y.reshape(shape), {"converged": res.converged, "iterations": res.iterations,
                                      "residual": res.residual}

    def _diagnose(self, xs: tuple, y: Tensor, ctx: dict) -> Diagnostics:
        b = y.shape[0]
        if ctx.get("residual") is None:
            with torch.no_grad():
                f = self._flat_T(detach_all(xs), y.shape)
                yf = y.reshape(b, -1)
                ctx["residual"] = _fp_residual(f(yf), yf)
        residual = ctx["residual"]
        tol = default_tol(y.dtype) if self.tol is None else self.tol
        converged = ctx.get("converged")
        if converged is None:
            converged = residual <= tol
        iterations = ctx.get("iterations")
        if iterations is None:
            iterations = torch.zeros(b, dtype=torch.long, device=y.device)
        diag = Diagnostics(residual=residual, constraint_violation=torch.zeros_like(residual), converged=converged,
                           iterations=iterations)
        if not bool(converged.all()) and self.on_failure != "ignore":
            bad = ~converged
            msg = (f"{type(self).__name__}: the fixed-point iteration ({self._solver_name()}) did not converge at "
                   f"batch elements {element_list(bad)} (relative residual ||T(y) - y|| / (1 + ||T(y)||) up to "
                   f"{float(residual[bad].max()):.3g} after {self.max_iter} iterations, tolerance {tol:.1g}); the "
                   f"best iterate is returned and gradients there are not reliable")
            diag.messages = [msg]
            report(self.on_failure, msg, ConvergenceWarning, stacklevel=5)
        return diag

    def _solver_name(self) -> str:
        fs = self.forward_solver
        return fs if isinstance(fs, str) else getattr(fs, "__name__", type(fs).__name__)

    # ---- backward -----------------------------------------------------------------------------------------------
    def _implicit_gradient(self, xs: tuple, y: Tensor, v: Tensor, ctx: Optional[dict], need: list
                           ) -> tuple[Optional[Tensor], ...]:
        r"""``J_xᵀ u`` with ``(I - J_y)ᵀ u = v`` for the floating-point tensor inputs with ``need[i]`` (``None``
        for the others); :meth:`gradient` and the autograd backward call it."""
        if not any(need):
            return (None,) * len(xs)
        if v.shape != y.shape:
            raise DDNError(f"{type(self).__name__}: incoming gradient has shape {tuple(v.shape)} but y has shape "
                           f"{tuple(y.shape)}")
        method, opts = self._backward_options()
        return root_vjp(self, self.T, "fixed_point", method, xs, y, v.to(y.dtype), *_FP_TEXT, need=need,
                             cache=(ctx or {}).get("_cache"), key=v, sign=1.0, damping=self.damping, **opts)

    def _backward_options(self) -> tuple[str, dict]:
        if self.phantom is not None:
            return "phantom", {"steps": self.phantom}
        return self.backward_solver, {"tol": self.linear_tol, "max_iter": self.linear_max_iter,
                                      "restart": self.backward_restart}

    def _attach(self, xs: tuple, y: Tensor, ctx: dict) -> Tensor:
        method, opts = self._backward_options()
        return attach_root(self, self.T, "fixed_point", method, xs, y, ctx, *_FP_TEXT, damping=self.damping,
                            **opts)

    def _implicit_jvp(self, xs: tuple, y: Tensor, tangents: tuple, ctx: Optional[dict]) -> Tensor:
        """Forward mode: ``dy = (I - ∂T/∂y)⁻¹ ∂T/∂x dx``."""
        method, opts = self._backward_options()
        if method == "phantom":
            method, opts = "gmres", {"tol": self.linear_tol, "max_iter": self.linear_max_iter}
        return root_tangent(self, self.T, "fixed_point", method, xs, y, tangents, damping=self.damping,
                                 **opts)


_FP_TEXT = ("(I - ∂T/∂y)ᵀ u = v", "I - ∂T/∂y is singular (T is not contractive at the fixed point; the implicit "
            "function theorem does not apply)")


class _FunctionalFixedPointNode(FixedPointNode):
    """A :class:`FixedPointNode` from a plain function ``T(*xs, y)`` and a starting point (see :func:`fixed_point`)."""

    def __init__(self, T: Callable[..., Tensor], y0: Any, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._T = T
        self._y0 = y0

    def T(self, *xs: Any, y: Tensor) -> Tensor:  # noqa: N802
        return self._T(*xs, y)

    def initial_guess(self, *xs: Any) -> Tensor:
        return self._y0(*xs) if callable(self._y0) else self._y0


def fixed_point(T: Callable[..., Tensor], *xs: Any, y0: Any, **options: Any) -> Tensor:
    r"""Differentiable fixed point ``y = T(*xs, y)`` (functional form of :class:`FixedPointNode`).

    Args:
        T: ``T(*xs, y) -> (b, ...)``, batched, same shape as ``y``.
        xs: inputs with a leading batch dimension ``b``; floating-point tensors receive gradients
            ``J_xᵀ (I - J_y)⁻ᵀ v``.
        y0: starting point ``(b, ...)`` (a tensor, or a callable ``y0(*xs)``).
        options: any :class:`FixedPointNode` argument (``forward_solver``, ``tol``, ``backward_solver``,
            ``phantom``, ...).

    Returns:
        ``y`` of ``y0``'s shape. Cost: the forward solver's iterations (no graph is kept) and, in the backward, one
        adjoint solve plus one VJP of ``T``.
    """
    node = _FunctionalFixedPointNode(T, y0, **options)
    return DeclarativeFunction.apply(node, *xs)
