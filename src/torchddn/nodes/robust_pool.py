r"""Robust pooling: the minimiser of a sum of robust penalties, with an exact closed-form implicit backward.

Scalar pooling (:func:`robust_pool`) computes, for every slice of ``x`` over the pooled dimensions,

.. math::  y = \arg\min_u \sum_i \phi(u - x_i; \alpha),

and vector pooling (:func:`robust_vector_pool`) pools a set of vectors ``x_i`` in ``R^d``,

.. math::  y = \arg\min_{u \in R^d} \sum_i \phi(\|u - x_i\|; \alpha).

The penalties are those of :mod:`torchddn.nodes.penalties`. Gradients follow from the implicit function theorem
at the returned minimiser: with ``H = sum_i phi''(y - x_i)``,
``dy/dx_i = phi''(y - x_i) / H`` and ``dy/dalpha = -sum_i d phi'(y - x_i)/d alpha / H`` (vector case:
``dy/dx_i = H^{-1} M_i`` with ``M_i = 2 rho'(s_i) I + 4 rho''(s_i) z_i z_i^T``, ``z_i = y - x_i``, ``s_i = |z_i|^2``,
``H = sum_i M_i``, ``rho(s) = phi(sqrt(s))``).

Non-regular points: where ``H`` vanishes (1D; e.g. every point is an outlier of a truncated quadratic, or a flat
Huber minimum between two far groups) or is singular (vector case), the gradient does not exist; the backward
returns the minimum-norm choice (zero in 1D, the pseudo-inverse solution in the vector case), never NaN, and warns
with :class:`~torchddn.diagnostics.NonRegularWarning` naming the elements.
"""
from __future__ import annotations

import math
import warnings
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

from torchddn.nodes._callable import make_callable
from torchddn.diagnostics import DDNError, NonRegularWarning, element_list
from torchddn.implicit import fold_vmap
from torchddn.nodes.penalties import (
    Penalty,
    Quadratic,
    TruncatedQuadratic,
    Welsch,
    get_penalty,
    gauss,
)

__all__ = ["robust_pool", "RobustPool", "robust_vector_pool", "RobustVectorPool"]

Alpha = Union[float, Tensor]

# Work per chunk of the multi-start solvers, in tensor elements (bounds memory to a few hundred MB).
_CHUNK_ELEMS = 1 << 22
# Elements per chunk of the 1D solvers and backward on CPU. Temporaries of ~1 MB stay in the cache and are recycled
# by the allocator, whereas one 32 MB temporary per elementwise op costs a fresh mapping and page faults each time
# (measured 10-20x slower per Newton iteration at PointNet's 16 x 512 x 1024). On CUDA the whole batch is one chunk.
_CPU_CHUNK_ELEMS = 1 << 18


