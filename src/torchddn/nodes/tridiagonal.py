r"""Batched tridiagonal and block-tridiagonal linear solves with an implicit (transposed-solve) backward.

The node solves :math:`T y = d` for a (block) tridiagonal :math:`T` given by its three (block) diagonals,

.. math::
    T = \begin{pmatrix} B_0 & C_0 & & \\ A_0 & B_1 & C_1 & \\ & \ddots & \ddots & \ddots \\ & & A_{n-2} & B_{n-1}
    \end{pmatrix},

i.e. ``lower[i]`` sits at block (i + 1, i), ``diag[i]`` at (i, i) and ``upper[i]`` at (i, i + 1). As a declarative
node, :math:`y = \arg\min_u \tfrac12\|T u - d\|^2`; its gradient is the implicit one:
with :math:`\bar d = T^{-\top}\bar y` (one transposed solve), :math:`\bar T = -\bar d\,y^\top` restricted to the band.

Two forwards are provided, both without pivoting:

* ``"thomas"``: the Thomas algorithm (block LU), vectorised over the batch, a loop over the ``n`` rows.
* ``"cyclic"``: cyclic reduction, :math:`\lceil\log_2 n\rceil` levels, each a vectorised step over all rows.

Without pivoting a zero pivot can occur even for a nonsingular matrix (e.g. a zero on the diagonal); both methods are
exact for diagonally dominant or symmetric positive definite systems. A zero (or non-finite) pivot is reported per
batch element according to ``on_failure``.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from torchddn.diagnostics import DDNError, NonRegularWarning, element_list, report

__all__ = ["tridiagonal_solve", "TridiagonalSolve", "block_tridiagonal_solve", "BlockTridiagonalSolve"]

_METHODS = ("thomas", "cyclic")


# ----------------------------------------------------------------------------------------------------------------
# block operations: scalars are stored as 1 x 1 blocks; k == 1 uses elementwise arithmetic
# ----------------------------------------------------------------------------------------------------------------
def _mm(a: Tensor, x: Tensor) -> Tensor:
    """Block product ``a @ x`` for blocks ``(..., k, k)`` and ``(..., k, r)``."""
    if a.shape[-1] == 1:
        return a * x
    return a @ x


def _solve(b: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """Block solve ``b^{-1} x`` and a per-block flag of a zero pivot, shape ``b.shape[:-2]``."""
    if b.shape[-1] == 1:
        piv = b[..., 0, 0]
        bad = (piv == 0) | ~torch.isfinite(piv)
        return x / b, bad
    k = b.shape[-1]
    lead = b.shape[:-2]
    # one flat batch dimension keeps LAPACK's batched path (multi-dimensional batches are much slower on CPU)
    lu, pivots, info = torch.linalg.lu_factor_ex(b.reshape(-1, k, k))
    diag = torch.diagonal(lu, dim1=-2, dim2=-1)
    bad = (info != 0) | (diag == 0).any(-1) | ~torch.isfinite(diag).all(-1)
    safe_lu = torch.where(bad[..., None, None], torch.eye(k, dtype=b.dtype, device=b.device), lu)
    out = torch.linalg.lu_solve(safe_lu, pivots, x.reshape(-1, k, x.shape[-1]))
    return out.reshape(x.shape), bad.reshape(lead)


def _thomas(lo: Tensor, di: Tensor, up: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Block Thomas. ``lo``/``up``: (b, n-1, k, k), ``di``: (b, n, k, k), ``d``: (b, n, k, r). Returns (y, bad)."""
    n = di.shape[1]
    bad = torch.zeros(di.shape[0], dtype=torch.bool, device=di.device)
    cps, dps = [], []
    piv = di[:, 0]
    for i in range(n):
        if i > 0:
            piv = di[:, i] - _mm(lo[:, i - 1], cps[-1])
            rhs = d[:, i] - _mm(lo[:, i - 1], dps[-1])
        else:
            rhs = d[:, 0]
        if i < n - 1:
            both, b_i = _solve(piv, torch.cat([up[:, i], rhs], dim=-1))
            k = up.shape[-1]
            cps.append(both[..., :k])
            dps.append(both[..., k:])
        else:
            sol, b_i = _solve(piv, rhs)
            dps.append(sol)
        bad |= b_i
    y = [dps[-1]]
    for i in range(n - 2, -1, -1):
        y.append(dps[i] - _mm(cps[i], y[-1]))
    return torch.stack(y[::-1], dim=1), bad


