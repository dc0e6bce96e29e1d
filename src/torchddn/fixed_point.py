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

import math
import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import vjp

from torchddn.diagnostics import (ConvergenceWarning, DDNError, Diagnostics, NonRegularWarning, element_list,
                                  report)
from torchddn.function import DeclarativeFunction
from torchddn.implicit import AttachImplicit, ImplicitRule, fold_vmap, is_live
from torchddn.linalg import (GMRES, MINRES, BiCGStab, LinearOperator, LinearSolveInfo, dense_solve_general, gmres,
                             neumann)
from torchddn.linalg import solve as linalg_solve
from torchddn.backward import Implicit, JacobianFree, Phantom, Truncated, Unrolled, as_backward
from torchddn.node import DeclarativeNode
from torchddn.solvers.base import SolverResult
from torchddn.autodiff import batch_jacobian
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
# shared node machinery (also used by torchddn.root)
# ----------------------------------------------------------------------------------------------------------------

def _detach_all(xs: Sequence[Any]) -> tuple:
    return tuple(x.detach() if isinstance(x, Tensor) else x for x in xs)


def _check_y(y: Any, name: str) -> Tensor:
    """``y`` must be a finite floating tensor with a leading batch dimension."""
    if not isinstance(y, Tensor):
        raise DDNError(f"{name} must return a tensor of shape (b, ...), got {type(y).__name__}")
    if y.dim() < 1 or not y.is_floating_point():
        raise DDNError(f"{name} must return a floating point tensor of shape (b, ...), got shape {tuple(y.shape)} "
                       f"and dtype {y.dtype}")
    bad = ~torch.isfinite(y.reshape(y.shape[0], -1)).all(dim=1)
    if bool(bad.any()):
        raise DDNError(f"{name} returned NaN or Inf at batch elements {element_list(bad)}")
    return y


