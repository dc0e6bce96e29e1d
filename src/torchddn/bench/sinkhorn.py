"""Sinkhorn benchmark: forward + backward of the implicit node against autograd through the unrolled iterations.

Problem: b random cost matrices M ~ U[0, 1]^(n x n), uniform marginals, gamma = 30, float64, tol 1e-10 on the
row marginals. The unrolled baseline runs the same log-domain iterations (as many as our forward needed) with
autograd recording every one. ``grad_err`` is the max relative difference of dL/dM between the two.

Timing: :func:`torchddn.bench.common.timeit` (warm-up, median of repeats). Memory: on CPU the bytes of the tensors
saved for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once) plus the outputs; on CUDA
``torch.cuda.max_memory_allocated`` (see :func:`torchddn.bench.common.peak_memory`).
"""
from __future__ import annotations

import torch

from torchddn.bench.common import module_main, peak_memory, resolve_device, timeit
from torchddn.nodes.optimal_transport import _log_sinkhorn, sinkhorn

GAMMA = 30.0


def _problem(b: int, n: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    M = torch.rand(b, n, n, generator=g, dtype=torch.float64).to(device)
    W = torch.randn(b, n, n, generator=g, dtype=torch.float64).to(device)
    r = torch.full((b, n), 1.0 / n, dtype=torch.float64, device=device)
    return M, r, W


def _unrolled(M, r, iters):
    logk = -GAMMA * M
    alpha, beta = torch.zeros_like(r), torch.zeros_like(r)
    logr = r.log()
    for _ in range(iters):
        alpha = logr - torch.logsumexp(logk + beta[:, None, :], 2)
        beta = logr - torch.logsumexp(logk + alpha[:, :, None], 1)
    return torch.exp(logk + alpha[:, :, None] + beta[:, None, :])


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """Sinkhorn fwd+bwd, implicit vs unrolled autograd; ratio = unrolled time / our time."""
    dev = resolve_device(device)
    sizes = [(4, 32), (4, 96)] if quick else [(16, 32), (16, 128), (8, 512)]
    repeats = 3 if quick else 7
    rows = []
    for b, n in sizes:
        M, r, W = _problem(b, n, dev)
        with torch.no_grad():
            iters = int(_log_sinkhorn(-GAMMA * M, r.log(), r.log(), 1e-10, 10000)[4].max())
        Mg = M.clone().requires_grad_()

        def ours(mode="implicit"):
            P = sinkhorn(Mg, r, r, gamma=GAMMA, backward=mode, truncate=10)
            return torch.autograd.grad((P * W).sum(), Mg)[0]

        def base():
            return torch.autograd.grad((_unrolled(Mg, r, iters) * W).sum(), Mg)[0]

        g_ours, g_base, g_trunc = ours(), base(), ours("truncated")
        scale = float(g_base.abs().max())
        t_ours = timeit(ours, repeats=repeats, warmup=1, device=dev)
        t_base = timeit(base, repeats=repeats, warmup=1, device=dev)
        t_trunc = timeit(lambda: ours("truncated"), repeats=repeats, warmup=1, device=dev)
        mem_ours = peak_memory(lambda: sinkhorn(Mg, r, r, gamma=GAMMA), dev)
        mem_base = peak_memory(lambda: _unrolled(Mg, r, iters), dev)
        mem_trunc = peak_memory(lambda: sinkhorn(Mg, r, r, gamma=GAMMA, backward="truncated", truncate=10), dev)
        common = {"size": f"b={b} n={n}", "iters": iters, "baseline_ms": 1e3 * t_base,
                  "baseline_mem_MB": mem_base / 2**20}
        rows.append({"benchmark": "sinkhorn fwd+bwd (implicit)", "baseline": "autograd through unrolled Sinkhorn",
                     "ratio": t_base / t_ours, **common, "ours_ms": 1e3 * t_ours, "ours_mem_MB": mem_ours / 2**20,
                     "grad_err": float((g_ours - g_base).abs().max()) / scale})
        rows.append({"benchmark": "sinkhorn fwd+bwd (truncated, 10 it)",
                     "baseline": "autograd through unrolled Sinkhorn", "ratio": t_base / t_trunc, **common,
                     "ours_ms": 1e3 * t_trunc, "ours_mem_MB": mem_trunc / 2**20,
                     "grad_err": float((g_trunc - g_base).abs().max()) / scale})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
