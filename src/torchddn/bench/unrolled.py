"""Implicit vs unrolled differentiation: peak memory and time at 10 / 100 / 1000 solver iterations.

Both run the same forward: ``k`` gradient-descent steps on the pseudo-Huber regression problem of
:mod:`torchddn.bench.core` (``m = 64``, ``b = 16``). ``backward="unrolled"`` keeps the graph of every step;
the implicit backward (``backward="auto"``) keeps only ``x`` and ``y``. Memory is the bytes autograd saves for
backward (CPU) or the CUDA peak (GPU), see :func:`torchddn.bench.common.graph_memory`.
Run: ``python benchmarks/bench_unrolled.py [--quick]`` or ``torchddn bench --only unrolled``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

import torchddn as ddn
from torchddn.bench.common import graph_memory, module_main, timeit
from torchddn.bench.core import PseudoHuberRegression, _problem
from torchddn.solvers import Problem, SolverResult
from torchddn.autodiff import batch_grad


def gradient_descent(steps: int, lr: float) -> Callable[..., SolverResult]:
    """A user-supplied forward solver: ``steps`` plain gradient-descent iterations (no convergence test)."""

    def solver(problem: Problem, y0: Tensor, **_: object) -> SolverResult:
        y = y0
        for _ in range(steps):
            y = y - lr * batch_grad(problem.objective, y)
        g = batch_grad(problem.objective, y).norm(dim=-1)
        its = torch.full((y.shape[0],), steps, dtype=torch.long, device=y.device)
        return SolverResult(y, None, torch.ones_like(g, dtype=torch.bool), its, g)

    return solver


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    m, b = (32, 8) if quick else (64, 16)
    iterations = (10, 100) if quick else (10, 100, 1000)
    A, x, v = _problem(m, b, device, torch.float64)
    # a safe step: the Hessian is at most A^T A + 0.1 I
    lr = 1.0 / float(torch.linalg.matrix_norm(A, 2) ** 2 + 0.1)
    rows = []
    for k in iterations:
        results = {}
        for mode in ("auto", "unrolled"):
            node = PseudoHuberRegression(A, backward=mode, solver=gradient_descent(k, lr), unroll_steps=k,
                                         unroll_lr=lr, on_failure="ignore")
            layer = ddn.DeclarativeLayer(node)

            def step() -> None:
                xg = x.clone().requires_grad_(True)
                (layer(xg) * v.view(b, m)).sum().backward()

            def fwd() -> Tensor:
                xg = x.clone().requires_grad_(True)
                return layer(xg)

            results[mode] = (timeit(step, repeats=3, warmup=1, device=device), graph_memory(fwd, device))
        (t_imp, m_imp), (t_unr, m_unr) = results["auto"], results["unrolled"]
        rows.append({"benchmark": f"implicit vs unrolled, {k} iterations", "baseline": "unrolled",
                     "ratio": t_unr / t_imp, "size": k, "ours_ms": 1e3 * t_imp, "baseline_ms": 1e3 * t_unr,
                     "ours_mem_kb": m_imp / 1024, "baseline_mem_kb": m_unr / 1024,
                     "memory_ratio": m_unr / max(m_imp, 1)})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
