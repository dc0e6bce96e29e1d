"""A DEQ whose map holds an ``nn.Linear``: gradients for the node's own weights, against the alternatives.

Problem: ``y = T(x, y) = tanh(lin(y) + x)`` with ``lin = nn.Linear(n, n)`` (weight scaled to spectral norm 0.9),
``x`` of shape ``(b, n)``, ``n = 256``, float64, forward tolerance ``1e-10`` on the relative residual
``||T(y) - y|| / (1 + ||T(y)||)``; loss ``sum((y - target)^2)``; gradients for ``lin.weight`` and ``lin.bias``.

Methods (forward + backward, ``b = 8, 32, 128``):

* ``torchddn params``: the node is an ``nn.Module`` and ``T`` calls ``self.lin``; the weights get their gradient
  from the one adjoint solve (GMRES) shared by the whole batch.
* ``torchddn params (fixed_point backward)``: the same with the Neumann fixed-point backward solve, whose
  workspace is ``O(b n)`` where GMRES keeps a Krylov basis of ``O(b n k)``.
* ``torchddn expanded W`` (baseline): the old way: the weight passed as a positional input expanded to the batch,
  ``W.expand(b, n, n)``, whose gradient is formed per batch element (``(b, n, n)``) before it is summed.
* ``unrolled picard`` (baseline): autograd through as many Picard steps as the tolerance needs.
* ``torchdeq`` (baseline, when the optional ``torchdeq`` package is installed): ``get_deq(ift=True)`` with Anderson
  forward and backward solvers at the same tolerance (relative stop mode) and iteration cap.

Each row reports the time (median), the memory the backward needs beyond what the forward left
(``backward_mem_MB``: peak during ``loss.backward()`` minus before it; on CPU from the profiler's allocation events,
on CUDA from the allocator's peak), and the weight gradient's relative error against a dense implicit reference
(``(I - J)^T u = dL/dy`` solved with ``torch.linalg.solve`` at a fixed point converged to 1e-15, then
``dL/dW = sum_b (d * u) y^T`` with ``d = 1 - y^2``). ``ratio`` is baseline time / ``torchddn params`` time.
Run: ``python -m torchddn.bench.deq [--quick]``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

import torchddn as ddn
from torchddn.bench.common import module_main, resolve_device, synchronize, timeit
from torchddn.fixed_point import FixedPointNode, picard

DT = torch.float64
RHO = 0.9
TOL = 1e-10
MAX_ITER = 500


class LinearDEQ(FixedPointNode, nn.Module):
    """``y = tanh(lin(y) + x)`` with the weights in an ``nn.Linear`` of the node."""

    def __init__(self, lin: nn.Linear, **kw: Any) -> None:
        FixedPointNode.__init__(self, **kw)
        nn.Module.__init__(self)
        self.lin = lin

    def T(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.tanh(self.lin(y) + x)

    def initial_guess(self, x: Tensor) -> Tensor:
        return torch.zeros_like(x)


class ExpandedDEQ(FixedPointNode):
    """The same map with the weight as a positional input ``W (b, n, n)`` (the batch-expanded old approach)."""

    def T(self, x: Tensor, W: Tensor, bias: Tensor, y: Tensor) -> Tensor:
        return torch.tanh((W @ y.unsqueeze(-1)).squeeze(-1) + bias + x)

    def initial_guess(self, x: Tensor, W: Tensor, bias: Tensor) -> Tensor:
        return torch.zeros_like(x)


def backward_memory(backward: Callable[[], Any], device: torch.device) -> int:
    """Bytes allocated at the peak of ``backward()`` beyond what was allocated before it.

    CUDA: ``max_memory_allocated`` minus ``memory_allocated`` before. CPU: the running sum of the profiler's
    allocation and free events (``profile_memory=True``), in time order; its maximum is the peak.
    """
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        backward()
        synchronize(device)
        return int(max(0, torch.cuda.max_memory_allocated(device) - before))
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        backward()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    cur = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        cur += int(e.nbytes())
        peak = max(peak, cur)
    return peak


def _setup(b: int, n: int, device: torch.device, seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(n, n).to(DT)
    with torch.no_grad():
        W = torch.randn(n, n, generator=g, dtype=DT)
        lin.weight.copy_(RHO * W / torch.linalg.matrix_norm(W, 2))
        lin.bias.copy_(0.1 * torch.randn(n, generator=g, dtype=DT))
    x = torch.randn(b, n, generator=g, dtype=DT)
    target = torch.randn(b, n, generator=g, dtype=DT)
    return lin.to(device), x.to(device), target.to(device)


def reference_grads(lin: nn.Linear, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, int]:
    """Dense implicit gradients ``(dW, dbias)`` at a fixed point converged to 1e-15, and Picard steps to 1e-10."""
    W, c = lin.weight.detach(), lin.bias.detach()
    f = lambda z: torch.tanh(z @ W.T + c + x)  # noqa: E731
    with torch.no_grad():
        z0 = torch.zeros_like(x)
        steps = int(picard(f, z0, tol=TOL, max_iter=5000).iterations.max())
        y = picard(f, z0, tol=1e-15, max_iter=5000).y
        for _ in range(5):  # a few more steps to the float64 floor
            y = f(y)
        d = 1 - y ** 2
        n = x.shape[-1]
        J = d.unsqueeze(-1) * W  # (b, n, n): dT/dy
        eye = torch.eye(n, dtype=x.dtype, device=x.device)
        u = torch.linalg.solve((eye - J).transpose(-1, -2), (2 * (y - target)).unsqueeze(-1)).squeeze(-1)
        du = d * u
        return du.T @ y, du.sum(0), steps


def _rel(g: Tensor, ref: Tensor) -> float:
    return float((g - ref).norm() / ref.norm())


def _methods(lin: nn.Linear, x: Tensor, target: Tensor, steps: int) -> dict[str, Callable[[], Tensor]]:
    """name -> a function returning the loss (forward with a graph); its backward fills ``lin``'s grads."""
    node = LinearDEQ(lin, tol=TOL, max_iter=MAX_ITER)
    layer = ddn.DeclarativeLayer(node)
    fp_layer = ddn.DeclarativeLayer(LinearDEQ(lin, tol=TOL, max_iter=MAX_ITER, backward_solver="fixed_point"))
    exp_layer = ddn.DeclarativeLayer(ExpandedDEQ(tol=TOL, max_iter=MAX_ITER))
    b, n = x.shape

    def ours() -> Tensor:
        return ((layer(x) - target) ** 2).sum()

    def ours_fp() -> Tensor:
        return ((fp_layer(x) - target) ** 2).sum()

    def expanded() -> Tensor:
        return ((exp_layer(x, lin.weight.expand(b, n, n), lin.bias) - target) ** 2).sum()

    def unrolled() -> Tensor:
        z = torch.zeros_like(x)
        for _ in range(steps):
            z = torch.tanh(lin(z) + x)
        return ((z - target) ** 2).sum()

    methods = {"torchddn params": ours, "torchddn params (fixed_point backward)": ours_fp,
               "torchddn expanded W": expanded, "unrolled picard": unrolled}
    try:
        from torchdeq import get_deq
    except ImportError:
        return methods
    deq = get_deq(ift=True, f_solver="anderson", b_solver="anderson", f_max_iter=MAX_ITER, b_max_iter=MAX_ITER,
                  f_tol=TOL, b_tol=TOL, f_stop_mode="rel", b_stop_mode="rel")

    def torchdeq() -> Tensor:
        z_out, _ = deq(lambda z: torch.tanh(lin(z) + x), torch.zeros_like(x))
        return ((z_out[-1] - target) ** 2).sum()

    methods["torchdeq"] = torchdeq
    return methods


