"""Batched derivative helpers on ``torch.func``, shared by the nodes, the implicit rule and the solvers.

Every function works on a flat, batched ``y`` of shape ``(b, m)`` and a batched function whose element ``i``
depends only on ``y[i]``: the gradient of the batch sum is then the stack of per-element gradients, and one
vector product serves the whole batch. Second derivatives are reverse-over-reverse: the gradient's graph is
built once per call and reused for every product, and no forward-mode levels are created, so the helpers are
safe to call from several Python threads at once.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.func import grad, vjp, vmap

BatchFn = Callable[[Tensor], Tensor]

__all__ = ["BatchFn", "batch_grad", "value_and_batch_grad", "batch_hvp", "hvp_operator", "batch_hessian",
           "batch_jacobian"]


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


def hvp_operator(fn: BatchFn, y: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` with ``H`` the per-element Hessians of ``fn`` at ``y``: the gradient's graph is built once (one
    VJP per product afterwards; ``H`` is symmetric, so its VJP is its product). ``v`` may carry extra leading
    dimensions when the returned function is vmapped."""
    _, pullback = vjp(lambda u: batch_grad(fn, u), y)
    return lambda v: pullback(v)[0]


def batch_hvp(fn: BatchFn, y: Tensor, v: Tensor) -> Tensor:
    """Per-element Hessian-vector products ``H_i v_i``, shape ``(b, m)`` (reverse-over-reverse)."""
    return hvp_operator(fn, y)(v)


def batch_hessian(fn: BatchFn, y: Tensor, chunk: int = 256) -> Tensor:
    """Dense per-element Hessians ``(b, m, m)``: ``m`` products with the unit vectors through one gradient graph,
    vmapped in chunks of ``chunk`` columns (memory ``O(chunk b m)`` beyond the graph)."""
    b, m = y.shape
    hv = hvp_operator(fn, y)
    eye = torch.eye(m, dtype=y.dtype, device=y.device)
    cols = [vmap(lambda e: hv(e.expand(b, m)))(eye[s:s + chunk]) for s in range(0, m, chunk)]
    return torch.cat(cols, 0).permute(1, 2, 0)  # cols[j, i] = H_i e_j


def batch_jacobian(fn: BatchFn, y: Tensor) -> tuple[Tensor, Tensor]:
    """Value ``(b, p)`` and per-element Jacobian ``(b, p, m)`` of ``fn: (b, m) -> (b, p)``, by ``p`` vmapped VJPs."""
    val, vjp_fn = vjp(fn, y)
    b, p = val.shape
    eye = torch.eye(p, dtype=val.dtype, device=val.device)
    rows = vmap(lambda e: vjp_fn(e.expand(b, p))[0])(eye)  # (p, b, m)
    return val, rows.permute(1, 0, 2)
