"""The autograd function and ``nn.Module`` that put a declarative node into a network."""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from torchddn.implicit import fold_vmap
from torchddn.node import DeclarativeNode


_SLOT = object()  # where a tensor input goes in a saved input template (None is a valid non-tensor input)


class _Holder:
    """Carries the solver's ``ctx`` dict from ``forward`` to ``setup_context`` (it is not a tensor)."""

    __slots__ = ("ctx",)

    def __init__(self) -> None:
        self.ctx: Optional[dict] = None


class _DeclarativeFunction(torch.autograd.Function):
    @staticmethod
    def forward(node: DeclarativeNode, holder: _Holder, *xs: Any) -> Tensor:
        y, ctx = node._forward(*xs)
        holder.ctx = ctx
        return y

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        node, holder, *xs = inputs
        ctx.node = node
        ctx.solve_ctx = holder.ctx
        ctx.template = tuple(_SLOT if isinstance(x, Tensor) else x for x in xs)
        tensors = [x for x in xs if isinstance(x, Tensor)]
        ctx.save_for_backward(output, *tensors)
        ctx.save_for_forward(output, *tensors)

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple:
        y, *tensors = ctx.saved_tensors
        it = iter(tensors)
        xs = tuple(next(it) if t is _SLOT else t for t in ctx.template)
        node: DeclarativeNode = ctx.node
        need = list(ctx.needs_input_grad[2:])
        if not any(need):
            return (None, None) + (None,) * len(xs)
        if type(node).gradient is not DeclarativeNode.gradient:
            grads = node.gradient(*xs, y=y, v=v, ctx=ctx.solve_ctx)
        else:
            grads = node._implicit_gradient(xs, y, v, ctx.solve_ctx, need)
        grads = tuple(grads) + (None,) * (len(xs) - len(grads))
        grads = tuple(g if n else None for g, n in zip(grads, need))
        return (None, None) + grads

    @staticmethod
    def jvp(ctx: Any, node_t: Any, holder_t: Any, *x_tangents: Any) -> Tensor:
        y, *tensors = ctx.saved_tensors
        it = iter(tensors)
        xs = tuple(next(it) if t is _SLOT else t for t in ctx.template)
        return ctx.node._implicit_jvp(xs, y, x_tangents, ctx.solve_ctx)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, node: DeclarativeNode, holder: _Holder, *xs: Any) -> tuple:
        keep = node._shared_positions(tuple(x.movedim(d, 0)[0] if isinstance(x, Tensor) and d is not None else x
                                            for x, d in zip(xs, in_dims[2:])))
        return fold_vmap(lambda *a: _DeclarativeFunction.apply(node, holder, *a), info, in_dims[2:], xs, keep)


class DeclarativeFunction:
    """Autograd function of a declarative node: ``DeclarativeFunction.apply(node, *xs) -> y``.

    The forward calls ``node.solve(*xs)`` (or the built-in solver), checks the inputs and the solution, and records
    ``node.diagnostics``; the backward calls ``node.gradient`` when the node overrides it and the implicit
    differentiation of :mod:`torchddn.implicit` otherwise. Works with ``torch.func.vmap`` (the vmapped dimension
    is folded into the batch), ``jacrev``/``jacfwd``-free reverse transforms, and double backward.
    """

    @staticmethod
    def apply(node: DeclarativeNode, *xs: Any) -> Tensor:
        if node.backward in ("unrolled", "truncated"):
            return node._unrolled_forward(*xs)
        return node._output(_call(node, *xs))


def _apply(node: DeclarativeNode, *xs: Any) -> Tensor:
    holder = _Holder()
    y = _DeclarativeFunction.apply(node, holder, *xs)
    if torch.is_grad_enabled() and holder.ctx is not None:
        # gradients for the tensors the node's functions use besides its batched inputs (see ImplicitRule)
        y = node._attach(xs, y, holder.ctx)
    return y


_compiled_guard: Any = None


def _call(node: DeclarativeNode, *xs: Any) -> Tensor:
    """Apply the function outside any ``torch.compile`` graph (a graph break; the solver is Python code)."""
    global _compiled_guard
    if _compiled_guard is None:  # importing the compiler is slow: do it on first use
        _compiled_guard = torch.compiler.disable(_apply)
    return _compiled_guard(node, *xs)


class DeclarativeLayer(nn.Module):
    """Wrap a declarative node as an ``nn.Module``: ``DeclarativeLayer(node)(*xs) -> y``.

    If the node is itself an ``nn.Module`` its parameters are registered with the layer.

    Example::

        >>> class RobustAverage(DeclarativeNode):
        ...     def initial_guess(self, x):
        ...         return x.mean(-1, keepdim=True)
        ...     def objective(self, x, y):
        ...         return (torch.sqrt(1 + (y - x) ** 2) - 1).sum(-1)
        >>> layer = DeclarativeLayer(RobustAverage())
        >>> y = layer(torch.randn(4, 10, requires_grad=True))
    """

    def __init__(self, node: DeclarativeNode) -> None:
        super().__init__()
        if not isinstance(node, DeclarativeNode):
            raise TypeError(f"DeclarativeLayer needs a DeclarativeNode, got {type(node).__name__}")
        self.node = node

    @property
    def diagnostics(self):
        """The node's per-element diagnostics of the last call."""
        return self.node.diagnostics

    def forward(self, *xs: Any) -> Tensor:
        return DeclarativeFunction.apply(self.node, *xs)

    def extra_repr(self) -> str:
        return f"{type(self.node).__name__}, backward={self.node.backward_rule!r}"
