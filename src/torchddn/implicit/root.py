"""The implicit rule of root and fixed-point nodes: ``F(x, y) = 0`` with ``A = dF/dy`` (``F = y - T`` for fixed
points), as a differentiable linear solve with VJPs/JVPs of ``F`` (see :mod:`torchddn.implicit`).

* :class:`ImplicitOp` applies ``A`` or ``A^T`` matrix-free (or forms it densely) and solves with any
  :mod:`torchddn.linalg` solver; symmetric systems are detected by one probe and take MINRES.
* :class:`ImplicitLinearSolve` is that solve as an autograd function, differentiable to any order.
* :func:`root_vjp` / :func:`root_tangent` give the node's input VJP and forward-mode product;
  :class:`RootRule` and :func:`attach_root` give every other tensor ``F`` uses its gradient.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import vjp

from torchddn.autodiff import batch_jacobian
from torchddn.diagnostics import ConvergenceWarning, DDNError, NonRegularWarning, element_list, report
from torchddn.implicit.kkt import AttachImplicit, ImplicitRule, fold_vmap, is_live
from torchddn.linalg import (GMRES, MINRES, BiCGStab, LinearOperator, LinearSolveInfo, dense_solve_general, gmres,
                             neumann)
from torchddn.linalg import solve as linalg_solve

FlatMap = Callable[[Tensor], Tensor]
DeclarativeNode = Any  # a torchddn node (not imported: the node module imports this one)

__all__ = ["ImplicitOp", "ImplicitLinearSolve", "RootRule", "root_vjp", "root_tangent", "attach_root",
           "record_linear", "detach_all", "check_y", "flat_map", "input_vjp", "is_symmetric"]


# ----------------------------------------------------------------------------------------------------------------
# shared node machinery (also used by torchddn.root)
# ----------------------------------------------------------------------------------------------------------------

def detach_all(xs: Sequence[Any]) -> tuple:
    return tuple(x.detach() if isinstance(x, Tensor) else x for x in xs)


def check_y(y: Any, name: str) -> Tensor:
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


def flat_map(fn: Callable[[Tensor], Tensor], shape: torch.Size, name: str) -> FlatMap:
    """Wrap ``fn: (b, ...) -> (b, ...)`` (same shape as its argument) as a map on flat ``(b, m)`` tensors."""
    b = shape[0]

    def flat(zf: Tensor) -> Tensor:
        out = fn(zf.reshape(shape))
        if not isinstance(out, Tensor) or out.shape != shape:
            got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DDNError(f"{name} must return a tensor with the shape of y, {tuple(shape)}, but returned {got}")
        return out.reshape(b, -1)

    return flat


def input_vjp(fn: Callable[..., Tensor], xs: tuple, u: Tensor, need: Optional[Sequence[bool]] = None) -> tuple:
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


class ImplicitOp:
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
            symmetric = bool(is_symmetric(G, yf, fp).all())
            method = MINRES() if symmetric else GMRES(restart=self.restart)
        elif isinstance(method, (GMRES, BiCGStab)) or (isinstance(method, str) and method in ("bicgstab",)):
            symmetric = False
        op = LinearOperator(mv, rhs.shape[-1], symmetric=symmetric, psd=False)
        x, info = linalg_solve(op, rhs, method, self.tol, self.max_iter)
        return x, info


def is_symmetric(G: Callable[[Tensor], Tensor], yf: Tensor, fp: bool) -> Tensor:
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


class ImplicitLinearSolve(torch.autograd.Function):
    """``z = A(theta)^{-T} rhs`` (``transpose=True``) or ``A(theta)^{-1} rhs``, differentiable to any order.

    With ``a`` the solve with the other transpose of the incoming gradient, ``rhs_bar = a`` and
    ``theta_bar = -∂/∂theta [lᵀ A(theta) r]`` with ``(l, r) = (z, a)`` for the transposed solve and ``(a, z)``
    otherwise. Under ``torch.func.vmap`` the vmapped dimension is folded into the batch.
    """

    @staticmethod
    def forward(op: ImplicitOp, transpose: bool, rhs: Tensor, yf: Tensor, *tensors: Tensor) -> Tensor:
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
        op: ImplicitOp = ctx.op
        if op.method == "phantom":
            raise DDNError("the phantom gradient is first-order only; use phantom=None for higher derivatives")
        a = ImplicitLinearSolve.apply(op, not ctx.transpose, zbar, yf, *tensors)
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
    def vmap(info: Any, in_dims: tuple, op: ImplicitOp, transpose: bool, *args: Any) -> tuple:
        return fold_vmap(lambda *a: ImplicitLinearSolve.apply(op, transpose, *a), info, in_dims[2:], args)


def residual_map(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, xs: tuple, shape: torch.Size,
                  pos: Sequence[int]) -> Callable[[Sequence[Tensor], Tensor], Tensor]:
    """``G(tensors, yf)``: ``fn(*xs, y)`` on flat ``y`` with the tensor inputs at ``pos`` replaced by ``tensors``."""

    def G(tensors: Sequence[Tensor], yf: Tensor) -> Tensor:
        full = list(xs)
        for i, t in zip(pos, tensors):
            full[i] = t
        yshape = torch.Size((yf.shape[0], *shape[1:]))  # under vmap the batch is folded: B * b elements
        return flat_map(lambda yy: fn(*full, y=yy), yshape, fn_name(node, kind))(yf)

    return G


def batched_positions(node: DeclarativeNode, xs: tuple) -> list[int]:
    shared = node._shared_positions(xs)
    return [i for i, x in enumerate(xs) if isinstance(x, Tensor) and i not in shared]


def root_vjp(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, method: str, xs: tuple,
                  y: Tensor, rhs: Tensor, system: str, singular_text: str, need: Optional[Sequence[bool]] = None,
                  cache: Any = None, key: Optional[Tensor] = None, sign: float = 1.0, **solve_options: Any) -> tuple:
    """Solve ``A(y, xs)ᵀ u = rhs`` (see :class:`ImplicitOp`) and return ``(∂fn/∂x_i)ᵀ u`` for the floating-point
    batched tensor inputs (``None`` for the others). Differentiable (double backward, ``torch.func`` transforms).
    ``rhs = sign * key``; ``cache`` shares ``A^{-T} key`` with the attached :class:`RootRule` of the same call."""
    shape = y.shape
    b = shape[0]
    pos = batched_positions(node, xs)
    G = residual_map(node, fn, kind, xs, shape, pos)
    a = cache.get(key) if cache is not None else None
    if a is None:
        op = ImplicitOp(G, kind, method, **solve_options)
        u = ImplicitLinearSolve.apply(op, True, rhs.reshape(b, -1), y.reshape(b, -1), *[xs[i] for i in pos])
        if op.infos:
            record_linear(node, op.infos[-1], system, singular_text)
        if cache is not None:
            cache.put(key, sign * u)
    else:
        u = sign * a
    if need is not None:
        need = [bool(n) and i in pos for i, n in enumerate(need)]
    else:
        need = [i in pos for i in range(len(xs))]
    return input_vjp(lambda *xx: fn(*xx, y=y), xs, u.reshape(shape), need)


def root_tangent(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, method: str, xs: tuple,
                      y: Tensor, tangents: tuple, **solve_options: Any) -> Tensor:
    """Forward mode: ``dy = -A⁻¹ (∂F/∂x dx)`` with ``F = fn`` (root) or ``F = y - T`` (fixed point)."""
    shape = y.shape
    b = shape[0]
    pos = batched_positions(node, xs)
    G = residual_map(node, fn, kind, xs, shape, pos)
    yf = y.reshape(b, -1)
    tensors = [xs[i] for i in pos]
    tan = [tangents[i] if isinstance(tangents[i], Tensor) else torch.zeros_like(xs[i]) for i in pos]
    _, dG = torch.func.jvp(lambda *ts: G(ts, yf), tuple(tensors), tuple(tan))
    rhs = dG if kind == "fixed_point" else -dG   # -∂F/∂x dx
    op = ImplicitOp(G, kind, method, **solve_options)
    dy = ImplicitLinearSolve.apply(op, False, rhs, yf, *tensors)
    return dy.reshape(shape)


class RootRule(ImplicitRule):
    """:class:`~torchddn.implicit.ImplicitRule` of a root (``q = F``, ``A = ∂F/∂y``) or fixed-point node
    (``q = y - T``, ``A = I - ∂T/∂y``): ``q_bar = -A^{-T} v``, ``dy = -A^{-1} dq``."""

    def __init__(self, node: DeclarativeNode, op: "ImplicitOp", tensors: Sequence[Tensor], yf: Tensor,
                 yshape: torch.Size, cache: Any, system: str, singular_text: str) -> None:
        self.node, self.op, self.tensors, self.yf = node, op, list(tensors), yf
        self.yshape, self.cache, self.system, self.singular_text = torch.Size(yshape), cache, system, singular_text

    def adjoint(self, v: Tensor) -> Tensor:
        a = self.cache.get(v) if self.cache is not None else None
        if a is None:
            b = self.yf.shape[0]
            a = ImplicitLinearSolve.apply(self.op, True, v.reshape(b, -1).to(self.yf.dtype), self.yf, *self.tensors)
            if self.op.infos:
                record_linear(self.node, self.op.infos[-1], self.system, self.singular_text)
            if self.cache is not None:
                self.cache.put(v, a)
        return -a

    def tangent(self, dq: Tensor) -> Tensor:
        dy = ImplicitLinearSolve.apply(self.op, False, dq.to(self.yf.dtype), self.yf, *self.tensors)
        return -dy.reshape(self.yshape)

    def fold(self, k: int) -> "RootRule":
        rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        return RootRule(self.node, self.op, [rep(t) for t in self.tensors], rep(self.yf),
                        torch.Size((k * self.yshape[0], *self.yshape[1:])), None, self.system, self.singular_text)


def attach_root(node: DeclarativeNode, fn: Callable[..., Tensor], kind: str, method: str, xs: tuple, y: Tensor,
                 ctx: dict, system: str, singular_text: str, **solve_options: Any) -> Tensor:
    """``y`` plus the implicit rule for the tensors ``fn`` uses besides the batched inputs (see
    :class:`~torchddn.implicit.ImplicitRule`); ``y`` itself when there are none requiring grad."""
    if kind == "fixed_point" and node.phantom is not None:
        solve_options = {"steps": node.phantom, "damping": solve_options.get("damping", 1.0)}
        method = "phantom"
    shape = y.shape
    b = shape[0]
    pos = batched_positions(node, xs)
    live = tuple(x.detach() if i in pos else x for i, x in enumerate(xs))
    G = residual_map(node, fn, kind, live, shape, pos)
    yf = y.detach().reshape(b, -1)
    tensors = [live[i] for i in pos]
    with torch.enable_grad():
        g = G(tensors, yf)
    if not is_live(g):
        return y
    q = -g if kind == "fixed_point" else g
    op = ImplicitOp(G, kind, method, **solve_options)
    rule = RootRule(node, op, tensors, yf, shape, ctx.get("_cache"), system, singular_text)
    return y + AttachImplicit.apply(rule, q - q.detach())


def fn_name(node: DeclarativeNode, kind: str) -> str:
    return f"{type(node).__name__}.{'T' if kind == 'fixed_point' else 'optimality'}"


def record_linear(node: DeclarativeNode, info: LinearSolveInfo, system: str, singular_text: str) -> None:
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