def _flat_map(fn: Callable[[Tensor], Tensor], shape: torch.Size, name: str) -> FlatMap:
    """Wrap ``fn: (b, ...) -> (b, ...)`` (same shape as its argument) as a map on flat ``(b, m)`` tensors."""
    b = shape[0]

    def flat(zf: Tensor) -> Tensor:
        out = fn(zf.reshape(shape))
        if not isinstance(out, Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DDNError(f"{name} must return a tensor with the shape of y, {tuple(shape)}, but returned {got}")
        return out.reshape(b, -1)

    return flat


def _input_vjp(fn: Callable[..., Tensor], xs: tuple, u: Tensor, need: Optional[Sequence[bool]] = None) -> tuple:
    """``(∂fn/∂x_i)ᵀ u`` for the floating-point tensor inputs of ``fn(*xs)`` (one VJP) where ``need[i]``, ``None``
    for the others."""
    pos = [i for i, x in enumerate(xs) if isinstance(x, Tensor) and x.is_floating_point() and
           (need is None or need[i])]
    grads: list = [None] * len(xs)
    if not pos:
        return tuple(grads)

    def fn_t(*t: Tensor) -> Tensor:
        full = list(xs)
        for i, ti in zip(pos, t):
            full[i] = ti
        return fn(*full)

    _, pullback = vjp(fn_t, *[xs[i] for i in pos])
    for i, g in zip(pos, pullback(u)):
        grads[i] = g
    return tuple(grads)


class _ImplicitOp:
    """The linear operator of an implicit backward at ``theta = (y, xs)``, for a flat map ``G(tensors, yf)``:
    ``A = I - ∂G/∂y`` (``kind="fixed_point"``, ``G = T``) or ``A = ∂G/∂y`` (``kind="root"``, ``G = F``).

    ``solve(transpose, rhs, yf, tensors)`` solves ``Aᵀ z = rhs`` (VJPs) or ``A z = rhs`` (JVPs) with ``method``
    ``"gmres"``, ``"dense"``, ``"fixed_point"`` (Neumann; fixed-point kind only) or ``"phantom"``.
    """

    def __init__(self, G: Callable[[Sequence[Tensor], Tensor], Tensor], kind: str, method: str, *,
                 tol: Optional[float] = None, max_iter: Optional[int] = None, restart: Optional[int] = None,
                 damping: float = 1.0, steps: Optional[int] = None) -> None:
        self.G, self.kind, self.method = G, kind, method
        self.tol, self.max_iter, self.restart = tol, max_iter, restart
        self.damping, self.steps = damping, steps
        self.infos: list[LinearSolveInfo] = []

    def matvec(self, tensors: Sequence[Tensor], yf: Tensor, z: Tensor) -> Tensor:
        """``A z`` (one JVP of ``G``), differentiable in ``tensors``, ``yf`` and ``z``."""
        jz = torch.func.jvp(lambda t: self.G(tensors, t), (yf,), (z,))[1]
        return z - jz if self.kind == "fixed_point" else jz

    def solve(self, transpose: bool, rhs: Tensor, yf: Tensor, tensors: Sequence[Tensor]
              ) -> tuple[Tensor, LinearSolveInfo]:
        G = lambda t: self.G(tensors, t)  # noqa: E731
        fp = self.kind == "fixed_point"
        if self.method == "dense":
            _, J = batch_jacobian(G, yf)
            A = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device) - J if fp else J
            return dense_solve_general(A.transpose(1, 2) if transpose else A, rhs)
        if transpose:
            _, pullback = vjp(G, yf)
            jmv = lambda z: pullback(z)[0]  # noqa: E731
        else:
            jmv = lambda z: torch.func.jvp(G, (yf,), (z,))[1]  # noqa: E731
        if self.method == "gmres":
            mv = (lambda z: z - jmv(z)) if fp else jmv
            return gmres(mv, rhs, tol=self.tol, restart=self.restart, max_iter=self.max_iter)
        if self.method == "phantom":
            return neumann(jmv, rhs, damping=self.damping, steps=self.steps)
        if self.method == "fixed_point":
            return neumann(jmv, rhs, tol=self.tol, damping=self.damping,
                           max_iter=500 if self.max_iter is None else self.max_iter)
        mv = (lambda z: z - jmv(z)) if fp else jmv
        method = self.method
        symmetric = True
        if isinstance(method, str) and method == "auto":
            # symmetric systems (e.g. F = grad f: the Hessian) take MINRES, others GMRES
            symmetric = bool(_is_symmetric(G, yf, fp).all())
            method = MINRES() if symmetric else GMRES(restart=self.restart)
        elif isinstance(method, (GMRES, BiCGStab)) or (isinstance(method, str) and method in ("bicgstab",)):
            symmetric = False
        op = LinearOperator(mv, rhs.shape[-1], symmetric=symmetric, psd=False)
        x, info = linalg_solve(op, rhs, method, self.tol, self.max_iter)
        return x, info


def _is_symmetric(G: Callable[[Tensor], Tensor], yf: Tensor, fp: bool) -> Tensor:
    """Per element, whether ``∂G/∂y`` is symmetric: ``uᵀ J w = wᵀ J u`` for two random probes, to a relative
    ``sqrt(eps)``. Cost: one JVP and one VJP."""
    g = torch.Generator(device="cpu").manual_seed(0)
    u = torch.randn(yf.shape, generator=g, dtype=yf.dtype).to(yf.device)
    w = torch.randn(yf.shape, generator=g, dtype=yf.dtype).to(yf.device)
    jw = torch.func.jvp(G, (yf,), (w,))[1]
    _, pullback = vjp(G, yf)
    jtu = pullback(u)[0]
    a, b = (u * jw).sum(-1), (w * jtu).sum(-1)
    scale = (u.norm(dim=-1) * jw.norm(dim=-1) + w.norm(dim=-1) * jtu.norm(dim=-1)).clamp_min(
        torch.finfo(yf.dtype).tiny)
    return (a - b).abs() <= torch.finfo(yf.dtype).eps ** 0.5 * scale


