"""Weighted least squares benchmark: forward + backward of the node (Cholesky and QR modes) against autograd
through the explicit normal-equation formula ``torch.linalg.solve(A^T W A + beta I, A^T W b)``.

Problem: b random (n x p) designs, positive weights, beta = 0.1, float64; the loss is <y, v> for a fixed random v
and gradients are taken w.r.t. A, b, W and beta. ``grad_err`` is the max relative difference to the baseline.

Timing: :func:`torchddn.bench.common.timeit` (warm-up, median of repeats). Memory: on CPU the bytes of the tensors
saved for backward (``torch.autograd.graph.saved_tensors_hooks``, each storage once) plus the outputs; on CUDA
``torch.cuda.max_memory_allocated`` (see :func:`torchddn.bench.common.peak_memory`).
"""
from __future__ import annotations

import torch

from torchddn.bench.common import module_main, peak_memory, resolve_device, timeit
from torchddn.nodes.least_squares import weighted_least_squares


def _problem(b: int, n: int, p: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(b, n, p, generator=g, dtype=torch.float64)
    y = torch.randn(b, n, generator=g, dtype=torch.float64)
    w = torch.rand(b, n, generator=g, dtype=torch.float64) + 0.1
    beta = torch.full((b,), 0.1, dtype=torch.float64)
    v = torch.randn(b, p, generator=g, dtype=torch.float64)
    return [t.to(device) for t in (A, y, w, beta, v)]


def _explicit(A, b, w, beta):
    G = A.mT @ (w[..., None] * A) + beta[:, None, None] * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return torch.linalg.solve(G, A.mT @ (w * b)[..., None])[..., 0]


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    """WLS fwd+bwd vs autograd through the explicit formula; ratio = baseline time / our time."""
    dev = resolve_device(device)
    sizes = [(64, 100, 10), (64, 200, 50)] if quick else [(64, 100, 10), (64, 200, 50), (32, 1000, 100)]
    repeats = 3 if quick else 7
    rows = []
    for b, n, p in sizes:
        A, y, w, beta, v = _problem(b, n, p, dev)
        args = [t.clone().requires_grad_() for t in (A, y, w, beta)]

        def ours(mode):
            return torch.autograd.grad((weighted_least_squares(*args, mode=mode) * v).sum(), args)

        def base():
            return torch.autograd.grad((_explicit(*args) * v).sum(), args)

        g_base = base()
        t_base = timeit(base, repeats=repeats, warmup=1, device=dev)
        mem_base = peak_memory(lambda: _explicit(*args), dev)
        for mode in ("cholesky", "qr"):
            g = ours(mode)
            err = max(float((a - r).abs().max()) / float(r.abs().max()) for a, r in zip(g, g_base))
            t = timeit(lambda: ours(mode), repeats=repeats, warmup=1, device=dev)
            mem = peak_memory(lambda: weighted_least_squares(*args, mode=mode), dev)
            rows.append({"benchmark": f"weighted least squares fwd+bwd ({mode})",
                         "baseline": "autograd through linalg.solve(A^T W A + beta I, A^T W b)",
                         "ratio": t_base / t, "size": f"b={b} n={n} p={p}", "ours_ms": 1e3 * t,
                         "baseline_ms": 1e3 * t_base, "ours_mem_MB": mem / 2**20, "baseline_mem_MB": mem_base / 2**20,
                         "grad_err": err})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
