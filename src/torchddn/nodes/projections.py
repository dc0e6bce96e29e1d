r"""Euclidean projections onto simplices, L1/L2/Linf balls and spheres, with closed-form backward.

``y = argmin_{u in C} 1/2 |u - x|^2`` along dimension ``dim`` of ``x``, for

==================  ==========================================
``kind``            ``C``
==================  ==========================================
``"simplex"``       ``{u >= 0, sum(u) = r}``
``"l1_ball"``       ``{|u|_1 <= r}``
``"l1_sphere"``     ``{|u|_1 = r}`` (nonconvex)
``"l2_ball"``       ``{|u|_2 <= r}``
``"l2_sphere"``     ``{|u|_2 = r}`` (nonconvex)
``"linf_ball"``     ``{|u|_inf <= r}``
``"linf_sphere"``   ``{|u|_inf = r}`` (nonconvex)
==================  ==========================================

Forward (exact): simplex and L1 by sorting (``O(n log n)``), the others in closed form (``O(n)``).

Backward (closed form, ``O(n)``, no dense Jacobian): points strictly inside a ball project to themselves
(identity Jacobian, zero radius gradient). Otherwise, with ``S`` the support and ``sigma = sign(x)``:

* simplex / L1 (outside): ``dL/dx = sigma * [g - mean_S(sigma g)]`` on ``S``, 0 off ``S``;
  ``dL/dr = mean_S(sigma g)``.
* L1 sphere, inside (``|x|_1 < r``): the nearest point is ``x + sigma (r - |x|_1)/n``, so
  ``dL/dx = g - sigma mean(sigma g)`` and ``dL/dr = mean(sigma g)``.
* L2 (outside / sphere): ``dL/dx = (r/|x|)(g - xhat xhat^T g)``, ``dL/dr = xhat^T g``.
* Linf ball (outside): ``dL/dx = g`` where ``|x_i| < r``, 0 elsewhere; ``dL/dr = sum_{|x_i| > r} sign(x_i) g_i``.
* Linf sphere, inside: the largest ``|x_k|`` is pushed to ``sign(x_k) r``: ``dL/dx = g`` except 0 at ``k``,
  ``dL/dr = sign(x_k) g_k``.

Non-differentiable points (documented policy; never NaN): a point exactly on the boundary of a ball uses the
one-sided Jacobian of the active constraint (the projection's, the minimum-norm one); an entry of the simplex/L1
projection exactly at the threshold is treated as inactive; these "weakly active" cases warn with
:class:`~torchddn.diagnostics.NonRegularWarning`. Points where the nearest point on a sphere is not unique (the zero
vector for every sphere; zero entries of a point inside the L1 sphere; ties for the largest ``|x_i|`` inside the
Linf sphere) get a deterministic choice -- sign ``+1`` for zero entries, the first of tied maxima, ``r e_1`` for the
zero vector on the L2 sphere (with zero gradient) -- and a :class:`NonRegularWarning`.
"""
from __future__ import annotations

import warnings
from typing import Union

import torch
from torch import Tensor, nn

from torchddn.diagnostics import DDNError, NonRegularWarning, element_list

__all__ = ["project", "EuclideanProjection"]

KINDS = ("simplex", "l1_sphere", "l1_ball", "l2_sphere", "l2_ball", "linf_sphere", "linf_ball")


def _warn(kind: str, what: str, mask: Tensor) -> None:
    warnings.warn(f"project ({kind}): {what} at (flattened) elements {element_list(mask)}; the projection is not "
                  f"differentiable there, a one-sided / minimum-norm gradient is returned", NonRegularWarning,
                  stacklevel=4)