def run(quick: bool = False, device: str = "cpu", batches: tuple[int, ...] | None = None, n: int | None = None,
        repeats: int | None = None) -> list[dict]:
    """Rows per method and batch size: fwd+bwd time, backward memory beyond the forward, weight-gradient error."""
    dev = resolve_device(device)
    n = n or (32 if quick else 256)
    batches = batches or ((4, 16) if quick else (8, 32, 128))
    repeats = repeats or (3 if quick else 5)
    rows: list[dict] = []
    for b in batches:
        lin, x, target = _setup(b, n, dev)
        ref_w, ref_b, steps = reference_grads(lin, x, target)
        results: dict[str, dict] = {}
        for name, loss_fn in _methods(lin, x, target, steps).items():
            def step(loss_fn=loss_fn) -> None:
                lin.zero_grad(set_to_none=True)
                loss_fn().backward()

            t = timeit(step, repeats=repeats, warmup=1 if repeats > 1 else 0, device=dev)
            lin.zero_grad(set_to_none=True)
            loss = loss_fn()
            mem = backward_memory(loss.backward, dev)
            results[name] = {"ms": 1e3 * t, "backward_mem_MB": mem / 2 ** 20,
                             "weight_rel_err": _rel(lin.weight.grad, ref_w), "bias_rel_err": _rel(lin.bias.grad, ref_b)}
            del loss
        ours = results["torchddn params"]
        for name, r in results.items():
            rows.append({"benchmark": f"deq_linear fwd+bwd b={b}", "baseline": name, "ratio": r["ms"] / ours["ms"], "size": f"b={b} n={n}", "ours_ms": ours["ms"],
                         "baseline_ms": r["ms"], "ours_backward_mem_MB": ours["backward_mem_MB"],
                         "baseline_backward_mem_MB": r["backward_mem_MB"], "ours_weight_rel_err": ours["weight_rel_err"],
                         "baseline_weight_rel_err": r["weight_rel_err"], "baseline_bias_rel_err": r["bias_rel_err"],
                         "picard_steps": steps if name == "unrolled picard" else None})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