class _ImplicitLinearSolve(torch.autograd.Function):
    """``z = A(theta)^{-T} rhs`` (``transpose=True``) or ``A(theta)^{-1} rhs``, differentiable to any order.

    With ``a`` the solve with the other transpose of the incoming gradient, ``rhs_bar = a`` and
    ``theta_bar = -∂/∂theta [lᵀ A(theta) r]`` with ``(l, r) = (z, a)`` for the transposed solve and ``(a, z)``
    otherwise. Under ``torch.func.vmap`` the vmapped dimension is folded into the batch.
    """

    @staticmethod
    def forward(op: _ImplicitOp, transpose: bool, rhs: Tensor, yf: Tensor, *tensors: Tensor) -> Tensor:
        z, info = op.solve(transpose, rhs, yf, tensors)
        op.infos.append(info)
        return z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        op, transpose, rhs, yf, *tensors = inputs
        ctx.op, ctx.transpose = op, transpose
        ctx.save_for_backward(output, yf, *tensors)

    @staticmethod
    def backward(ctx: Any, zbar: Tensor) -> tuple:
        z, yf, *tensors = ctx.saved_tensors
        op: _ImplicitOp = ctx.op
        if op.method == "phantom":
            raise DDNError("the phantom gradient is first-order only; use phantom=None for higher derivatives")
        a = _ImplicitLinearSolve.apply(op, not ctx.transpose, zbar, yf, *tensors)
        left, right = (z, a) if ctx.transpose else (a, z)
        need = ctx.needs_input_grad
        idx = [i for i in range(len(tensors)) if need[4 + i]]
        grads: list = [None, None, a if need[2] else None, None] + [None] * len(tensors)
        if need[3] or idx:
            def q(y_: Tensor, *ts: Tensor) -> Tensor:
                full = list(tensors)
                for i, t in zip(idx, ts):
                    full[i] = t
                return -(left * op.matvec(full, y_, right)).sum()

            gs = torch.func.grad(q, argnums=tuple(range(1 + len(idx))))(yf, *[tensors[i] for i in idx])
            grads[3] = gs[0] if need[3] else None
            for i, g in zip(idx, gs[1:]):
                grads[4 + i] = g
        return tuple(grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, op: _ImplicitOp, transpose: bool, *args: Any) -> tuple:
        return fold_vmap(lambda *a: _ImplicitLinearSolve.apply(op, transpose, *a), info, in_dims[2:], args)


def _residual_map(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, xs: tuple, shape: torch.Size,
                  pos: Sequence[int]) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
    """``G(tensors, yf)``: ``fn(*xs, y)`` on flat ``y`` with the tensor inputs at ``pos`` replaced by ``tensors``."""

    def G(tensors: Sequence[Tensor], yf: Tensor) -> Tensor:
        full = list(xs)
        for i, t in zip(pos, tensors):
            full[i] = t
        yshape = torch.Size((yf.shape[0], *shape[1:]))  # under vmap the batch is folded: B * b elements
        return _flat_map(lambda yy: fn(*full, y=yy), yshape, _fn_name(node, kind))(yf)

    return G


def _batched_positions(node: DeclarativeNode, xs: tuple) -> list[int]:
    shared = node._shared_positions(xs)
    return [i for i, x in enumerate(xs) if isinstance(x, Tensor) and i not in shared]


def _implicit_vjp(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, method: str, xs: tuple,
                  y: Tensor, rhs: Tensor, system: str, singular_text: str, need: Optional[Sequence[bool]] = None,
                  cache: Any = None, key: Optional[Tensor] = None, sign: float = 1.0, **solve_options: Any) -> tuple:
    """Solve ``A(y, xs)ᵀ u = rhs`` (see :class:`_ImplicitOp`) and return ``(∂fn/∂x_i)ᵀ u`` for the floating-point
    batched tensor inputs (``None`` for the others). Differentiable (double backward, ``torch.func`` transforms).
    ``rhs = sign * key``; ``cache`` shares ``A^{-T} key`` with the attached :class:`RootRule` of the same call."""
    shape = y.shape
    b = shape[0]
    pos = _batched_positions(node, xs)
    G = _residual_map(node, fn, kind, xs, shape, pos)
    a = cache.get(key) if cache is not None else None
    if a is None:
        op = _ImplicitOp(G, kind, method, **solve_options)
        u = _ImplicitLinearSolve.apply(op, True, rhs.reshape(b, -1), y.reshape(b, -1), *[xs[i] for i in pos])
        if op.infos:
            _record_linear(node, op.infos[-1], system, singular_text)
        if cache is not None:
            cache.put(key, sign * u)
    else:
        u = sign * a
    if need is not None:
        need = [bool(n) and i in pos for i, n in enumerate(need)]
    else:
        need = [i in pos for i in range(len(xs))]
    return _input_vjp(lambda *xx: fn(*xx, y=y), xs, u.reshape(shape), need)