def _simplex_threshold(v: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """Threshold ``tau`` (B, 1) and support size (B, 1) of the projection ``max(v - tau, 0)`` onto
    ``{u >= 0, sum u = r}`` (sort-based, Held et al. / Duchi et al.)."""
    n = v.shape[-1]
    vs, _ = torch.sort(v, dim=-1, descending=True)
    css = vs.cumsum(-1) - r
    k = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    cond = vs - css / k > 0
    # cond holds on a prefix (and always at index 0 since r > 0): rho is its last index
    rho = (cond.to(torch.int64).sum(-1, keepdim=True) - 1).clamp_min(0)
    tau = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return tau, (rho + 1).to(v.dtype)


def _sign_pos(x: Tensor) -> Tensor:
    """sign(x) with +1 at zero."""
    return torch.where(x < 0, -torch.ones_like(x), torch.ones_like(x))


def _forward(x: Tensor, r: Tensor, kind: str):
    """x (B, n), r (B, 1). Returns y and what the backward needs."""
    eps = torch.finfo(x.dtype).eps
    n = x.shape[-1]
    saved = {}
    warn = []
    if kind == "simplex":
        tau, _ = _simplex_threshold(x, r)
        y = (x - tau).clamp_min(0)
        supp = x > tau
        tie = ((x - tau).abs() <= 4 * eps * (x.abs().amax(-1, keepdim=True) + r)).any(-1)
        warn.append(("an entry lies exactly at the threshold (weakly active constraint u_i >= 0)", tie))
        saved = dict(mode="simplex", sign=torch.ones_like(x), supp=supp)
    elif kind in ("l1_ball", "l1_sphere"):
        ax = x.abs()
        norm = ax.sum(-1, keepdim=True)
        outside = norm >= r  # exactly on the boundary: the active (projection) branch
        tau, _ = _simplex_threshold(ax, r)
        tau = torch.where(outside, tau, torch.zeros_like(tau))
        sgn = torch.sign(x)
        y_out = sgn * (ax - tau).clamp_min(0)
        supp = (ax > tau) & outside
        boundary = (norm - r).abs() <= 4 * eps * n * r
        if kind == "l1_ball":
            y = torch.where(outside, y_out, x)
            tie = (outside & ((ax - tau).abs() <= 4 * eps * (ax.amax(-1, keepdim=True) + r))).any(-1)
            warn.append(("an entry lies exactly at the threshold (weakly active)", tie))
            warn.append(("the point lies on the ball's boundary (weakly active constraint)",
                         boundary.squeeze(-1)))
            saved = dict(mode="l1", sign=sgn, supp=supp, outside=outside)
        else:
            inside = ~outside
            sp = _sign_pos(x)
            y_in = x + sp * (r - norm) / n
            y = torch.where(outside, y_out, y_in)
            zero_entry = (inside & (x == 0)).any(-1) & ~boundary.squeeze(-1)
            warn.append(("the nearest point on the L1 sphere is not unique (zero entries inside the sphere; "
                         "sign +1 chosen)", zero_entry))
            tie = (outside & ((ax - tau).abs() <= 4 * eps * (ax.amax(-1, keepdim=True) + r))).any(-1)
            warn.append(("an entry lies exactly at the threshold (weakly active)", tie))
            saved = dict(mode="l1_sphere", sign=sgn, sign_in=sp, supp=supp, outside=outside)
    elif kind in ("l2_ball", "l2_sphere"):
        norm = x.norm(dim=-1, keepdim=True)
        zero = norm == 0
        safe = torch.where(zero, torch.ones_like(norm), norm)
        if kind == "l2_ball":
            outside = norm >= r  # exactly on the boundary: the active (projection) branch
            y = torch.where(outside, x * (r / safe), x)
            boundary = (norm - r).abs() <= 4 * eps * r
            warn.append(("the point lies on the ball's boundary (weakly active constraint)", boundary.squeeze(-1)))
        else:
            outside = ~zero
            e1 = torch.zeros_like(x)
            e1[..., 0] = 1
            y = torch.where(zero, r * e1, x * (r / safe))
            warn.append(("the nearest point of the zero vector on the L2 sphere is not unique (r e_1 chosen)",
                         zero.squeeze(-1)))
        saved = dict(mode="l2", norm=safe, outside=outside & ~zero)
    elif kind in ("linf_ball", "linf_sphere"):
        ax = x.abs()
        m = ax.amax(-1, keepdim=True)
        yb = torch.maximum(torch.minimum(x, r), -r)
        atb = ((ax - r).abs() <= 4 * eps * r).any(-1)
        if kind == "linf_ball":
            y = yb
            warn.append(("an entry lies exactly on the ball's boundary |x_i| = r (weakly active)", atb))
            saved = dict(mode="linf", inside=torch.zeros_like(m, dtype=torch.bool))
        else:
            inside = m < r
            k = ax.argmax(-1, keepdim=True)
            sk = _sign_pos(x.gather(-1, k))
            yi = x.scatter(-1, k, sk * r)
            y = torch.where(inside, yi, yb)
            ties = inside.squeeze(-1) & ((ax == m).sum(-1) > 1)
            warn.append(("the nearest point on the Linf sphere is not unique (tied largest |x_i|; the first "
                         "is chosen)", ties))
            warn.append(("an entry lies exactly on the sphere's level |x_i| = r (weakly active)",
                         atb & ~inside.squeeze(-1)))
            saved = dict(mode="linf", inside=inside, k=k, sk=sk)
    else:
        raise DDNError(f"kind must be one of {KINDS}, got {kind!r}")
    return y, saved, warn


def _backward(g: Tensor, x: Tensor, r: Tensor, s: dict) -> tuple[Tensor, Tensor]:
    mode = s["mode"]
    if mode in ("simplex", "l1", "l1_sphere"):
        sgn = s["sign"]
        supp = s["supp"].to(g.dtype)
        sg = sgn * g
        cnt = supp.sum(-1, keepdim=True)
        mean_s = (supp * sg).sum(-1, keepdim=True) / cnt.clamp_min(1)
        gx_out = sgn * supp * (sg - mean_s)
        gr_out = mean_s
        if mode == "simplex":
            return gx_out, gr_out
        outside = s["outside"]
        if mode == "l1":
            return torch.where(outside, gx_out, g), torch.where(outside, gr_out, torch.zeros_like(gr_out))
        sp = s["sign_in"]
        m_in = (sp * g).mean(-1, keepdim=True)
        return torch.where(outside, gx_out, g - sp * m_in), torch.where(outside, gr_out, m_in)
    if mode == "l2":
        out = s["outside"]
        norm = s["norm"]
        xh = x / norm
        p = (xh * g).sum(-1, keepdim=True)
        gx = torch.where(out, (r / norm) * (g - xh * p), g)
        gr = torch.where(out, p, torch.zeros_like(p))
        return gx, gr
    if mode == "linf":
        inside = s["inside"]
        atb = (x.abs() >= r)  # one-sided: an entry at the boundary is treated as active
        gx_b = torch.where(atb, torch.zeros_like(g), g)
        gr_b = (torch.sign(x) * atb.to(g.dtype) * g).sum(-1, keepdim=True)
        if "k" not in s:
            return gx_b, gr_b
        k, sk = s["k"], s["sk"]
        gx_i = g.scatter(-1, k, torch.zeros_like(sk))
        gr_i = sk * g.gather(-1, k)
        return torch.where(inside, gx_i, gx_b), torch.where(inside, gr_i, gr_b)
    raise AssertionError(mode)


class _Project(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, r: Tensor, kind: str) -> Tensor:
        y, saved, warn = _forward(x, r, kind)
        ctx.saved = saved
        ctx.kind = kind
        ctx.warn = warn
        ctx.save_for_backward(x, r)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: Tensor):
        x, r = ctx.saved_tensors
        for what, mask in ctx.warn:
            if bool(mask.any()):
                _warn(ctx.kind, what, mask)
        gx, gr = _backward(g, x, r, ctx.saved)
        if ctx.kind == "l2_sphere":
            zero = (x == 0).all(-1, keepdim=True)
            gx = torch.where(zero, torch.zeros_like(gx), gx)
            gr = torch.where(zero, (g[..., :1]), gr)  # y = r e_1 there
        return (gx if ctx.needs_input_grad[0] else None), (gr if ctx.needs_input_grad[1] else None), None


