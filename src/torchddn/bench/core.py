"""Generic-node backward vs the column-by-column dense approach, and the dense / matrix-free crossover.

Problem: ``f(x, y) = sum_i pseudo_huber((A y - x)_i) + 0.05 ||y||^2`` with ``A`` of shape ``(n, m)`` shared by the
batch, ``x`` of shape ``(b, n)``, ``n = 2m``, ``b = 16``, float64.

* ``column-by-column``: what the paper's reference code does: one autograd pass per output coordinate ``j``
  differentiates ``d f / d y_j`` with respect to ``(y, x)`` to build ``H`` and ``B`` densely, then Cholesky and
  ``v^T Dy = -v^T H^-1 B``.
* ``torchddn``: ``backward="auto"`` (dense from vmapped Hessian-vector products for small ``m``, CG beyond).

The ``A/sqrt(m)`` rows repeat this with ``A`` divided by ``sqrt(m)`` instead of ``sqrt(n)`` (a Hessian
``A^T D A + 0.1 I`` with twice the data curvature against the same ridge: a larger condition number, so more CG
iterations), at ``m = 256, 1024`` (quick: 32, 64).

Each row reports both backward times, their ratio, the forward (built-in Newton) time and the largest gradient
difference. Run: ``python benchmarks/bench_core.py [--quick]`` or ``torchddn bench --only core``.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

import torchddn as ddn
from torchddn.bench.common import module_main, timeit


class PseudoHuberRegression(ddn.DeclarativeNode):
    """``min_y sum pseudo_huber(A y - x) + 0.05 ||y||^2`` with a fixed ``A``."""

    def __init__(self, A: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.A = A

    def objective(self, x: Tensor, y: Tensor) -> Tensor:
        r = y @ self.A.T - x
        return (torch.sqrt(1 + r ** 2) - 1).sum(-1) + 0.05 * (y ** 2).sum(-1)

    def initial_guess(self, x: Tensor) -> Tensor:
        return torch.zeros(x.shape[0], self.A.shape[1], dtype=x.dtype, device=x.device)


def column_by_column_backward(node: PseudoHuberRegression, x: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """The reference approach: ``m`` autograd passes build ``H (b, m, m)`` and ``B (b, m, n)``, then Cholesky."""
    with torch.enable_grad():
        xg = x.detach().requires_grad_(True)
        yg = y.detach().requires_grad_(True)
        fy = torch.autograd.grad(node.objective(xg, y=yg).sum(), yg, create_graph=True)[0]
        m = y.shape[-1]
        H_rows, B_rows = [], []
        for j in range(m):
            hj, bj = torch.autograd.grad(fy[:, j].sum(), (yg, xg), retain_graph=True)
            H_rows.append(hj)
            B_rows.append(bj)
    H = torch.stack(H_rows, 1)
    B = torch.stack(B_rows, 1)
    L = torch.linalg.cholesky(H)
    Dy = -torch.cholesky_solve(B, L)  # (b, m, n)
    return torch.einsum("bm,bmn->bn", v, Dy)


def _problem(m: int, b: int, device: str, dtype: torch.dtype, seed: int = 0, scale: str = "n") -> tuple:
    """``A (n, m)`` Gaussian divided by ``sqrt(n)`` (``scale="n"``) or by ``sqrt(m)`` (``scale="m"``: twice the
    data term's curvature against the fixed ``0.05 ||y||^2``, so a less well conditioned Hessian), ``x``, ``v``."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * m
    A = (torch.randn(n, m, generator=g, dtype=dtype) / (n if scale == "n" else m) ** 0.5).to(device)
    x = (torch.randn(b, n, generator=g, dtype=dtype) * 2).to(device)
    v = torch.randn(b, m, generator=g, dtype=dtype).to(device)
    return A, x, v


def run(quick: bool = False, device: str = "cpu", sizes: tuple[int, ...] | None = None,
        ill_sizes: tuple[int, ...] | None = None) -> list[dict]:
    """Rows for each ``m``: backward time of ``auto`` vs column-by-column, forward time, gradient difference; then
    the same at ``ill_sizes`` with ``A / sqrt(m)`` (less well conditioned); then the dense / cg crossover."""
    sizes = sizes or ((32, 64, 128) if quick else (64, 256, 1024))
    ill_sizes = ill_sizes or ((32, 64) if quick else (256, 1024))
    b = 16
    dtype = torch.float64
    rows = []
    cases = [(m, "n") for m in sizes] + [(m, "m") for m in ill_sizes]
    for m, scale in cases:
        A, x, v = _problem(m, b, device, dtype, scale=scale)
        node = PseudoHuberRegression(A, backward="auto")
        layer = ddn.DeclarativeLayer(node)

        def forward() -> Tensor:
            with torch.no_grad():
                return layer(x)

        t_fwd = timeit(forward, repeats=3, warmup=1, device=device)
        y = forward()
        xg = x.clone().requires_grad_(True)

        def ours() -> Tensor:
            with torch.no_grad():
                return node.gradient(xg, y=y, v=v)[0]

        repeats = 1 if m >= 1024 else 3
        t_ours = timeit(ours, repeats=3, warmup=1, device=device)
        g_ours = ours()
        method = node.diagnostics.backward_method
        lin_it = node.diagnostics.linear_iterations
        lin_it = None if lin_it is None else float(lin_it.double().max())
        t_ref = timeit(lambda: column_by_column_backward(node, x, y, v), repeats=repeats,
                       warmup=0 if m >= 1024 else 1, device=device)
        g_ref = column_by_column_backward(node, x, y, v)
        err = float((g_ours - g_ref).abs().max())
        name = f"generic backward m={m}" if scale == "n" else f"generic backward A/sqrt(m) m={m}"
        rows.append({"benchmark": name, "baseline": "column-by-column dense (reference)",
                     "ratio": t_ref / t_ours, "size": m, "ours_ms": 1e3 * t_ours, "baseline_ms": 1e3 * t_ref,
                     "forward_ms": 1e3 * t_fwd, "backward_over_forward": t_ours / t_fwd, "method": method,
                     "linear_iters": lin_it, "max_grad_diff": err})
    # crossover: dense vs cg at each size
    for m in sizes:
        A, x, v = _problem(m, b, device, dtype, seed=1)
        times = {}
        for mode in ("dense", "cg"):
            node = PseudoHuberRegression(A, backward=mode)
            with torch.no_grad():
                y = ddn.DeclarativeLayer(node)(x)
                times[mode] = timeit(lambda: node.gradient(x, y=y, v=v), repeats=3, warmup=1, device=device)
        rows.append({"benchmark": f"matrix-free vs dense m={m}", "baseline": "dense backward",
                     "ratio": times["dense"] / times["cg"], "size": m, "ours_ms": 1e3 * times["cg"],
                     "baseline_ms": 1e3 * times["dense"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
