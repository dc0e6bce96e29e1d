"""Benchmarks: ``torchddn bench`` (see :mod:`torchddn.bench.cli`) runs every module in :data:`REGISTRY`.

Each benchmark module defines ``run(quick: bool = False, device: str = "cpu") -> list[dict]`` returning rows
with the keys ``"benchmark"``, ``"baseline"`` and ``"ratio"`` (baseline time / our time: above 1 means we are
faster) plus free-form extras (times in ms, ``"size"``, errors, memory), and a ``main()`` that prints them.
Shared timing, memory and output helpers are in :mod:`torchddn.bench.common`.
"""
from __future__ import annotations

#: benchmark name -> module, in the order the suite runs them
REGISTRY: dict[str, str] = {
    "core": "torchddn.bench.core",
    "unrolled": "torchddn.bench.unrolled",
    "pooling": "torchddn.bench.pooling",
    "projections": "torchddn.bench.projections",
    "qp": "torchddn.bench.qp",
    "sinkhorn": "torchddn.bench.sinkhorn",
    "least_squares": "torchddn.bench.least_squares",
    "curve_fit": "torchddn.bench.curve_fit",
    "pointnet": "torchddn.bench.pointnet",
    "fixed_point": "torchddn.bench.fixed_point",
    "deq": "torchddn.bench.deq",
}

__all__ = ["REGISTRY"]