def project(x: Tensor, kind: str, radius: Union[float, Tensor] = 1.0, dim: int = -1) -> Tensor:
    r"""Euclidean projection ``y = argmin_{u in C} |u - x|^2 / 2`` of ``x`` along ``dim`` onto the set ``kind``.

    Args:
        x: tensor of any shape (float32/float64, any device); each slice along ``dim`` is projected.
        kind: ``"simplex"``, ``"l1_sphere"``, ``"l1_ball"``, ``"l2_sphere"``, ``"l2_ball"``, ``"linf_sphere"`` or
            ``"linf_ball"``.
        radius: ``r > 0``, a float or a tensor broadcastable to ``x``'s shape without ``dim``; gradients flow to it
            when it is a tensor that requires grad.
        dim: the projected dimension.

    Returns:
        ``y`` with the shape of ``x``.

    The L1 sphere is nonconvex: outside the ball (``|x|_1 >= r``) its nearest point is the ball's projection;
    inside, it is ``x + sign(x) (r - |x|_1) / n`` (the orthogonal projection onto the face of ``x``'s orthant,
    which is the nearest face), with sign ``+1`` for zero entries. The L2 and Linf spheres: ``r x / |x|``,
    and inside the Linf ball the largest ``|x_k|`` pushed to ``r``. Forward cost ``O(n log n)`` (sorting) for the
    simplex and L1, ``O(n)`` otherwise; backward ``O(n)`` (formulas in the module docstring).

    Raises:
        DDNError: unknown ``kind``, bad ``dim``, NaN/Inf in ``x``, non-positive or non-broadcastable ``radius``.
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise DDNError("x must be a floating-point tensor")
    if kind not in KINDS:
        raise DDNError(f"kind must be one of {KINDS}, got {kind!r}")
    if x.dim() == 0:
        raise DDNError("x must have at least one dimension")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise DDNError(f"dim {dim!r} is out of range for an input with {x.dim()} dimensions")
    n = x.shape[dim]
    if n == 0:
        raise DDNError(f"x has an empty projected dimension (shape {tuple(x.shape)})")
    xm = x.movedim(dim, -1)
    batch_shape = xm.shape[:-1]
    x2 = xm.reshape(-1, n)
    if x2.shape[0] == 0:
        return x.clone()
    bad = ~torch.isfinite(x2.detach()).all(-1)
    if bool(bad.any()):
        raise DDNError(f"x contains NaN or Inf at (flattened) elements {element_list(bad)}")
    if isinstance(radius, Tensor):
        r = radius.to(dtype=x.dtype, device=x.device)
    else:
        r = torch.tensor(float(radius), dtype=x.dtype, device=x.device)
    try:
        r = r.expand(batch_shape).reshape(-1, 1)
    except RuntimeError as exc:
        raise DDNError(f"radius of shape {tuple(r.shape)} does not broadcast to {tuple(batch_shape)}") from exc
    rbad = ~(torch.isfinite(r.detach()) & (r.detach() > 0)).reshape(-1)
    if bool(rbad.any()):
        raise DDNError(f"radius must be finite and > 0; violated at (flattened) elements {element_list(rbad)}")
    y = _Project.apply(x2, r, kind)
    return y.reshape(xm.shape).movedim(-1, dim)


class EuclideanProjection(nn.Module):
    """Module form of :func:`project`: ``EuclideanProjection(kind, radius=1.0, dim=-1)(x)``."""

    def __init__(self, kind: str, radius: Union[float, Tensor] = 1.0, dim: int = -1) -> None:
        super().__init__()
        if kind not in KINDS:
            raise DDNError(f"kind must be one of {KINDS}, got {kind!r}")
        self.kind = kind
        self.radius = radius
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return project(x, self.kind, self.radius, self.dim)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, dim={self.dim}"
