"""Robust pooling: :func:`torchddn.nodes.robust_pool` against L-BFGS pooling with the closed-form backward.

Setting: ``x`` of shape 16 x 512 x 1024 (float32), pooled over the last dimension (PointNet's global feature);
``quick``: 4 x 128 x 256. Penalty scale ``alpha = 1`` on standard normal data with 10% gross outliers.

Baseline (the reference DDN code's ``RobustAverage``): ``torch.optim.LBFGS`` (``max_iter=100``, strong-Wolfe line
search) on the batch-summed objective, started from the mean (and, for the nonconvex penalties, also from the
median), with the closed-form implicit backward ``dy/dx_i = phi''(y - x_i) / sum_j phi''(y - x_j)``.

Reported per penalty: forward+backward times, ``ratio`` = baseline / ours, ``frac_le_lbfgs`` = the fraction of
pooled elements where our objective is at most the baseline's (+ a rounding tolerance), the largest amount by
which the baseline's objective exceeds ours, and our time relative to max pooling (forward+backward).
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchddn.bench.common import module_main, resolve_device, synchronize, timeit
from torchddn.nodes.penalties import Penalty, get_penalty
from torchddn.nodes.robust_pool import robust_pool

PENALTIES = ("quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic")


def lbfgs_pool(x: Tensor, pen: Penalty, alpha: float, y0: Tensor, max_iter: int = 100) -> Tensor:
    """L-BFGS on ``sum_b sum_i phi(y_b - x_bi)`` from ``y0``; x (B, n) -> y (B,)."""
    a = torch.tensor(alpha, dtype=x.dtype, device=x.device)
    y = y0.detach().clone().requires_grad_()
    opt = torch.optim.LBFGS([y], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        f = pen.phi(y[:, None] - x, a).sum()
        f.backward()
        return f

    with torch.enable_grad():
        opt.step(closure)
    return y.detach()


class _LBFGSPool(torch.autograd.Function):
    """L-BFGS forward, closed-form implicit backward (the reference ``RobustAverage``)."""

    @staticmethod
    def forward(ctx, x, pen, alpha, start):
        x0 = x.detach()
        y0 = x0.mean(-1) if start == "mean" else x0.median(-1).values
        y = lbfgs_pool(x0, pen, alpha, y0)
        ctx.save_for_backward(x, y)
        ctx.pen, ctx.alpha = pen, alpha
        return y

    @staticmethod
    def backward(ctx, gy):
        x, y = ctx.saved_tensors
        a = torch.tensor(ctx.alpha, dtype=x.dtype, device=x.device)
        w = ctx.pen.d2phi(y[:, None] - x, a)
        H = w.sum(-1, keepdim=True)
        H = torch.where(H.abs() > 0, H, torch.ones_like(H))
        return gy[:, None] * w / H, None, None, None


def _data(shape, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen)
    out = torch.rand(shape, generator=gen) < 0.1
    x = torch.where(out, 10 * torch.randn(shape, generator=gen), x)
    return x.to(device)


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    dev = resolve_device(device)
    shape = (4, 128, 256) if quick else (16, 512, 1024)
    repeats, base_repeats = (5, 3) if quick else (3, 1)
    x = _data(shape, dev)
    alpha = 1.0
    size = "x".join(str(s) for s in shape)

    def fwd_bwd(fn):
        def go():
            xr = x.detach().requires_grad_()
            fn(xr).sum().backward()
        return go

    t_max = timeit(fwd_bwd(lambda xr: xr.amax(-1)), repeats=repeats, warmup=1, device=dev)
    rows = []
    x2 = x.reshape(-1, shape[-1])
    for name in PENALTIES:
        pen = get_penalty(name)
        t_ours = timeit(fwd_bwd(lambda xr: robust_pool(xr, name, alpha)), repeats=repeats, warmup=1, device=dev)
        with torch.no_grad():
            y_ours = robust_pool(x, name, alpha).reshape(-1)
        a64 = torch.tensor(alpha, dtype=torch.float64, device=dev)
        f_ours = pen.phi(y_ours.double()[:, None] - x2.double(), a64).sum(-1)
        starts = ("mean", "median") if not pen.convex else ("mean",)
        for start in starts:
            def base(xr, start=start):
                return _LBFGSPool.apply(xr.reshape(-1, shape[-1]), pen, alpha, start).reshape(shape[:-1])
            t_base = timeit(fwd_bwd(base), repeats=base_repeats, warmup=0, device=dev)
            with torch.no_grad():
                y_base = base(x).reshape(-1)
            synchronize(dev)
            f_base = pen.phi(y_base.double()[:, None] - x2.double(), a64).sum(-1)
            tol = 1e-5 * (1 + f_base.abs())
            rows.append({
                "benchmark": f"robust_pool {name}",
                "baseline": f"L-BFGS from the {start}",
                "ratio": t_base / t_ours,
                "size": size,
                "ours_ms": 1e3 * t_ours,
                "baseline_ms": 1e3 * t_base,
                "frac_le_lbfgs": float((f_ours <= f_base + tol).double().mean()),
                "max_lbfgs_excess": float((f_base - f_ours).max()),
                "ours_over_maxpool": t_ours / t_max,
                "maxpool_ms": 1e3 * t_max,
            })
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