def _implicit_tangent(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, method: str, xs: tuple,
                      y: Tensor, tangents: tuple, **solve_options: Any) -> Tensor:
    """Forward mode: ``dy = -A⁻¹ (∂F/∂x dx)`` with ``F = fn`` (root) or ``F = y - T`` (fixed point)."""
    shape = y.shape
    b = shape[0]
    pos = _batched_positions(node, xs)
    G = _residual_map(node, fn, kind, xs, shape, pos)
    yf = y.reshape(b, -1)
    tensors = [xs[i] for i in pos]
    tan = [tangents[i] if isinstance(tangents[i], Tensor) else torch.zeros_like(xs[i]) for i in pos]
    _, dG = torch.func.jvp(lambda *ts: G(ts, yf), tuple(tensors), tuple(tan))
    rhs = dG if kind == "fixed_point" else -dG   # -∂F/∂x dx
    op = _ImplicitOp(G, kind, method, **solve_options)
    dy = _ImplicitLinearSolve.apply(op, False, rhs, yf, *tensors)
    return dy.reshape(shape)


class RootRule(ImplicitRule):
    """:class:`~torchddn.implicit.ImplicitRule` of a root (``q = F``, ``A = ∂F/∂y``) or fixed-point node
    (``q = y - T``, ``A = I - ∂T/∂y``): ``q_bar = -A^{-T} v``, ``dy = -A^{-1} dq``."""

    def __init__(self, node: DeclarativeNode, op: "_ImplicitOp", tensors: Sequence[Tensor], yf: Tensor,
                 yshape: torch.Size, cache: Any, system: str, singular_text: str) -> None:
        self.node, self.op, self.tensors, self.yf = node, op, list(tensors), yf
        self.yshape, self.cache, self.system, self.singular_text = torch.Size(yshape), cache, system, singular_text

    def adjoint(self, v: Tensor) -> Tensor:
        a = self.cache.get(v) if self.cache is not None else None
        if a is None:
            b = self.yf.shape[0]
            a = _ImplicitLinearSolve.apply(self.op, True, v.reshape(b, -1).to(self.yf.dtype), self.yf, *self.tensors)
            if self.op.infos:
                _record_linear(self.node, self.op.infos[-1], self.system, self.singular_text)
            if self.cache is not None:
                self.cache.put(v, a)
        return -a

    def tangent(self, dq: Tensor) -> Tensor:
        dy = _ImplicitLinearSolve.apply(self.op, False, dq.to(self.yf.dtype), self.yf, *self.tensors)
        return -dy.reshape(self.yshape)

    def fold(self, k: int) -> "RootRule":
        rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        return RootRule(self.node, self.op, [rep(t) for t in self.tensors], rep(self.yf),
                        torch.Size((k * self.yshape[0], *self.yshape[1:])), None, self.system, self.singular_text)


def _attach_root(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, method: str, xs: tuple, y: Tensor,
                 ctx: dict, system: str, singular_text: str, **solve_options: Any) -> Tensor:
    """``y`` plus the implicit rule for the tensors ``fn`` uses besides the batched inputs (see
    :class:`~torchddn.implicit.ImplicitRule`); ``y`` itself when there are none requiring grad."""
    if kind == "fixed_point" and node.phantom is not None:
        solve_options = {"steps": node.phantom, "damping": solve_options.get("damping", 1.0)}
        method = "phantom"
    shape = y.shape
    b = shape[0]
    pos = _batched_positions(node, xs)
    live = tuple(x.detach() if i in pos else x for i, x in enumerate(xs))
    G = _residual_map(node, fn, kind, live, shape, pos)
    yf = y.detach().reshape(b, -1)
    tensors = [live[i] for i in pos]
    with torch.enable_grad():
        g = G(tensors, yf)
    if not is_live(g):
        return y
    q = -g if kind == "fixed_point" else g
    op = _ImplicitOp(G, kind, method, **solve_options)
    rule = RootRule(node, op, tensors, yf, shape, ctx.get("_cache"), system, singular_text)
    return y + AttachImplicit.apply(rule, q - q.detach())


