"""End-to-end PointNet training-epoch time: robust pooling (each penalty) vs global max pooling.

One "epoch" is a fixed number of training steps (forward, cross-entropy, backward, Adam step) of the PointNet used by
``torchddn pointcloud`` on random clouds with 50% outliers. Rows: ``ratio = max_time / robust_time`` (below 1: robust
pooling is slower) and ``overhead = robust_time / max_time``; times are the median of several repeats after warm-up,
all in the same process.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from torchddn.apps.data import add_outliers
from torchddn.apps.models import PointNet
from torchddn.bench.common import module_main, resolve_device, timeit

PENALTIES = ("quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic")


def _epoch_fn(pool: str, batches: list[tuple[torch.Tensor, torch.Tensor]], widths: tuple[int, ...],
              device: torch.device):
    torch.manual_seed(0)
    model = PointNet(12, pool=pool, widths=widths).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def epoch() -> None:
        model.train()
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return epoch


def run(quick: bool = False, device: str = "cpu") -> list[dict[str, Any]]:
    """Time one training epoch per pooling method; returns rows with ``ratio`` = max time / robust time."""
    dev = resolve_device(device)
    b, n, steps, widths, repeats = (8, 128, 2, (32, 64), 3) if quick else (32, 512, 8, (64, 64, 128, 256), 5)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        x = add_outliers(torch.rand(b, n, 3, generator=g) * 2 - 1, 0.5, g)
        batches.append((x.to(dev), torch.randint(0, 12, (b,), generator=g).to(dev)))
    base = timeit(_epoch_fn("max", batches, widths, dev), repeats=repeats, warmup=1, device=dev)
    rows = []
    for pen in PENALTIES:
        t = timeit(_epoch_fn(pen, batches, widths, dev), repeats=repeats, warmup=1, device=dev)
        rows.append({"benchmark": f"pointnet_epoch[{pen}]", "baseline": "max pooling", "ratio": base / t,
                     "overhead": t / base, "our_ms": 1e3 * t, "baseline_ms": 1e3 * base,
                     "size": f"b={b} n={n} c={widths[-1]} steps={steps}", "device": str(dev)})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
