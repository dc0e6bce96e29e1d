"""QP layer benchmark: forward + backward against qpth and cvxpylayers, with gradient errors measured against
the exact active-set KKT gradient.

Problem: b = 64 random strictly feasible convex QPs, n = 50 variables, 50 inequalities, float64, CPU. The methods
are timed interleaved (one call of each per round) and the ratio is the median of the per-round ratios.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

from torchddn.bench.common import module_main
from torchddn.nodes.qp import qp


def _problem(B: int, n: int, m: int, seed: int = 0, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    L = torch.randn(B, n, n, generator=g, dtype=torch.float64)
    Q = L @ L.mT / n + 0.1 * torch.eye(n, dtype=torch.float64)
    p = torch.randn(B, n, generator=g, dtype=torch.float64)
    G = torch.randn(B, m, n, generator=g, dtype=torch.float64)
    z0 = torch.randn(B, n, generator=g, dtype=torch.float64)
    h = (G @ z0.unsqueeze(-1)).squeeze(-1) + torch.rand(B, m, generator=g, dtype=torch.float64)
    w = torch.randn(B, n, generator=g, dtype=torch.float64)
    return tuple(t.to(device) for t in (Q, p, G, h, w))


def _exact_gradients(Q, p, G, h, w):
    """Gradients of sum(w * z) by autograd through the active-set KKT system (active set from a tight solve)."""
    z, lam, _ = qp(Q, p, G, h, return_multipliers=True, tol=1e-13, on_failure="ignore")
    s = h - (G @ z.unsqueeze(-1)).squeeze(-1)
    a = (lam > s).to(Q.dtype)
    B, n = p.shape
    args = [t.clone().requires_grad_() for t in (Q, p, G, h)]
    Qa, pa, Ga, ha = args
    K = torch.cat([torch.cat([0.5 * (Qa + Qa.mT), Ga.mT * a.unsqueeze(-2)], -1),
                   torch.cat([a.unsqueeze(-1) * Ga, torch.diag_embed(1 - a)], -1)], -2)
    sol = torch.linalg.solve(K, torch.cat([-pa, a * ha], -1).unsqueeze(-1)).squeeze(-1)
    (sol[:, :n] * w).sum().backward()
    return [t.grad for t in args]


def _time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _grad_error(grads, ref) -> float:
    scale = max(float(r.abs().max()) for r in ref)
    return max(float((g - r).abs().max()) for g, r in zip(grads, ref)) / scale


def _ours(Q, p, G, h, w):
    args = [t.clone().requires_grad_() for t in (Q, p, G, h)]
    z = qp(*args)
    (z * w).sum().backward()
    return [t.grad for t in args]


def _qpth_runner():
    from qpth.qp import QPFunction, QPSolvers

    def run(Q, p, G, h, w):
        args = [t.clone().requires_grad_() for t in (Q, p, G, h)]
        e = torch.empty(0, dtype=Q.dtype, device=Q.device)
        z = QPFunction(verbose=-1, solver=QPSolvers.PDIPM_BATCHED)(*args, e, e)
        (z * w).sum().backward()
        return [t.grad for t in args]

    return run


def _cvxpylayers_runner(n: int, m: int):
    import cvxpy as cp
    from cvxpylayers.torch import CvxpyLayer

    z = cp.Variable(n)
    Lp, pp, Gp, hp = cp.Parameter((n, n)), cp.Parameter(n), cp.Parameter((m, n)), cp.Parameter(m)
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(Lp @ z) + pp @ z), [Gp @ z <= hp])
    layer = CvxpyLayer(prob, parameters=[Lp, pp, Gp, hp], variables=[z])

    def run(Q, p, G, h, w):
        args = [t.clone().requires_grad_() for t in (Q, p, G, h)]
        Lt = torch.linalg.cholesky(0.5 * (args[0] + args[0].mT)).mT  # Q = L^T L
        # cvxpylayers solves the batch's problems in a thread pool as large as the machine (diffcp's n_jobs);
        # it gets the same number of threads as torch.
        jobs = torch.get_num_threads()
        (zs,) = layer(Lt, args[1], args[2], args[3],
                      solver_args={"n_jobs_forward": jobs, "n_jobs_backward": jobs})
        (zs * w).sum().backward()
        return [t.grad for t in args]

    return run


def run(quick: bool = False, device: str = "cpu", threads: int | None = 1) -> list[dict]:
    """QP forward + backward, b=64, n=50, m=50, float64; ratio = peer time / our time.

    All methods get the same number of threads: ``torch.set_num_threads(threads)`` for ours and qpth, and as many
    worker threads for cvxpylayers' batch of cone programs (diffcp's ``n_jobs``, which would otherwise use every
    core whatever torch's setting). Default 1 (reproducible on shared machines); 0 or ``None`` keeps torch's
    current setting (all cores by default)."""
    previous = torch.get_num_threads()
    threads = threads or None  # 0 or None: keep the current setting
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(quick, device, threads)
    finally:
        torch.set_num_threads(previous)


def _run(quick: bool, device: str, threads: int | None) -> list[dict]:
    """Interleaved timing: every round times ours and then each available peer once, and the ratio reported is
    the median over rounds of ``peer time / our time``. Timing the methods back to back within a round cancels
    slow drifts of the machine's speed (shared or throttled CPUs), which separate blocks of repeats do not."""
    B, n, m = 64, 50, 50
    Q, p, G, h, w = _problem(B, n, m, device=device)
    ref = _exact_gradients(Q, p, G, h, w)
    rounds = 3 if quick else 10
    base = {"benchmark": f"qp fwd+bwd b={B} n={n} m={m} float64 {device} threads={threads or torch.get_num_threads()}"}
    runners: dict[str, Callable] = {"torchddn": _ours}
    notes: dict[str, str] = {}
    errors: dict[str, float] = {}
    for name, make, extra in (("qpth", _qpth_runner, ()), ("cvxpylayers", _cvxpylayers_runner, (n, m))):
        try:
            runners[name] = make(*extra)
        except Exception as exc:  # the peer is optional: report why it is skipped
            notes[name] = f"skipped: {type(exc).__name__}: {exc}"
    for name in list(runners):
        try:
            errors[name] = _grad_error(runners[name](Q, p, G, h, w), ref)  # also the warm-up call
        except Exception as exc:
            notes[name] = f"failed: {type(exc).__name__}: {exc}"
            del runners[name]
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(rounds):
        for name, fn in runners.items():
            times[name].append(_time(lambda: fn(Q, p, G, h, w), 1, warmup=0))
    t_ours = statistics.median(times["torchddn"])
    err_ours = errors["torchddn"]
    rows = [{**base, "baseline": "torchddn (self)", "ratio": 1.0, "ours_ms": 1e3 * t_ours, "baseline_ms": 1e3 * t_ours,
             "grad_err": err_ours, "baseline_grad_err": err_ours, "rounds": rounds, "note": ""}]
    for name in ("qpth", "cvxpylayers"):
        if name in runners:
            ratios = [tp / to for tp, to in zip(times[name], times["torchddn"])]
            rows.append({**base, "baseline": name, "ratio": statistics.median(ratios),
                         "ratio_min": min(ratios), "ours_ms": 1e3 * t_ours,
                         "baseline_ms": 1e3 * statistics.median(times[name]), "grad_err": err_ours,
                         "baseline_grad_err": errors[name], "rounds": rounds, "note": ""})
        else:
            rows.append({**base, "baseline": name, "ratio": float("nan"), "ours_ms": 1e3 * t_ours,
                         "baseline_ms": float("nan"), "grad_err": err_ours, "baseline_grad_err": float("nan"),
                         "rounds": rounds, "note": notes.get(name, "")})
    return rows


def main(argv: list[str] | None = None) -> None:
    def configure(parser) -> None:
        parser.add_argument("--threads", type=int, default=1, help="torch threads for every method (0: keep default)")

    module_main(run, __doc__, argv, configure)


if __name__ == "__main__":
    main()
