r"""One-dimensional total-variation denoising with an exact forward and a fused-group-aware exact backward.

.. math::
    y(x, \lambda) = \arg\min_u \tfrac12\|u - x\|^2 + \lambda\sum_{i=1}^{n-1}|u_i - u_{i+1}| .

Forward: the dual box-constrained QP :math:`\min_{|z|_\infty\le\lambda} \tfrac12\|x - D^\top z\|^2`
(``D`` the forward difference, :math:`y = x - D^\top z`) is solved by a primal-dual active-set (semismooth Newton)
method, batched over the signals. Each step fixes the active edges to :math:`\pm\lambda` and solves one
tridiagonal system (cyclic reduction) for the free ones; active edges whose multiplier has the wrong sign are
freed and free edges whose dual leaves the box become active. A stable active set certifies the KKT conditions, so
the result is exact up to the rounding of one tridiagonal solve; this takes a handful to a few tens of steps in
practice (a set that does not settle within ``max_iter`` steps is reported).

Backward: ``y`` is piecewise constant. On each fused group ``G`` (a maximal run joined by inactive edges),
:math:`y_G = \operatorname{mean}(x_G) + (z_{l-1} - z_r)/|G|` with the boundary duals :math:`z = \pm\lambda`, so
:math:`\partial y_i/\partial x_j = 1/|G|` for ``i, j`` in the same group and 0 otherwise (the identity is wrong as
soon as neighbours fuse), and :math:`\partial y_G/\partial\lambda = (s_{l-1} - s_r)/|G|` with the boundary signs.
Hence :math:`\bar x = \operatorname{groupmean}(\bar y)` and
:math:`\bar\lambda = -\sum_{i\ \mathrm{active}} s_i(\bar x_i - \bar x_{i+1})`. At a weakly active edge (a jump of
exactly zero with :math:`|z_i| = \lambda`) ``y`` is not differentiable; the backward then treats the edge as a break
(one-sided derivative) and warns with :class:`NonRegularWarning`.
"""
from __future__ import annotations

import warnings
from typing import Union

import torch
from torch import Tensor, nn

from torchddn.diagnostics import ConvergenceWarning, DDNError, NonRegularWarning, element_list, report
from torchddn.nodes.tridiagonal import _cyclic_scalar

__all__ = ["tv_denoise", "TVDenoise"]


def _dual_tv(x: Tensor, lam: Tensor, max_iter: int):
    """Primal-dual active set on the dual. Returns (z, active_sign (b, n-1) in {-1, 0, 1}, mu, converged)."""
    bsz, n = x.shape
    q = x[:, :-1] - x[:, 1:]  # D x
    lam_ = lam[:, None]

    def qmul(z: Tensor) -> Tensor:  # (D D^T) z, tridiagonal (-1, 2, -1)
        out = 2 * z
        out[:, 1:] -= z[:, :-1]
        out[:, :-1] -= z[:, 1:]
        return out

    z = torch.zeros_like(q)
    mu = q.clone()
    done = torch.zeros(bsz, dtype=torch.bool, device=x.device)
    # initial active set from the unconstrained-at-zero dual gradient
    new_sign = torch.where(q > lam_, 1.0, torch.where(q < -lam_, -1.0, 0.0)).to(x.dtype)
    sign = new_sign
    for it in range(max_iter + 1):
        if it > 0:
            # active edges stay while their multiplier has the right sign, else they are freed; free edges whose
            # dual leaves the box become active (no direct jumps between the two bounds, which can cycle)
            new_sign = torch.where(sign > 0, (mu >= 0).to(x.dtype),
                                   torch.where(sign < 0, -(mu <= 0).to(x.dtype),
                                               torch.where(z > lam_, 1.0, torch.where(z < -lam_, -1.0, 0.0))
                                               .to(x.dtype)))
            done = (new_sign == sign).all(1)
            if bool(done.all()) or it == max_iter:
                break
        sign = new_sign
        act = sign != 0
        off = torch.where(act, 0.0, -1.0).to(x.dtype)
        diag = torch.where(act, 1.0, 2.0).to(x.dtype)
        rhs = torch.where(act, sign * lam_, q)
        z = _cyclic_scalar(off[:, 1:], diag, off[:, :-1], rhs[..., None])[0][..., 0]
        mu = torch.where(act, q - qmul(z), torch.zeros_like(z))
    return z, sign, mu, done


def _group_mean(v: Tensor, brk: Tensor) -> Tensor:
    """Mean of ``v`` over each fused group (runs between break edges ``brk``), broadcast back to (b, n)."""
    bsz, n = v.shape
    gid = torch.cat([torch.zeros_like(brk[:, :1], dtype=torch.long), brk.long().cumsum(1)], 1)
    gid = gid + n * torch.arange(bsz, device=v.device)[:, None]
    flat = gid.reshape(-1)
    sums = v.new_zeros(bsz * n).index_add_(0, flat, v.reshape(-1))
    cnt = v.new_zeros(bsz * n).index_add_(0, flat, torch.ones_like(v).reshape(-1))
    return (sums / cnt.clamp_min(1))[flat].reshape(bsz, n)