def _cyclic(lo: Tensor, di: Tensor, up: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Block cyclic reduction on the same layout as :func:`_thomas`; ``ceil(log2 n)`` vectorised levels."""
    bsz, k = di.shape[0], di.shape[-1]
    # full-length a (a[0] = 0) and c (c[n-1] = 0)
    zero = di.new_zeros(bsz, 1, k, k)
    a = torch.cat([zero, lo], dim=1)
    c = torch.cat([up, zero], dim=1)
    return _cr(a, di, c, d)


def _cr(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    bsz, n, k = b.shape[0], b.shape[1], b.shape[-1]
    if n == 1:
        y, bad = _solve(b[:, 0], d[:, 0])
        return y[:, None], bad.reshape(bsz)
    eye = torch.eye(k, dtype=b.dtype, device=b.device).expand(bsz, 1, k, k)
    zk = b.new_zeros(bsz, 1, k, k)
    zd = d.new_zeros(bsz, 1, *d.shape[2:])
    # pad one identity row at each end so every row has two neighbours
    ap, bp, cp, dp = (torch.cat([zk, a, zk], 1), torch.cat([eye, b, eye], 1), torch.cat([zk, c, zk], 1),
                      torch.cat([zd, d, zd], 1))
    # odd rows 1, 3, ... (padded positions 2, 4, ...) are kept; their neighbours are eliminated
    m = n // 2
    mid, left, right = slice(2, 2 * m + 1, 2), slice(1, 2 * m, 2), slice(3, 2 * m + 2, 2)
    bl_inv, bad_l = _solve(bp[:, left], torch.cat([ap[:, left], cp[:, left], dp[:, left]], -1))
    br_inv, bad_r = _solve(bp[:, right], torch.cat([ap[:, right], cp[:, right], dp[:, right]], -1))
    al_, cl_, dl_ = bl_inv[..., :k], bl_inv[..., k:2 * k], bl_inv[..., 2 * k:]
    ar_, cr_, dr_ = br_inv[..., :k], br_inv[..., k:2 * k], br_inv[..., 2 * k:]
    am, cm = ap[:, mid], cp[:, mid]
    new_a = -_mm(am, al_)
    new_c = -_mm(cm, cr_)
    new_b = bp[:, mid] - _mm(am, cl_) - _mm(cm, ar_)
    new_d = dp[:, mid] - _mm(am, dl_) - _mm(cm, dr_)
    y_odd, bad = _cr(new_a, new_b, new_c, new_d)
    bad = bad | bad_l.any(1) | bad_r.any(1)
    # back-substitute the even rows 0, 2, ...: b_i y_i = d_i - a_i y_{i-1} - c_i y_{i+1}
    ypad = torch.cat([zd, y_odd, zd], 1) if n % 2 == 1 else torch.cat([zd, y_odd], 1)
    ev = slice(0, n, 2)
    ne = (n + 1) // 2
    rhs = d[:, ev] - _mm(a[:, ev], ypad[:, 0:ne]) - _mm(c[:, ev], ypad[:, 1:ne + 1])
    y_even, bad_e = _solve(b[:, ev], rhs)
    bad = bad | bad_e.any(1)
    y = d.new_empty(d.shape)
    y[:, ev] = y_even
    y[:, 1::2] = y_odd
    return y, bad


# ----------------------------------------------------------------------------------------------------------------
# scalar kernels: lo/up (b, n-1), di (b, n), d (b, n, r)
# ----------------------------------------------------------------------------------------------------------------
def _zero_pivot(p: Tensor) -> Tensor:
    return (p == 0) | ~torch.isfinite(p)


def _thomas_scalar(lo: Tensor, di: Tensor, up: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    n = di.shape[1]
    bad = _zero_pivot(di[:, 0])
    piv = di[:, 0]
    cps, dps = [], [d[:, 0] / piv[:, None]]
    for i in range(1, n):
        cps.append(up[:, i - 1] / piv)
        piv = di[:, i] - lo[:, i - 1] * cps[-1]
        bad = bad | _zero_pivot(piv)
        dps.append((d[:, i] - lo[:, i - 1, None] * dps[-1]) / piv[:, None])
    y = [dps[-1]]
    for i in range(n - 2, -1, -1):
        y.append(dps[i] - cps[i][:, None] * y[-1])
    return torch.stack(y[::-1], dim=1), bad


def _cyclic_scalar(lo: Tensor, di: Tensor, up: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    zero = di.new_zeros(di.shape[0], 1)
    return _cr_scalar(torch.cat([zero, lo], 1), di, torch.cat([up, zero], 1), d)


def _cr_scalar(a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    bsz, n = b.shape
    if n == 1:
        return d / b[:, :, None], _zero_pivot(b[:, 0])
    z1, o1, zd = b.new_zeros(bsz, 1), b.new_ones(bsz, 1), d.new_zeros(bsz, 1, d.shape[2])
    ap, bp, cp, dp = (torch.cat([z1, a, z1], 1), torch.cat([o1, b, o1], 1), torch.cat([z1, c, z1], 1),
                      torch.cat([zd, d, zd], 1))
    m = n // 2
    mid, left, right = slice(2, 2 * m + 1, 2), slice(1, 2 * m, 2), slice(3, 2 * m + 2, 2)
    bl, br = bp[:, left], bp[:, right]
    bad = _zero_pivot(bl).any(1) | _zero_pivot(br).any(1)
    al, ar = -ap[:, mid] / bl, -cp[:, mid] / br  # elimination factors
    new_a = al * ap[:, left]
    new_c = ar * cp[:, right]
    new_b = bp[:, mid] + al * cp[:, left] + ar * ap[:, right]
    new_d = dp[:, mid] + al[..., None] * dp[:, left] + ar[..., None] * dp[:, right]
    y_odd, bad_odd = _cr_scalar(new_a, new_b, new_c, new_d)
    ypad = torch.cat([zd, y_odd, zd], 1) if n % 2 == 1 else torch.cat([zd, y_odd], 1)
    ev = slice(0, n, 2)
    ne = (n + 1) // 2
    rhs = d[:, ev] - a[:, ev, None] * ypad[:, 0:ne] - c[:, ev, None] * ypad[:, 1:ne + 1]
    be = b[:, ev]
    y = torch.empty_like(d)
    y[:, ev] = rhs / be[..., None]
    y[:, 1::2] = y_odd
    return y, bad | bad_odd | _zero_pivot(be).any(1)


def _run(method: str, lo: Tensor, di: Tensor, up: Tensor, d: Tensor, on_failure: str, what: str) -> Tensor:
    if di.dim() == 2:
        y, bad = (_thomas_scalar if method == "thomas" else _cyclic_scalar)(lo, di, up, d)
    else:
        y, bad = (_thomas if method == "thomas" else _cyclic)(lo, di, up, d)
    bad = bad | ~torch.isfinite(y).flatten(1).all(1)
    if bool(bad.any()):
        report(on_failure, f"{what}: zero or non-finite pivot (singular system, or one that needs pivoting) at "
                           f"batch elements {element_list(bad)}; the solution there is not finite",
               NonRegularWarning, stacklevel=4)
    return y


class _BlockTriSolveFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, lo, di, up, d, method, on_failure, what):
        y = _run(method, lo, di, up, d, on_failure, what)
        ctx.save_for_backward(lo, di, up, y)
        ctx.method, ctx.on_failure, ctx.what = method, on_failure, what
        return y

    @staticmethod
    def backward(ctx, gy):
        lo, di, up, y = ctx.saved_tensors
        if di.dim() == 2:  # scalar bands: the transposed system swaps lower and upper
            dbar = _run(ctx.method, up, di, lo, gy.contiguous(), ctx.on_failure, ctx.what + " (backward)")
            g_di = -(dbar * y).sum(-1)
            g_lo = -(dbar[:, 1:] * y[:, :-1]).sum(-1)
            g_up = -(dbar[:, :-1] * y[:, 1:]).sum(-1)
            return g_lo, g_di, g_up, dbar, None, None, None
        # transposed system: diagonal blocks B_i^T, lower blocks C_i^T, upper blocks A_i^T
        tr = lambda t: t.transpose(-1, -2)  # noqa: E731
        dbar = _run(ctx.method, tr(up), tr(di), tr(lo), gy.contiguous(), ctx.on_failure, ctx.what + " (backward)")
        yt = tr(y)
        g_di = -(dbar @ yt)
        g_lo = -(dbar[:, 1:] @ yt[:, :-1])
        g_up = -(dbar[:, :-1] @ yt[:, 1:])
        return g_lo, g_di, g_up, dbar, None, None, None


def _check(name: str, t: Tensor) -> None:
    if not torch.is_tensor(t):
        raise DDNError(f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise DDNError(f"{name} must be a floating-point tensor, got {t.dtype}")
    fin = torch.isfinite(t).reshape(t.shape[0], -1).all(1) if t.dim() else torch.isfinite(t)
    if not bool(fin.all()):
        raise DDNError(f"{name} contains NaN or Inf at batch elements {element_list(~fin)}")


def block_tridiagonal_solve(lower: Tensor, diag: Tensor, upper: Tensor, d: Tensor, method: str = "thomas",
                            on_failure: str = "raise") -> Tensor:
    r"""Solve the block-tridiagonal system :math:`T y = d` for each batch element.

    Args:
        lower: (b, n-1, k, k) sub-diagonal blocks ``A_i`` (block row i + 1, column i).
        diag: (b, n, k, k) diagonal blocks ``B_i``.
        upper: (b, n-1, k, k) super-diagonal blocks ``C_i`` (block row i, column i + 1).
        d: (b, n, k) or (b, n, k, r) right-hand side(s).
        method: ``"thomas"`` (block LU, a loop over n) or ``"cyclic"`` (cyclic reduction, log2 n levels).
        on_failure: ``"raise"`` (default; :class:`DDNError`), ``"warn"`` (:class:`NonRegularWarning`) or
            ``"ignore"`` on a zero pivot; the offending batch elements are named.

    Returns:
        y: same shape as ``d``.

    Gradient: :math:`\bar d = T^{-\top}\bar y` (a block-tridiagonal solve with the transposed blocks), and
    :math:`\bar B_i = -\bar d_i y_i^\top`, :math:`\bar A_i = -\bar d_{i+1} y_i^\top`,
    :math:`\bar C_i = -\bar d_i y_{i+1}^\top` (summed over right-hand sides).

    Cost: :math:`O(b\,n\,k^3)` for the forward and the same for the backward; memory :math:`O(b\,n\,k^2)`.
    """
    if method not in _METHODS:
        raise DDNError(f"method must be one of {_METHODS}, got {method!r}")
    for name, t in (("lower", lower), ("diag", diag), ("upper", upper), ("d", d)):
        _check(name, t)
    if diag.dim() != 4 or diag.shape[-1] != diag.shape[-2]:
        raise DDNError(f"diag must have shape (b, n, k, k), got {tuple(diag.shape)}")
    b, n, k, _ = diag.shape
    for name, t in (("lower", lower), ("upper", upper)):
        if tuple(t.shape) != (b, n - 1, k, k):
            raise DDNError(f"{name} must have shape {(b, n - 1, k, k)}, got {tuple(t.shape)}")
    vec = d.dim() == 3
    if (vec and tuple(d.shape) != (b, n, k)) or (not vec and (d.dim() != 4 or tuple(d.shape[:3]) != (b, n, k))):
        raise DDNError(f"d must have shape {(b, n, k)} or {(b, n, k)} + (r,), got {tuple(d.shape)}")
    dd = d[..., None] if vec else d
    y = _BlockTriSolveFn.apply(lower, diag, upper, dd, method, on_failure, "block_tridiagonal_solve")
    return y[..., 0] if vec else y


def tridiagonal_solve(lower: Tensor, diag: Tensor, upper: Tensor, d: Tensor, method: str = "thomas",
                      on_failure: str = "raise") -> Tensor:
    r"""Solve the tridiagonal system :math:`T y = d` for each batch element.

    Args:
        lower: (b, n-1) sub-diagonal, ``T[i + 1, i] = lower[i]``.
        diag: (b, n) diagonal.
        upper: (b, n-1) super-diagonal, ``T[i, i + 1] = upper[i]``.
        d: (b, n) or (b, n, r) right-hand side(s).
        method: ``"thomas"`` (a loop over n, vectorised over the batch) or ``"cyclic"`` (cyclic reduction,
            ceil(log2 n) vectorised levels).
        on_failure: ``"raise"`` (default), ``"warn"`` or ``"ignore"`` on a zero pivot (no pivoting is done).

    Returns:
        y: same shape as ``d``.

    Gradient: :math:`\bar d = T^{-\top}\bar y` (one tridiagonal solve with ``lower`` and ``upper`` swapped), and
    the band of :math:`-\bar d\,y^\top`: ``diag_bar = -dbar * y``, ``lower_bar[i] = -dbar[i + 1] * y[i]``,
    ``upper_bar[i] = -dbar[i] * y[i + 1]``.

    Cost: :math:`O(b\,n\,r)` time and memory, forward and backward.
    """
    for name, t in (("lower", lower), ("diag", diag), ("upper", upper), ("d", d)):
        _check(name, t)
    if diag.dim() != 2:
        raise DDNError(f"diag must have shape (b, n), got {tuple(diag.shape)}")
    b, n = diag.shape
    for name, t in (("lower", lower), ("upper", upper)):
        if tuple(t.shape) != (b, n - 1):
            raise DDNError(f"{name} must have shape {(b, n - 1)}, got {tuple(t.shape)}")
    vec = d.dim() == 2
    if (vec and tuple(d.shape) != (b, n)) or (not vec and (d.dim() != 3 or tuple(d.shape[:2]) != (b, n))):
        raise DDNError(f"d must have shape {(b, n)} or {(b, n)} + (r,), got {tuple(d.shape)}")
    if method not in _METHODS:
        raise DDNError(f"method must be one of {_METHODS}, got {method!r}")
    y = _BlockTriSolveFn.apply(lower, diag, upper, d[..., None] if vec else d, method, on_failure,
                               "tridiagonal_solve")
    return y[..., 0] if vec else y


class TridiagonalSolve(nn.Module):
    """Module form of :func:`tridiagonal_solve`: ``TridiagonalSolve(method)(lower, diag, upper, d) -> y``."""

    def __init__(self, method: str = "thomas", on_failure: str = "raise") -> None:
        super().__init__()
        self.method, self.on_failure = method, on_failure

    def forward(self, lower: Tensor, diag: Tensor, upper: Tensor, d: Tensor) -> Tensor:
        return tridiagonal_solve(lower, diag, upper, d, self.method, self.on_failure)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


class BlockTridiagonalSolve(nn.Module):
    """Module form of :func:`block_tridiagonal_solve`."""

    def __init__(self, method: str = "thomas", on_failure: str = "raise") -> None:
        super().__init__()
        self.method, self.on_failure = method, on_failure

    def forward(self, lower: Tensor, diag: Tensor, upper: Tensor, d: Tensor) -> Tensor:
        return block_tridiagonal_solve(lower, diag, upper, d, self.method, self.on_failure)

    def extra_repr(self) -> str:
        return f"method={self.method!r}"