def _row_chunks(B: int, per_row: int, device: torch.device) -> range:
    """Start rows of the chunks that process ``B`` rows of ``per_row`` elements each (``.step`` rows per chunk)."""
    if device.type != "cpu":
        return range(0, B, max(B, 1))
    return range(0, B, max(1, _CPU_CHUNK_ELEMS // max(1, per_row)))


# ---------------------------------------------------------------------------------------------------------------
# input handling
# ---------------------------------------------------------------------------------------------------------------
def _check_x(x: Tensor, name: str = "x") -> None:
    if not isinstance(x, Tensor):
        raise DDNError(f"{name} must be a tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise DDNError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")


def _plain(t: Tensor) -> Tensor:
    """The plain tensor under any ``torch.func`` wrappers (vmap / grad / jvp levels), detached: input checks run
    on its values, so that they stay valid (and data-dependent) under the transforms."""
    from torch._C import _functorch
    t = t.detach()
    while _functorch.is_functorch_wrapped_tensor(t):
        t = _functorch.get_unwrapped(t)
    return t


def _check_finite(x2: Tensor, name: str) -> None:
    """x2 is (B, ...); raise naming the batch rows that hold NaN/Inf (of the plain tensor under ``torch.func``)."""
    xd = _plain(x2)
    xd = xd.reshape(-1, max(1, math.prod(x2.shape[1:])))
    # amax / amin propagate NaN and keep +-Inf: two cheap reductions instead of a full boolean mask
    bad = ~(torch.isfinite(xd.amax(-1)) & torch.isfinite(xd.amin(-1)))
    if bool(bad.any()):
        raise DDNError(f"{name} contains NaN or Inf at (flattened) output elements {element_list(bad)}")


def _alpha_rows(alpha: Alpha, out_shape: Sequence[int], like: Tensor, name: str = "alpha") -> Tensor:
    """Broadcast ``alpha`` (float or tensor broadcastable to ``out_shape``) to ``(B, 1)``, tracking autograd."""
    if isinstance(alpha, Tensor):
        a = alpha.to(dtype=like.dtype, device=like.device)
    else:
        try:
            a = torch.tensor(float(alpha), dtype=like.dtype, device=like.device)
        except (TypeError, ValueError) as exc:
            raise DDNError(f"{name} must be a positive float or tensor, got {alpha!r}") from exc
    try:
        a = a.expand(tuple(out_shape))
    except RuntimeError as exc:
        raise DDNError(f"{name} of shape {tuple(a.shape)} does not broadcast to the output shape "
                       f"{tuple(out_shape)}") from exc
    a = a.reshape(-1, 1)
    ad = _plain(a)
    bad = ~(torch.isfinite(ad) & (ad > 0)).reshape(-1)
    if bool(bad.any()):
        raise DDNError(f"{name} must be finite and > 0; violated at (flattened) output elements "
                       f"{element_list(bad)}")
    return a


def _normalise_dims(dim: Union[int, Sequence[int]], ndim: int) -> list[int]:
    dims = [dim] if isinstance(dim, int) else list(dim)
    if not dims:
        raise DDNError("dim must name at least one dimension")
    out = []
    for d in dims:
        if not isinstance(d, int) or not -ndim <= d < ndim:
            raise DDNError(f"dim {d!r} is out of range for an input with {ndim} dimensions")
        out.append(d % ndim)
    if len(set(out)) != len(out):
        raise DDNError(f"dim {dim!r} repeats a dimension")
    return sorted(out)


def _tol(dtype: torch.dtype) -> float:
    return 4 * torch.finfo(dtype).eps


# ---------------------------------------------------------------------------------------------------------------
# 1D solvers: x (B, n), a (B, 1) -> y (B,)
# ---------------------------------------------------------------------------------------------------------------
def _solve_convex_1d(pen: Penalty, x: Tensor, a: Tensor, max_iter: int = 100) -> Tensor:
    """Safeguarded Newton on the increasing derivative ``g(u) = sum_i phi'(u - x_i)``.

    The root is bracketed by ``[min x, max x]``; each step is Newton's when it lands strictly inside the current
    bracket and the previous step at least halved ``|g|``, else bisection (``rtsafe``). Quadratic convergence for
    pseudo-Huber, finite termination for Huber (piecewise linear ``g``); at worst linear (bisection), so
    ``max_iter = 100`` reaches machine precision. Cost ``O(n)`` per iteration per element.
    """
    lo = x.amin(-1)
    hi = x.amax(-1)
    tol = 2 * torch.finfo(x.dtype).eps * torch.maximum(lo.abs(), hi.abs())
    u = x.mean(-1).clamp(lo, hi)
    g_prev = torch.full_like(u, math.inf)
    active = torch.ones_like(u, dtype=torch.bool)
    for _ in range(max_iter):
        z = u[:, None] - x
        d1, d2 = pen.dphi_d2phi(z, a)
        g = d1.sum(-1)
        h = d2.sum(-1)
        lo = torch.where(g < 0, u, lo)
        hi = torch.where(g > 0, u, hi)
        newton = u - g / torch.where(h > 0, h, torch.ones_like(h))
        small = (h > 0) & ((newton - u).abs() <= tol)  # converged: accept the last Newton step
        take_newton = small | ((h > 0) & (newton > lo) & (newton < hi) & (g.abs() <= 0.5 * g_prev.abs()))
        u_new = torch.where(take_newton, newton, 0.5 * (lo + hi))
        done = (g == 0) | small | ((hi - lo) <= tol)
        u_new = torch.where((g == 0) | ~active, u, u_new)
        active = active & ~done
        g_prev = torch.where(take_newton, g, torch.full_like(g, math.inf))
        u = u_new
        if not bool(active.any()):
            break
    return u


def _solve_truncated_quadratic_1d(x: Tensor, a: Tensor) -> Tensor:
    """Exact global minimiser by a sorted sweep.

    As ``u`` sweeps the line the inlier set ``S(u) = {i : |u - x_i| < alpha}`` changes only at the breakpoints
    ``x_j - alpha`` (``x_j`` enters) and ``x_j + alpha`` (``x_j`` leaves), and it is a contiguous run of the
    sorted data. For any set ``S``, ``c_S(u) = sum_{i in S} (u - x_i)^2 / 2 + (n - |S|) alpha^2 / 2 >= f(u)``,
    with equality for ``S = S(u)``; so ``min_S c_S(mean(S)) = min_u f(u)`` over the ``2n`` sets that follow each
    breakpoint (found with ``searchsorted``), and the best set's mean is a global minimiser. Each candidate is
    scored in ``O(1)`` from cumulative sums (accumulated in float64 for accuracy), and the winner's inlier mean is
    recomputed directly. Cost ``O(n log n)`` time and ``O(n)`` memory per element. Ties between equally good
    minimisers go to the first candidate.
    """
    B, n = x.shape
    xs, _ = torch.sort(x, dim=-1)
    c = xs[:, (n - 1) // 2:(n - 1) // 2 + 1]  # the (lower) median: centre for accurate sums
    xs = xs - c
    tie_end = torch.searchsorted(xs, xs, right=True)  # one past the last entry equal to xs_j
    # after x_j - alpha: entered {x_i <= x_j}, left {x_i <= x_j - 2 alpha}
    lo_e = torch.searchsorted(xs, (xs - 2 * a).contiguous(), right=True)
    # after x_j + alpha: left {x_i <= x_j}, entered {x_i <= x_j + 2 alpha}
    hi_l = torch.searchsorted(xs, (xs + 2 * a).contiguous(), right=True)
    lo = torch.cat([lo_e, tie_end], -1)
    hi = torch.cat([tie_end, hi_l], -1)
    acc = torch.float64 if x.dtype in (torch.float16, torch.bfloat16, torch.float32) else x.dtype
    xa = xs.to(acc)
    zero = torch.zeros(B, 1, dtype=acc, device=x.device)
    s1 = torch.cat([zero, xa.cumsum(-1)], -1)
    s2 = torch.cat([zero, (xa * xa).cumsum(-1)], -1)
    cnt = (hi - lo).to(acc)
    S1 = s1.gather(-1, hi) - s1.gather(-1, lo)
    S2 = s2.gather(-1, hi) - s2.gather(-1, lo)
    safe = cnt.clamp_min(1)
    aa = a.to(acc)
    cost = 0.5 * (S2 - S1 * S1 / safe) + 0.5 * aa * aa * (n - cnt)
    cost = torch.where(cnt > 0, cost, torch.full_like(cost, math.inf))
    k = cost.argmin(-1, keepdim=True)
    y = (S1.gather(-1, k) / safe.gather(-1, k)).to(x.dtype)
    # recompute the inlier mean directly (pairwise-summed, in the input dtype)
    inl = ((y - xs).abs() < a).to(x.dtype)
    ninl = inl.sum(-1, keepdim=True)
    y = torch.where(ninl > 0, (inl * xs).sum(-1, keepdim=True) / ninl.clamp_min(1), y)
    return (y + c).squeeze(-1)


def _welsch_starts(x: Tensor, a: Tensor, exact_starts: int, max_starts: int) -> Tensor:
    """Starting points (B, K) for the multi-start Welsch solver (see :func:`_solve_welsch_1d`)."""
    B, n = x.shape
    xs, _ = torch.sort(x, dim=-1)
    if n <= exact_starts:
        return xs
    # kernel-density proxy at every data point from window counts (a step approximation of the Gaussian)
    widths = torch.tensor([1.0, 2.0], dtype=x.dtype, device=x.device)
    kern = torch.exp(-0.5 * torch.cat([torch.zeros_like(widths[:1]), widths]) ** 2)
    weights = kern[:-1] - kern[1:]  # (W,) so that the step kernel matches exp(-t^2/2) at the widths
    W = widths.numel()
    off = (a[:, :, None] * widths[None, None, :])  # (B, 1, W)
    q_hi = (xs[:, :, None] + off).reshape(B, -1).contiguous()
    q_lo = (xs[:, :, None] - off).reshape(B, -1).contiguous()
    cnt = (torch.searchsorted(xs, q_hi, right=True) - torch.searchsorted(xs, q_lo, right=False))
    score = (cnt.reshape(B, n, W).to(x.dtype) * weights).sum(-1)  # (B, n)
    # one start per contiguous block of the sorted data: the block's densest point (keeps the starts diverse)
    K = max_starts
    per = -(-n // K)
    pad = per * K - n
    if pad:
        score = torch.cat([score, torch.full((B, pad), -math.inf, dtype=x.dtype, device=x.device)], -1)
        xs_p = torch.cat([xs, xs[:, -1:].expand(B, pad)], -1)
    else:
        xs_p = xs
    best = score.reshape(B, K, per).argmax(-1)  # (B, K)
    idx = best + torch.arange(K, device=x.device) * per
    return xs_p.gather(-1, idx)


def _solve_welsch_1d(x: Tensor, a: Tensor, exact_starts: int = 64, max_starts: int = 4,
                     multi_iter: int = 10, max_iter: int = 100) -> Tensor:
    """Global Welsch minimiser by vectorised multi-start Newton / IRLS.

    Starts: the mean, the median, and every data point when ``n <= exact_starts`` (each local minimiser of the Welsch objective is a mode of
    the Gaussian kernel density of the data; mean-shift from the data points reaches every mode in practice), at a
    cost of ``O(n^2)`` per iteration per element; otherwise ``max_starts`` points, one per block of the sorted
    data, each the densest point of its block according to a window-count kernel-density proxy
    (``O(n log n)``), so the cost is ``O(max_starts n)`` per iteration. Each start runs Newton steps where the
    curvature is positive and mean-shift (IRLS, guaranteed descent) steps otherwise; a Newton step that increased
    the objective is replaced by the mean-shift step. All starts run at most ``multi_iter`` iterations; the start
    with the lowest objective (ties: the first) is then polished alone to convergence (``max_iter``). Starts are
    processed in chunks of the batch to bound memory.
    """
    B, n = x.shape
    out = torch.empty(B, dtype=x.dtype, device=x.device)
    K_est = (n if n <= exact_starts else max_starts) + 2
    budget = _CPU_CHUNK_ELEMS if x.device.type == "cpu" else _CHUNK_ELEMS
    rows = max(1, budget // max(1, K_est * n))
    for r0 in range(0, B, rows):
        xc, ac = x[r0:r0 + rows], a[r0:r0 + rows]
        U = torch.cat([xc.mean(-1, keepdim=True), xc.median(-1, keepdim=True).values,
                       _welsch_starts(xc, ac, exact_starts, max_starts)], -1)  # (b, K + 2)
        # phase 1: all starts, a bounded number of iterations; phase 2: polish the best start to convergence
        U, F = _welsch_iterate(U, xc, ac, multi_iter)
        k = F.argmin(-1, keepdim=True)
        U, _ = _welsch_iterate(U.gather(-1, k), xc, ac, max_iter)
        out[r0:r0 + rows] = U.squeeze(-1)
    return out


def _welsch_iterate(U: Tensor, x: Tensor, a: Tensor, max_iter: int) -> tuple[Tensor, Tensor]:
    """Newton / mean-shift iterations from starts U (b, K) for data x (b, n); returns U and the objective F."""
    n = x.shape[-1]
    eps = torch.finfo(x.dtype).eps
    a2 = (a * a)[:, :, None]  # (b, 1, 1)
    a2s = a2[..., 0]
    xr = x[:, None, :]
    tol = _tol(x.dtype) * (x.abs().amax(-1, keepdim=True) + a)
    ftol = 8 * eps * n
    U_prev = U.clone()
    F_prev = torch.full_like(U, math.inf)
    ms_prev = torch.zeros_like(U)
    active = torch.ones_like(U, dtype=torch.bool)
    for _ in range(max_iter):
        z = U[:, :, None] - xr
        e = gauss(z * z / a2)
        se = e.sum(-1)
        F = n - se
        ze = (z * e).sum(-1)
        g = ze / a2s
        h = (se - (z * z * e).sum(-1) / a2s) / a2s
        ms = -ze / se.clamp_min(torch.finfo(x.dtype).tiny)  # mean-shift (IRLS) step: never increases F
        bad = F > F_prev + ftol  # the last Newton step increased F: take the mean-shift step instead
        step = torch.where(h > 0, -g / torch.where(h > 0, h, torch.ones_like(h)), ms)
        U_next = torch.where(bad, U_prev + ms_prev, U + step)
        keep = ~bad
        U_prev = torch.where(keep, U, U_prev)
        F_prev = torch.where(keep, F, F_prev)
        ms_prev = torch.where(keep, ms, ms_prev)
        done = keep & (step.abs() <= tol)
        active = active & ~done
        U = torch.where(active, U_next, U)
        if not bool(active.any()):
            break
    z = U[:, :, None] - xr
    F = n - gauss(z * z / a2).sum(-1)
    return U, F


def _solve_1d(pen: Penalty, x: Tensor, a: Tensor, exact_starts: int, max_starts: int) -> Tensor:
    if isinstance(pen, Quadratic):
        return x.mean(-1)
    if isinstance(pen, Welsch):
        return _solve_welsch_1d(x, a, exact_starts, max_starts)  # chunks by its own work estimate
    if isinstance(pen, TruncatedQuadratic):
        solver = _solve_truncated_quadratic_1d
    elif pen.convex:
        def solver(xc: Tensor, ac: Tensor) -> Tensor:
            return _solve_convex_1d(pen, xc, ac)
    else:
        raise DDNError(f"no global solver for the nonconvex penalty {pen!r}")
    B, n = x.shape
    chunks = _row_chunks(B, n, x.device)
    if len(chunks) == 1:
        return solver(x, a)
    out = x.new_empty(B)
    for r0 in chunks:
        out[r0:r0 + chunks.step] = solver(x[r0:r0 + chunks.step], a[r0:r0 + chunks.step])
    return out


class _RobustPool1d(torch.autograd.Function):
    """``y = argmin_u sum_i phi(u - x_i; a)`` per row; implicit backward and forward-mode with the diagonal
    operator ``H = sum_i phi''(y - x_i)``. The backward is differentiable (double backward) when grad mode is on."""

    @staticmethod
    def forward(x: Tensor, a: Tensor, pen: Penalty, exact_starts: int, max_starts: int) -> Tensor:
        with torch.no_grad():
            return _solve_1d(pen, x, a, exact_starts, max_starts)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, a, pen, _, _ = inputs
        ctx.pen = pen
        ctx.save_for_backward(x, a, output)
        ctx.save_for_forward(x, a, output)

    @staticmethod
    def vmap(info, in_dims, x, a, pen, exact_starts, max_starts):
        return fold_vmap(_RobustPool1d.apply, info, in_dims, (x, a, pen, exact_starts, max_starts))

    @staticmethod
    def jvp(ctx, dx: Optional[Tensor], da: Optional[Tensor], *_):
        # tangent of sum_i phi'(y - x_i) = 0:  H dy = sum_i phi''_i dx_i - sum_i dphi'_i/dalpha da
        x, a, y = ctx.saved_tensors
        pen = ctx.pen
        z = y[:, None] - x
        w = pen.d2phi(z, a)
        H = w.sum(-1)
        habs = H if pen.convex else w.abs().sum(-1)
        nonreg = H <= torch.finfo(x.dtype).eps ** 0.5 * habs
        rhs = torch.zeros_like(y)
        if dx is not None:
            rhs = rhs + (w * dx).sum(-1)
        if da is not None:
            rhs = rhs - pen.dphi_dalpha(z, a).sum(-1) * da[:, 0]
        return torch.where(nonreg, torch.zeros_like(rhs), rhs / torch.where(nonreg, torch.ones_like(H), H))

    @staticmethod
    def backward(ctx, gy: Tensor):
        x, a, y = ctx.saved_tensors
        pen = ctx.pen
        need_x, need_a = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if torch.is_grad_enabled():
            return _RobustPool1d._backward_graph(pen, x, a, y, gy, need_x, need_a)
        B, n = x.shape
        # One pass over x in cache-sized chunks: phi'' goes straight into the gradient's storage (scaled in place
        # below), with its row sums H and sum |phi''|; and the alpha derivative's row sums when needed.
        gx = torch.empty_like(x) if need_x else None
        H, Habs = x.new_empty(B), x.new_empty(B)
        dpa = x.new_empty(B) if need_a else None
        chunks = _row_chunks(B, n, x.device)
        for r0 in chunks:
            sl = slice(r0, r0 + chunks.step)
            z = y[sl, None] - x[sl]
            w = pen.d2phi(z, a[sl])
            H[sl] = w.sum(-1)
            Habs[sl] = H[sl] if pen.convex else w.abs().sum(-1)
            if need_x:
                gx[sl] = w
            if need_a:
                dpa[sl] = pen.dphi_dalpha(z, a[sl]).sum(-1)
        nonreg = _warn_nonreg_1d(pen, H, Habs, x.dtype)
        Hs = torch.where(nonreg, torch.ones_like(H), H)
        coef = torch.where(nonreg, torch.zeros_like(gy), gy / Hs)
        ga = None
        if need_x:
            for r0 in chunks:
                gx[r0:r0 + chunks.step].mul_(coef[r0:r0 + chunks.step, None])
        if need_a:
            ga = (-coef * dpa)[:, None]
        return gx, ga, None, None, None

    @staticmethod
    def _backward_graph(pen: Penalty, x: Tensor, a: Tensor, y: Tensor, gy: Tensor, need_x: bool,
                        need_a: bool):
        """The same backward with out-of-place differentiable ops (``y`` is this Function's output, so a
        second differentiation goes through it again): exact double backward, and safe under ``torch.func``."""
        z = y[:, None] - x
        w = pen.d2phi(z, a)
        H = w.sum(-1)
        habs = H if pen.convex else w.abs().sum(-1)
        nonreg = _warn_nonreg_1d(pen, H.detach(), habs.detach(), x.dtype)
        coef = torch.where(nonreg, torch.zeros_like(gy), gy / torch.where(nonreg, torch.ones_like(H), H))
        gx = w * coef[:, None] if need_x else None
        ga = (-coef * pen.dphi_dalpha(z, a).sum(-1))[:, None] if need_a else None
        return gx, ga, None, None, None


def _warn_nonreg_1d(pen: Penalty, H: Tensor, Habs: Tensor, dtype: torch.dtype) -> Tensor:
    """Rows where ``H`` is at rounding level of the curvature terms (a degenerate minimum); warns about them."""
    nonreg = H <= torch.finfo(dtype).eps ** 0.5 * Habs
    if bool(nonreg.any()):
        warnings.warn(
            f"robust_pool ({pen.name}): the curvature sum H = sum_i phi''(y - x_i) vanishes at the solution, "
            f"so the minimiser is not differentiable (non-isolated minimum or every point an outlier); "
            f"returning the minimum-norm (zero) gradient at (flattened) output elements "
            f"{element_list(nonreg)}", NonRegularWarning, stacklevel=3)
    return nonreg


def robust_pool(x: Tensor, penalty: Union[str, Penalty], alpha: Alpha = 1.0,
                dim: Union[int, Sequence[int]] = -1, *, exact_starts: int = 64, max_starts: int = 4) -> Tensor:
    r"""Robust pooling ``y = argmin_u sum_i phi(u - x_i; alpha)`` over the dimensions ``dim``.

    Args:
        x: input tensor of any shape, float32 or float64, on any device.
        penalty: ``"quadratic"``, ``"pseudo_huber"``, ``"huber"``, ``"welsch"``, ``"truncated_quadratic"`` or a
            :class:`~torchddn.nodes.penalties.Penalty`.
        alpha: penalty scale, ``> 0``: a float or a tensor broadcastable to the output shape. Gradients flow to it
            when it is a tensor that requires grad.
        dim: pooled dimension(s), an int or a tuple, e.g. ``(-2, -1)`` for global 2D pooling.
        exact_starts, max_starts: Welsch multi-start budget (see below).

    Returns:
        ``y``: the shape of ``x`` with the pooled dimensions removed (like ``x.mean(dim)``).

    Forward (global minimum, to machine precision, fully vectorised):

    * quadratic: the mean.
    * pseudo-Huber, Huber (convex): safeguarded Newton on ``sum_i phi'(u - x_i) = 0`` from the mean, bracketed by
      ``[min x, max x]``; ``O(n)`` per iteration, a handful of iterations. (A start inside a flat Huber minimum
      stays there: the gradient is then the non-regular zero described below.)

    On CPU the solvers and the backward run over cache-sized chunks of rows (about 2^18 elements each), which keeps
    every temporary in the cache; on CUDA the batch is processed at once.
    * truncated quadratic: exact sorted sweep over the ``2n - 1`` intervals between breakpoints ``x_j +- alpha``;
      ``O(n log n)``.
    * Welsch: multi-start Newton / mean-shift; every data point is a start when ``n <= exact_starts``
      (``O(n^2)`` per iteration), else ``max_starts`` well-spread high-density data points (``O(max_starts n)``
      per iteration plus an ``O(n log n)`` density proxy). The best start's minimiser is returned.

    Backward (closed form, ``O(n)``): ``dy/dx_i = phi''(y - x_i) / H``, ``dy/dalpha = -sum_i dphi'/dalpha / H``
    with ``H = sum_i phi''(y - x_i)``. Where ``H <= sqrt(eps) sum_i |phi''(y - x_i)|`` (a degenerate minimum, e.g.
    a Welsch minimum at a bifurcation) the gradient does not exist: zero is returned with a
    :class:`~torchddn.diagnostics.NonRegularWarning`.

    Raises:
        DDNError: non-floating or empty input, NaN/Inf in ``x``, non-positive or non-broadcastable ``alpha``,
            bad ``dim`` or unknown penalty.
    """
    _check_x(x)
    pen = get_penalty(penalty)
    dims = _normalise_dims(dim, x.dim()) if x.dim() > 0 else None
    if dims is None:
        raise DDNError("x must have at least one dimension to pool over")
    keep = [d for d in range(x.dim()) if d not in dims]
    out_shape = [x.shape[d] for d in keep]
    n = 1
    for d in dims:
        n *= x.shape[d]
    if n == 0:
        raise DDNError(f"the pooled dimensions {tuple(dims)} of x (shape {tuple(x.shape)}) are empty")
    x2 = x.permute(*keep, *dims).reshape(-1, n)
    if x2.shape[0] == 0:
        return x.new_zeros(out_shape)
    _check_finite(x2, "x")
    a = _alpha_rows(alpha, out_shape, x2)
    y = _RobustPool1d.apply(x2, a, pen, int(exact_starts), int(max_starts))
    return y.reshape(out_shape)


class RobustPool(nn.Module):
    """Module form of :func:`robust_pool`: ``RobustPool(penalty, alpha=1.0, dim=-1)(x)``.

    ``alpha`` may be a float (fixed) or a tensor; pass an ``nn.Parameter`` to learn it.
    """

    def __init__(self, penalty: Union[str, Penalty], alpha: Alpha = 1.0, dim: Union[int, Sequence[int]] = -1,
                 *, exact_starts: int = 64, max_starts: int = 4) -> None:
        super().__init__()
        self.penalty = get_penalty(penalty)
        self.alpha = alpha
        self.dim = dim
        self.exact_starts = exact_starts
        self.max_starts = max_starts

    def forward(self, x: Tensor) -> Tensor:
        return robust_pool(x, self.penalty, self.alpha, self.dim, exact_starts=self.exact_starts,
                           max_starts=self.max_starts)

    def extra_repr(self) -> str:
        return f"penalty={self.penalty.name!r}, dim={self.dim}"


# ---------------------------------------------------------------------------------------------------------------
# vector pooling: x (B, n, d), a (B, 1) -> y (B, d)
# ---------------------------------------------------------------------------------------------------------------
def _vector_starts(x: Tensor, a: Tensor, pen: Penalty, max_starts: int) -> Tensor:
    """(B, K, d) starting points: the mean for convex penalties; for nonconvex ones the mean and every point when
    ``n <= max_starts``, else the mean and the ``max_starts`` points with the most neighbours within ``alpha``."""
    B, n, d = x.shape
    if pen.convex:
        return x.mean(1, keepdim=True)
    mean = x.mean(1, keepdim=True)
    if n <= max_starts:
        return torch.cat([mean, x], 1)
    cnt = torch.zeros(B, n, dtype=x.dtype, device=x.device)
    rows = max(1, _CHUNK_ELEMS // max(1, n * n))
    for r0 in range(0, B, rows):
        dist = torch.cdist(x[r0:r0 + rows], x[r0:r0 + rows])
        cnt[r0:r0 + rows] = (dist < a[r0:r0 + rows, :, None]).to(x.dtype).sum(-1)
    idx = cnt.topk(max_starts, dim=-1).indices
    return torch.cat([mean, x.gather(1, idx[:, :, None].expand(B, max_starts, d))], 1)


def _solve_vector(pen: Penalty, x: Tensor, a: Tensor, max_starts: int, max_iter: int = 200) -> Tensor:
    """Multi-start Newton / IRLS for ``min_u sum_i rho(|u - x_i|^2)``.

    IRLS (``u <- sum_i w_i x_i / sum_i w_i``, ``w_i = rho'(s_i)``) is a majorise-minimise step because every
    ``rho`` here is concave in ``s``, so it never increases the objective. Newton steps (one batched ``d x d``
    Cholesky solve per start) are taken where the Hessian is positive definite; a Newton step that increased the
    objective is replaced by the IRLS step. Cost ``O(K n d + K d^3)`` per iteration with ``K`` starts.
    """
    B, n, d = x.shape
    if isinstance(pen, Quadratic):
        return x.mean(1)
    out = torch.empty(B, d, dtype=x.dtype, device=x.device)
    K_est = 1 if pen.convex else min(n, max_starts) + 1
    rows = max(1, _CHUNK_ELEMS // max(1, K_est * n * d))
    eps = torch.finfo(x.dtype).eps
    for r0 in range(0, B, rows):
        xc, ac = x[r0:r0 + rows], a[r0:r0 + rows]
        b = xc.shape[0]
        U = _vector_starts(xc, ac, pen, max_starts)  # (b, K, d)
        K = U.shape[1]
        ar = ac[:, :, None]  # (b, 1, 1) against (b, K, n)
        xr = xc[:, None, :, :]
        scale = xc.abs().amax((-2, -1))[:, None] + ac  # (b, 1)
        tol = _tol(x.dtype) * scale
        ftol = 8 * eps * n * (1 + scale)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        U_prev = U.clone()
        F_prev = torch.full((b, K), math.inf, dtype=x.dtype, device=x.device)
        irls_prev = torch.zeros_like(U)
        active = torch.ones(b, K, dtype=torch.bool, device=x.device)
        for _ in range(max_iter):
            z = U[:, :, None, :] - xr  # (b, K, n, d)
            s = (z * z).sum(-1)
            F = pen.rho(s, ar).sum(-1)
            w = pen.drho(s, ar)
            sw = w.sum(-1)
            grad = 2 * (w[..., None] * z).sum(-2)  # (b, K, d)
            irls = -grad / (2 * sw.clamp_min(torch.finfo(x.dtype).tiny))[..., None]
            v = pen.d2rho(s, ar)
            Hm = 2 * sw[..., None, None] * eye + 4 * torch.einsum("bkn,bkni,bknj->bkij", v, z, z)
            L, info = torch.linalg.cholesky_ex(Hm)
            pd = info == 0
            newton = -torch.cholesky_solve(grad[..., None], L).squeeze(-1)
            step = torch.where(pd[..., None] & torch.isfinite(newton), newton, irls)
            bad = F > F_prev + ftol
            U_next = torch.where(bad[..., None], U_prev + irls_prev, U + step)
            keep = ~bad
            U_prev = torch.where(keep[..., None], U, U_prev)
            F_prev = torch.where(keep, F, F_prev)
            irls_prev = torch.where(keep[..., None], irls, irls_prev)
            done = keep & (step.norm(dim=-1) <= tol)
            active = active & ~done
            U = torch.where(active[..., None], U_next, U)
            if not bool(active.any()):
                break
        z = U[:, :, None, :] - xr
        F = pen.rho((z * z).sum(-1), ar).sum(-1)
        k = F.argmin(-1)
        out[r0:r0 + rows] = U[torch.arange(b, device=x.device), k]
    return out


class _RobustVectorPool(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, a: Tensor, pen: Penalty, max_starts: int) -> Tensor:
        with torch.no_grad():
            y = _solve_vector(pen, x, a, max_starts)
        ctx.pen = pen
        ctx.save_for_backward(x, a, y)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, a, y = ctx.saved_tensors
        pen = ctx.pen
        B, n, d = x.shape
        z = y[:, None, :] - x  # (B, n, d)
        s = (z * z).sum(-1)
        w = pen.drho(s, a)  # (B, n)
        v = pen.d2rho(s, a)
        eye = torch.eye(d, dtype=x.dtype, device=x.device)
        H = 2 * w.sum(-1)[:, None, None] * eye + 4 * torch.einsum("bn,bni,bnj->bij", v, z, z)
        L, info = torch.linalg.cholesky_ex(H)
        q = torch.cholesky_solve(gy[..., None], L).squeeze(-1)  # H^{-1} gy
        # singular: failed Cholesky, non-finite solve, or a pivot ratio at rounding level
        # (the smallest Cholesky pivot against the curvature scale sum_i |M_i|, the 1D rule's analogue)
        diag = torch.diagonal(L, dim1=-2, dim2=-1).abs()
        curv = (2 * w.abs() + 4 * v.abs() * s).sum(-1)
        illcond = (diag.amin(-1) ** 2) <= torch.finfo(x.dtype).eps ** 0.5 * curv
        nonreg = (info != 0) | ~torch.isfinite(q).all(-1) | illcond
        if bool(nonreg.any()):
            warnings.warn(
                f"robust_vector_pool ({pen.name}): the Hessian sum_i M_i at the solution is singular, so the "
                f"minimiser is not differentiable; returning the minimum-norm (pseudo-inverse) gradient at "
                f"(flattened) output elements {element_list(nonreg)}", NonRegularWarning, stacklevel=2)
            qp = (torch.linalg.pinv(H[nonreg], hermitian=True,
                                    rtol=torch.finfo(x.dtype).eps ** 0.5) @ gy[nonreg][..., None]).squeeze(-1)
            q = q.clone()
            q[nonreg] = qp
        gx = ga = None
        if ctx.needs_input_grad[0]:
            # dL/dx_i = M_i q with M_i = 2 w_i I + 4 v_i z_i z_i^T (M_i symmetric)
            zq = (z * q[:, None, :]).sum(-1)
            gx = 2 * w[..., None] * q[:, None, :] + 4 * (v * zq)[..., None] * z
        if ctx.needs_input_grad[1]:
            # d(grad_u f)/d alpha = sum_i 2 drho_dalpha(s_i) z_i;  dy/dalpha = -H^{-1} that
            dga = 2 * (pen.drho_dalpha(s, a)[..., None] * z).sum(1)
            ga = -(dga * q).sum(-1, keepdim=True)
        return gx, ga, None, None


def robust_vector_pool(x: Tensor, penalty: Union[str, Penalty], alpha: Alpha = 1.0, dim: int = -2, *,
                       max_starts: int = 32) -> Tensor:
    r"""Robust vector pooling ``y = argmin_{u in R^d} sum_i phi(|u - x_i|; alpha)``.

    The feature dimension is always the last one (``d = x.shape[-1]``); ``dim`` names the set dimension pooled
    over (default ``-2``, i.e. ``x`` of shape ``(..., n, d)``).

    Args:
        x: ``(..., n, ..., d)`` float32/float64 tensor on any device.
        penalty: as for :func:`robust_pool`; penalties are evaluated in the squared norm ``s = |u - x_i|^2``, which
            is smooth at ``u = x_i``.
        alpha: ``> 0``, a float or a tensor broadcastable to the output's batch shape (the output shape without
            its last dimension).
        dim: the set dimension (not the last one).
        max_starts: multi-start budget of the nonconvex penalties.

    Returns:
        ``y`` of shape ``x.shape`` without ``dim`` (``(..., d)``).

    Forward: quadratic is the mean; convex penalties run IRLS/Newton from the mean (unique minimiser);
    Welsch and truncated quadratic run the same iteration from every point (``n <= max_starts``, cost
    ``O(n^2 d)`` per iteration) or from the ``max_starts`` points with the most neighbours within ``alpha``
    (an ``O(n^2 d)`` selection once, then ``O(max_starts n d)`` per iteration), and keep the best. In ``d >= 2`` the
    nonconvex problems have no known polynomial global method; the result is the best local minimiser found.

    Backward: ``dL/dx_i = M_i H^{-1} dL/dy`` with ``M_i = 2 rho'(s_i) I + 4 rho''(s_i) z_i z_i^T``,
    ``H = sum_i M_i`` (one batched ``d x d`` Cholesky solve per element), and
    ``dL/dalpha = -(H^{-1} dL/dy)^T sum_i 2 d rho'(s_i)/d alpha z_i``. Singular ``H`` (failed Cholesky, or a
    squared pivot ``<= sqrt(eps) sum_i |M_i|``): pseudo-inverse (minimum-norm) gradient with a
    :class:`~torchddn.diagnostics.NonRegularWarning`.
    """
    _check_x(x)
    pen = get_penalty(penalty)
    if x.dim() < 2:
        raise DDNError(f"x must have shape (..., n, d) with at least 2 dimensions, got {tuple(x.shape)}")
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise DDNError(f"dim {dim!r} is out of range for an input with {x.dim()} dimensions")
    dim = dim % x.dim()
    if dim == x.dim() - 1:
        raise DDNError("dim must be the set dimension, not the last (feature) dimension")
    n, d = x.shape[dim], x.shape[-1]
    if n == 0 or d == 0:
        raise DDNError(f"x of shape {tuple(x.shape)} has an empty set or feature dimension")
    xm = x.movedim(dim, -2)
    batch_shape = list(xm.shape[:-2])
    x3 = xm.reshape(-1, n, d)
    if x3.shape[0] == 0:
        return x.new_zeros(batch_shape + [d])
    _check_finite(x3, "x")
    a = _alpha_rows(alpha, batch_shape, x3)
    y = _RobustVectorPool.apply(x3, a, pen, int(max_starts))
    return y.reshape(batch_shape + [d])


class RobustVectorPool(nn.Module):
    """Module form of :func:`robust_vector_pool`: ``RobustVectorPool(penalty, alpha=1.0, dim=-2)(x)``."""

    def __init__(self, penalty: Union[str, Penalty], alpha: Alpha = 1.0, dim: int = -2, *,
                 max_starts: int = 32) -> None:
        super().__init__()
        self.penalty = get_penalty(penalty)
        self.alpha = alpha
        self.dim = dim
        self.max_starts = max_starts

    def forward(self, x: Tensor) -> Tensor:
        return robust_vector_pool(x, self.penalty, self.alpha, self.dim, max_starts=self.max_starts)

    def extra_repr(self) -> str:
        return f"penalty={self.penalty.name!r}, dim={self.dim}"


make_callable(__name__)  # torchddn.nodes.robust_pool is this module and calls robust_pool(...) (see nodes/_callable.py)