def _fn_name(node: DeclarativeNode, kind: str) -> str:
    return f"{type(node).__name__}.{'T' if kind == 'fixed_point' else 'optimality'}"


def _record_linear(node: DeclarativeNode, info: LinearSolveInfo, system: str, singular_text: str) -> None:
    """Store the backward solve's per-element results in ``node.diagnostics`` and warn: singular elements with
    :class:`NonRegularWarning`; unconverged iterative solves per the node's ``on_failure`` policy."""
    diag = node.diagnostics
    diag.linear_residual = info.residual.detach()
    diag.linear_iterations = info.iterations.detach()
    diag.nonregular = info.nonregular.detach()
    diag.backward_method = info.method
    name = type(node).__name__
    if bool(info.nonregular.any()) and node.on_failure != "ignore":
        warnings.warn(f"{name}: {singular_text} at batch elements {element_list(info.nonregular)}; the minimum-norm "
                      f"(least-squares) solution of {system} is used, so the gradient there is not the derivative",
                      NonRegularWarning, stacklevel=5)
    if info.method in ("phantom", "dense"):
        return
    tol = 1e-6 if info.residual.dtype == torch.float64 else 1e-3
    bad = ~(info.residual <= tol) & ~info.nonregular
    if bool(bad.any()):
        report(node.on_failure, f"{name}: the backward solve of {system} ({info.method}) did not converge at batch "
               f"elements {element_list(bad)} (relative residual up to {float(info.residual[bad].max()):.3g}); "
               f"increase backward_max_iter or use backward_solver='dense' / 'gmres'", ConvergenceWarning,
               stacklevel=5)


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
        detached = _detach_all(xs)
        with torch.no_grad():
            y = _check_y(self.initial_guess(*detached), f"{type(self).__name__}.initial_guess").detach()
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
        return _flat_map(lambda y: self.T(*xs, y=y), shape, f"{type(self).__name__}.T")

    def solve(self, *xs: Any) -> tuple[Tensor, dict]:
        """Find the fixed point with the forward solver from :meth:`initial_guess`: returns ``(y, ctx)`` with
        ``ctx`` holding the per-element ``converged``, ``iterations`` and ``residual``."""
        with torch.no_grad():
            xs = _detach_all(xs)
            y0 = _check_y(self.initial_guess(*xs), f"{type(self).__name__}.initial_guess")
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
                f = self._flat_T(_detach_all(xs), y.shape)
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
        return _implicit_vjp(self, self.T, "fixed_point", method, xs, y, v.to(y.dtype), *_FP_TEXT, need=need,
                             cache=(ctx or {}).get("_cache"), key=v, sign=1.0, damping=self.damping, **opts)

    def _backward_options(self) -> tuple[str, dict]:
        if self.phantom is not None:
            return "phantom", {"steps": self.phantom}
        return self.backward_solver, {"tol": self.linear_tol, "max_iter": self.linear_max_iter,
                                      "restart": self.backward_restart}

    def _attach(self, xs: tuple, y: Tensor, ctx: dict) -> Tensor:
        method, opts = self._backward_options()
        return _attach_root(self, self.T, "fixed_point", method, xs, y, ctx, *_FP_TEXT, damping=self.damping,
                            **opts)

    def _implicit_jvp(self, xs: tuple, y: Tensor, tangents: tuple, ctx: Optional[dict]) -> Tensor:
        """Forward mode: ``dy = (I - ∂T/∂y)⁻¹ ∂T/∂x dx``."""
        method, opts = self._backward_options()
        if method == "phantom":
            method, opts = "gmres", {"tol": self.linear_tol, "max_iter": self.linear_max_iter}
        return _implicit_tangent(self, self.T, "fixed_point", method, xs, y, tangents, damping=self.damping,
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