class _TVFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam, max_iter, on_failure):
        if x.shape[1] == 1:
            sign = x.new_zeros(x.shape[0], 0)
            ctx.save_for_backward(sign, sign, sign)
            return x.clone()
        z, sign, mu, done = _dual_tv(x, lam, max_iter)
        if not bool(done.all()):
            report(on_failure, f"tv_denoise: the active-set method did not settle in {max_iter} steps at batch "
                               f"elements {element_list(~done)}", ConvergenceWarning, stacklevel=4)
        y = x.clone()
        y[:, :-1] -= z
        y[:, 1:] += z
        scale = x.abs().amax(1) + lam
        # at lam = 0 the node is the identity: every edge is a break, whatever the data
        brk = (sign != 0) | (lam == 0)[:, None]
        weak = ((sign != 0) & (lam > 0)[:, None] & (mu.abs() <= 1e2 * torch.finfo(x.dtype).eps * scale[:, None]))
        ctx.save_for_backward(sign, brk, weak.any(1))
        return y

    @staticmethod
    def backward(ctx, gy):
        sign, brk, weak = ctx.saved_tensors
        if sign.shape[1] == 0:
            return gy, torch.zeros(gy.shape[0], dtype=gy.dtype, device=gy.device), None, None
        if bool(weak.any()):
            warnings.warn("tv_denoise: weakly active edge (zero jump at |z| = lambda; y is not differentiable) at "
                          f"batch elements {element_list(weak)}; returning the one-sided derivative",
                          NonRegularWarning, stacklevel=2)
        gx = _group_mean(gy, brk)
        glam = -(sign * (gx[:, :-1] - gx[:, 1:])).sum(1)
        return gx, glam, None, None


def tv_denoise(x: Tensor, lam: Union[float, Tensor], max_iter: int = 200, on_failure: str = "warn") -> Tensor:
    r"""1D total-variation denoising :math:`y = \arg\min_u \frac12\|u - x\|^2 + \lambda\sum_i|u_i - u_{i+1}|`.

    Args:
        x: (b, n) or (n,) signals.
        lam: regularisation weight ``>= 0``: a float, a 0-d tensor or a (b,) tensor (differentiable).
        max_iter: maximum active-set steps (each one tridiagonal solve).
        on_failure: ``"warn"`` (:class:`ConvergenceWarning`), ``"raise"`` or ``"ignore"`` if the active set has not
            settled.

    Returns:
        y: same shape as ``x``, piecewise constant.

    Gradient (exact, see the module docstring): :math:`\bar x = \operatorname{groupmean}(\bar y)` over fused
    groups, :math:`\bar\lambda = -\sum_{i\,\mathrm{active}} s_i(\bar x_i - \bar x_{i+1})`.

    Cost: forward :math:`O(b\,n)` per active-set step (cyclic reduction, :math:`\log_2 n` vectorised levels);
    backward :math:`O(b\,n)`.
    """
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise DDNError("x must be a floating-point tensor")
    squeeze = x.dim() == 1
    xb = x[None] if squeeze else x
    if xb.dim() != 2 or xb.shape[1] == 0:
        raise DDNError(f"x must have shape (b, n) or (n,), got {tuple(x.shape)}")
    bsz = xb.shape[0]
    lam_t = torch.as_tensor(lam, dtype=xb.dtype, device=xb.device)
    if lam_t.numel() == 1:
        lam_t = lam_t.reshape(1).expand(bsz)
    elif tuple(lam_t.shape) != (bsz,):
        raise DDNError(f"lam must be a scalar or have shape ({bsz},), got {tuple(lam_t.shape)}")
    fin = torch.isfinite(xb.detach()).all(1)
    if not bool(fin.all()):
        raise DDNError(f"x contains NaN or Inf at batch elements {element_list(~fin)}")
    badlam = ~torch.isfinite(lam_t.detach()) | (lam_t.detach() < 0)
    if bool(badlam.any()):
        raise DDNError(f"lam must be finite and non-negative; not at batch elements {element_list(badlam)}")
    y = _TVFn.apply(xb, lam_t, max_iter, on_failure)
    return y[0] if squeeze else y


class TVDenoise(nn.Module):
    """Module form of :func:`tv_denoise`. ``lam`` is fixed unless ``learn_lam=True`` (a softplus-positive
    parameter)."""

    def __init__(self, lam: float = 1.0, learn_lam: bool = False, max_iter: int = 200,
                 on_failure: str = "warn") -> None:
        super().__init__()
        self.learn_lam, self.max_iter, self.on_failure = learn_lam, max_iter, on_failure
        if learn_lam:
            self.raw_lam = nn.Parameter(torch.log(torch.expm1(torch.tensor(max(lam, 1e-6), dtype=torch.float64)))
                                        .float())
        else:
            self.lam = float(lam)

    def forward(self, x: Tensor) -> Tensor:
        lam = nn.functional.softplus(self.raw_lam).to(x.dtype) if self.learn_lam else self.lam
        return tv_denoise(x, lam, self.max_iter, self.on_failure)

    def extra_repr(self) -> str:
        return "learn_lam=True" if self.learn_lam else f"lam={self.lam}"
