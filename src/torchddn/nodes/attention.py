r"""Declarative attention: attention weights defined by an entropy-regularised problem on a (capped) simplex.

For scores :math:`s \in \mathbb{R}^n` (one query against ``n`` keys) the weights are

.. math::
    w(s) = \arg\max_{w}\; \langle w, s\rangle + \tau H(w) \quad\text{s.t.}\quad \textstyle\sum_i w_i = 1,\;
    0 \le w_i \le u,

with :math:`H(w) = -\sum_i w_i\log w_i`. Without the cap (:math:`u = \infty`) this is :math:`\operatorname{softmax}
(s/\tau)`. With a cap the solution is :math:`w_i = \min(u, e^{(s_i-\nu)/\tau})` with the multiplier :math:`\nu` of
the sum constraint; it has no closed form in ``s`` (which weights saturate depends on the scores) and is computed
exactly by sorting the scores and testing every candidate number of saturated weights at once.

Implicit backward: on the free set :math:`F = \{i: w_i < u\}` the KKT conditions give
:math:`dw_F = \tfrac1\tau w_F \odot (ds_F - d\nu)` with :math:`\sum_F dw_i = 0`, and saturated weights are constant,
so :math:`\bar s_i = \tfrac{w_i}{\tau}\big(\bar w_i - \sum_{j\in F} w_j\bar w_j / \sum_{j\in F} w_j\big)` on ``F``
and 0 elsewhere. For :math:`u = \infty` this is exactly the softmax Jacobian-vector product. A weight exactly at
the cap is a weakly active constraint (non-differentiable point); it is treated as saturated.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from torchddn.diagnostics import DDNError, InfeasibleError, element_list

__all__ = ["declarative_attention", "DeclarativeAttention"]


def _capped_weights(s: Tensor, tau: float, cap: Optional[float]) -> Tensor:
    """Solve the capped entropic problem along the last dimension of ``s`` (masked entries are ``-inf``)."""
    z = s / tau
    if cap is None:
        return torch.softmax(z, dim=-1)
    n = z.shape[-1]
    zs, _ = torch.sort(z, dim=-1, descending=True)
    # tail[k] = logsumexp(zs[k:]) for k = 0..n-1
    tail = torch.logcumsumexp(zs.flip(-1), dim=-1).flip(-1)
    k = torch.arange(n, dtype=z.dtype, device=z.device)
    rest = 1.0 - k * cap  # mass left for the free weights when the k largest are saturated
    logcap = math.log(cap)
    nu = tail - torch.log(rest.clamp_min(torch.finfo(z.dtype).tiny))  # candidate nu / tau for each k
    # k saturated: the k-th largest is free (below the cap) and the (k-1)-th saturated (at or above the cap)
    # (with a rounding slack so that the true candidate always passes; the first passing one is taken)
    slack = 64 * torch.finfo(z.dtype).eps * (1 + nu.abs().nan_to_num(posinf=0.0, neginf=0.0) + abs(logcap))
    free_ok = zs - nu < logcap + slack
    prev = torch.cat([torch.full_like(zs[..., :1], float("inf")), zs[..., :-1]], dim=-1)
    sat_ok = prev - nu >= logcap - slack
    valid = free_ok & sat_ok & (rest > 0)
    first = torch.argmax(valid.to(torch.int8), dim=-1, keepdim=True)
    nu_star = torch.gather(nu, -1, first)
    return torch.clamp(torch.exp(z - nu_star), max=cap)


class _CappedSimplexFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, tau, cap):
        w = _capped_weights(s, tau, cap)
        ctx.save_for_backward(w)
        ctx.tau, ctx.cap = tau, cap
        return w

    @staticmethod
    def backward(ctx, gw):
        (w,) = ctx.saved_tensors
        free = w if ctx.cap is None else torch.where(w < ctx.cap, w, torch.zeros_like(w))
        mass = free.sum(-1, keepdim=True)
        mean = (free * gw).sum(-1, keepdim=True) / mass.clamp_min(torch.finfo(w.dtype).tiny)
        return free * (gw - mean) / ctx.tau, None, None


def entropic_simplex_weights(s: Tensor, tau: float = 1.0, cap: Optional[float] = None) -> Tensor:
    r"""The weights :math:`\arg\max_{w\in\Delta, w\le u}\langle w, s\rangle + \tau H(w)` along the last dim of ``s``.

    ``cap=None`` gives ``softmax(s / tau)``. Entries of ``s`` equal to ``-inf`` get weight 0. Requires
    ``cap * (number of finite scores) > 1``. Implicit backward, :math:`O(n)` per row (see the module docstring).
    """
    if cap is not None:
        nfin = torch.isfinite(s.detach()).sum(-1)
        bad = nfin * cap <= 1
        if bool(bad.any()):
            rows = bad.reshape(bad.shape[0], -1).any(1) if bad.dim() > 1 else bad
            raise InfeasibleError(f"cap={cap} is infeasible: cap * (number of unmasked keys) must exceed 1 "
                                  f"(equality forces uniform weights with no gradient); at batch elements "
                                  f"{element_list(rows)}")
    return _CappedSimplexFn.apply(s, float(tau), None if cap is None else float(cap))


def declarative_attention(query: Tensor, key: Tensor, value: Tensor, tau: float = 1.0, cap: Optional[float] = None,
                          mask: Optional[Tensor] = None, return_weights: bool = False):
    r"""Single-head attention whose weights solve an entropy-regularised (optionally capped) simplex problem.

    For each query ``q`` the weights over the keys are
    :math:`w = \arg\max_{w\in\Delta,\, w\le u}\langle w, s\rangle + \tau H(w)` with scores
    :math:`s_j = q^\top k_j/\sqrt{d}`, and the output is :math:`\sum_j w_j v_j`.

    Args:
        query: (b, Lq, d).
        key: (b, Lk, d).
        value: (b, Lk, dv).
        tau: entropy weight (temperature) ``> 0``; ``cap=None, tau=1`` is standard softmax attention.
        cap: upper bound ``u`` on each weight (``None``: no cap). Needs ``cap * (unmasked keys) > 1``.
        mask: optional (b, Lq, Lk) or (Lq, Lk) bool, ``True`` where a key may be attended to.
        return_weights: also return the (b, Lq, Lk) weights.

    Returns:
        out: (b, Lq, dv), and the weights if requested.

    Gradient: implicit, :math:`\bar s_i = \tfrac{w_i}{\tau}(\bar w_i - \langle w_F, \bar w\rangle/\sum_F w)` on the
    unsaturated set ``F`` (0 on saturated weights); products with ``query``/``key``/``value`` by autograd.

    Cost: :math:`O(b\,L_q L_k (d + \log L_k))` forward (a sort per row when capped), :math:`O(b\,L_q L_k d)` backward.
    """
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not torch.is_tensor(t) or not t.is_floating_point() or t.dim() != 3:
            raise DDNError(f"{name} must be a floating-point tensor of shape (b, L, d), got "
                           f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
        fin = torch.isfinite(t.detach()).flatten(1).all(1)
        if not bool(fin.all()):
            raise DDNError(f"{name} contains NaN or Inf at batch elements {element_list(~fin)}")
    if key.shape[0] != query.shape[0] or value.shape[0] != query.shape[0] or key.shape[-1] != query.shape[-1] \
            or value.shape[1] != key.shape[1]:
        raise DDNError(f"incompatible shapes: query {tuple(query.shape)}, key {tuple(key.shape)}, value "
                       f"{tuple(value.shape)}; expected (b, Lq, d), (b, Lk, d), (b, Lk, dv)")
    if not tau > 0:
        raise DDNError(f"tau must be positive, got {tau}")
    if cap is not None and not cap > 0:
        raise DDNError(f"cap must be positive, got {cap}")
    scores = query @ key.transpose(1, 2) / math.sqrt(query.shape[-1])
    if mask is not None:
        if mask.dim() == 2 and tuple(mask.shape) == tuple(scores.shape[1:]):
            mask = mask.expand(scores.shape)
        if tuple(mask.shape) != tuple(scores.shape):
            raise DDNError(f"mask must have shape {tuple(scores.shape)} or {tuple(scores.shape[1:])}, got "
                           f"{tuple(mask.shape)}")
        empty = ~mask.any(-1).flatten(1).all(1)
        if bool(empty.any()):
            raise DDNError(f"mask leaves a query with no key at batch elements {element_list(empty)}")
        scores = scores.masked_fill(~mask, float("-inf"))
    w = entropic_simplex_weights(scores, tau, cap)
    out = w @ value
    return (out, w) if return_weights else out


class DeclarativeAttention(nn.Module):
    """Single-head attention module with declarative (capped entropic simplex) weights.

    ``DeclarativeAttention(embed_dim, tau=1.0, cap=None)(query, key, value, mask=None) -> (b, Lq, embed_dim)``:
    linear projections of queries, keys and values, the weights of :func:`declarative_attention`, and an output
    projection (like a single head of ``nn.MultiheadAttention`` with ``batch_first=True``).
    """

    def __init__(self, embed_dim: int, tau: float = 1.0, cap: Optional[float] = None, kdim: Optional[int] = None,
                 vdim: Optional[int] = None, bias: bool = True) -> None:
        super().__init__()
        self.embed_dim, self.tau, self.cap = embed_dim, tau, cap
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor, mask: Optional[Tensor] = None,
                return_weights: bool = False):
        res = declarative_attention(self.q_proj(query), self.k_proj(key), self.v_proj(value), self.tau, self.cap,
                                    mask, return_weights)
        if return_weights:
            return self.out_proj(res[0]), res[1]
        return self.out_proj(res)

    def extra_repr(self) -> str:
        return f"embed_dim={self.embed_dim}, tau={self.tau}, cap={self.cap}"
