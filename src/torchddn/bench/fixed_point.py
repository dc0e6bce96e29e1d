"""Fixed-point (DEQ) and root nodes: forward solvers and implicit backward against unrolled autograd.

Rows:

* ``deq_forward_<solver>``: time to solve a batched DEQ layer ``y = tanh(W y + x)`` to tolerance with Anderson or
  Broyden, against plain Picard iteration (baseline); with mean iterations.
* ``deq_backward_<method>``: forward + backward with the implicit backward (GMRES, Neumann fixed-point, phantom
  gradient) against autograd through the unrolled Picard iterations (baseline); with the memory the autograd graph
  holds on to and the gradient's relative error against the exact (GMRES) gradient.
* ``root_backward_<method>``: a component-wise cubic ``y^3 + y = x`` as a :class:`~torchddn.root.RootNode`, dense
  LU vs matrix-free GMRES backward (dense is the baseline).
"""
from __future__ import annotations

import torch

import torchddn as ddn
from torchddn.bench.common import module_main, peak_memory, resolve_device, timeit
from torchddn.fixed_point import FixedPointNode, anderson, broyden, picard
from torchddn.root import RootNode


class _TanhDEQ(FixedPointNode):
    def T(self, x, W, y):
        return torch.tanh((W @ y.unsqueeze(-1)).squeeze(-1) + x)

    def initial_guess(self, x, W):
        return torch.zeros_like(x)


class _Cubic(RootNode):
    def optimality(self, x, y):
        return y ** 3 + y - x

    def initial_guess(self, x):
        return torch.zeros_like(x)


def _problem(b: int, n: int, rho: float, device: torch.device, dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(n, n, generator=g, dtype=dtype)
    W = (rho * W / torch.linalg.matrix_norm(W, 2)).to(device)
    x = torch.randn(b, n, generator=g, dtype=dtype).to(device)
    return x, W


def run(quick: bool = False, device: str = "cpu") -> list[dict]:
    dev = resolve_device(device)
    b, n = (16, 64) if quick else (64, 256)
    repeats = 3 if quick else 7
    rows: list[dict] = []
    # forward: a slowly contracting map (symmetric W with eigenvalues in [-0.98, 0.98], small inputs so that tanh
    # is nearly linear): Picard needs about a thousand iterations
    g = torch.Generator().manual_seed(1)
    Qm, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    Ws = ((Qm * torch.linspace(-0.98, 0.98, n, dtype=torch.float64)) @ Qm.T).to(dev)
    xs = 0.1 * torch.randn(b, n, generator=g, dtype=torch.float64).to(dev)
    fs = lambda z: torch.tanh(z @ Ws.T + xs)  # noqa: E731
    x, W = _problem(b, n, 0.95, dev)
    f = lambda z: torch.tanh(z @ W.T + x)  # noqa: E731
    z0 = torch.zeros_like(x)
    t_picard = timeit(lambda: picard(fs, z0, tol=1e-10, max_iter=5000), repeats=repeats, device=dev)
    it_picard = float(picard(fs, z0, tol=1e-10, max_iter=5000).iterations.double().mean())
    for solver in (anderson, broyden):
        t = timeit(lambda: solver(fs, z0, tol=1e-10, max_iter=5000), repeats=repeats, device=dev)
        res = solver(fs, z0, tol=1e-10, max_iter=5000)
        rows.append({"benchmark": f"deq_forward_{solver.__name__}", "baseline": "picard", "ratio": t_picard / t,
                     "ours_ms": 1e3 * t, "baseline_ms": 1e3 * t_picard, "iters": float(res.iterations.double().mean()),
                     "baseline_iters": it_picard, "size": f"b={b} n={n}"})

    # backward: implicit vs autograd through the unrolled Picard iterations
    xg = x.clone().requires_grad_()
    We = W.expand(b, n, n)
    target = torch.randn_like(x)
    steps = int(picard(f, z0, tol=1e-10, max_iter=2000).iterations.max())

    def unrolled():
        z = torch.zeros_like(xg)
        for _ in range(steps):
            z = torch.tanh((We @ z.unsqueeze(-1)).squeeze(-1) + xg)  # the same T as the node
        return ((z - target) ** 2).sum()

    def grad_of(loss_fn):
        (g,) = torch.autograd.grad(loss_fn(), xg)
        return g

    t_unrolled = timeit(lambda: grad_of(unrolled), repeats=repeats, device=dev)
    mem_unrolled = peak_memory(unrolled, device=dev)
    exact = None
    for name, kwargs in (("gmres", {}), ("fixed_point", {"backward_solver": "fixed_point"}),
                         ("phantom5", {"phantom": 5, "damping": 0.8})):
        layer = ddn.DeclarativeLayer(_TanhDEQ(forward_solver="anderson", **kwargs))
        loss = lambda layer=layer: ((layer(xg, We) - target) ** 2).sum()  # noqa: E731
        t = timeit(lambda: grad_of(loss), repeats=repeats, device=dev)
        g = grad_of(loss)
        exact = g if exact is None else exact
        rows.append({"benchmark": f"deq_backward_{name}", "baseline": "unrolled picard autograd",
                     "ratio": t_unrolled / t, "ours_ms": 1e3 * t, "baseline_ms": 1e3 * t_unrolled,
                     "memory_MB": peak_memory(loss, device=dev) / 2 ** 20, "baseline_memory_MB": mem_unrolled / 2 ** 20,
                     "rel_err": float((g - exact).norm() / exact.norm()),
                     "unrolled_rel_err": float((grad_of(unrolled) - exact).norm() / exact.norm()),
                     "size": f"b={b} n={n}"})

    # root node: dense vs GMRES backward
    m = 16 if quick else 48
    xr = torch.randn(b, m, dtype=torch.float64, device=dev).requires_grad_()
    times = {}
    for method in ("dense", "gmres"):
        layer = ddn.DeclarativeLayer(_Cubic(backward=method))
        times[method] = timeit(lambda layer=layer: torch.autograd.grad(layer(xr).sum(), xr), repeats=repeats,
                               device=dev)
    rows.append({"benchmark": "root_backward_gmres", "baseline": "root_backward_dense",
                 "ratio": times["dense"] / times["gmres"], "ours_ms": 1e3 * times["gmres"],
                 "baseline_ms": 1e3 * times["dense"], "size": f"b={b} m={m}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
