"""Euclidean projections: :func:`torchddn.nodes.project` (closed-form backward) against autograd through the same
explicit forward (sort-based simplex/L1 threshold, norm scaling, clamping), forward+backward, a few sizes.

Also reported: the largest difference between the two outputs and between the two input gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from torchddn.bench.common import module_main, resolve_device, timeit
from torchddn.nodes.projections import project


def _simplex_autograd(v: Tensor, r: float) -> Tensor:
    n = v.shape[-1]
    vs, _ = torch.sort(v, dim=-1, descending=True)
    css = vs.cumsum(-1) - r
    k = torch.arange(1, n + 1, dtype=v.dtype, device=v.device)
    rho = ((vs - css / k) > 0).sum(-1, keepdim=True) - 1
    tau = css.gather(-1, rho) / (rho + 1).to(v.dtype)
    return (v - tau).clamp_min(0)


def explicit(x: Tensor, kind: str, r: float) -> Tensor:
    """The projections written with differentiable torch operations (autograd does the backward)."""
    if kind == "simplex":
        return _simplex_autograd(x, r)
    if kind == "l1_ball":
        inside = x.abs().sum(-1, keepdim=True) <= r
        return torch.where(inside, x, torch.sign(x) * _simplex_autograd(x.abs(), r))
    if kind == "l2_ball":
        return x * (r / x.norm(dim=-1, keepdim=True)).clamp(max=1)
    if kind == "l2_sphere":
        return x * (r / x.norm(dim=-1, keepdim=True))
    if kind == "linf_ball":
        return x.clamp(-r, r)
    raise ValueError(kind)


KINDS = ("simplex", "l1_ball", "l2_ball", "l2_sphere", "linf_ball")


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    dev = resolve_device(device)
    sizes = [(256, 64), (64, 1024)] if quick else [(4096, 64), (1024, 1024), (64, 16384)]
    repeats = 5 if quick else 7
    rows = []
    gen = torch.Generator().manual_seed(0)
    for b, n in sizes:
        x = torch.randn(b, n, generator=gen).to(dev)
        v = torch.randn(b, n, generator=gen).to(dev)
        r = 1.0
        for kind in KINDS:
            def ours():
                xr = x.detach().requires_grad_()
                (project(xr, kind, r) * v).sum().backward()
                return xr.grad

            def base():
                xr = x.detach().requires_grad_()
                (explicit(xr, kind, r) * v).sum().backward()
                return xr.grad

            t_ours = timeit(ours, repeats=repeats, warmup=1, device=dev)
            t_base = timeit(base, repeats=repeats, warmup=1, device=dev)
            with torch.no_grad():
                dy = float((project(x, kind, r) - explicit(x, kind, r)).abs().max())
            dg = float((ours() - base()).abs().max())
            rows.append({"benchmark": f"project {kind}", "baseline": "autograd through the explicit forward",
                         "ratio": t_base / t_ours, "size": f"{b}x{n}", "ours_ms": 1e3 * t_ours,
                         "baseline_ms": 1e3 * t_base, "max_dy": dy, "max_dgrad": dg})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
