r"""Curve-fitting benchmark: a batch of exponential fits ``a exp(-k t)`` as a residuals node, forward + backward.

Problem: ``b`` fits (64 by default) of two parameters ``y = (a, k)`` to ``n`` noisy samples (100 by default),
float64, started at ``y0 = (1, 1)``. The loss is ``<y, v>`` for a fixed random ``v``; the gradient is taken with
respect to the observations.

Rows (all timed in this process with :func:`torchddn.bench.common.timeit`: warm-up, median of repeats):

* torchddn node (``residuals`` + the built-in Levenberg-Marquardt, exact implicit backward) against a
  hand-written batched Gauss-Newton in torch: analytic Jacobian, Cholesky-free 2 x 2 solves, and a hand-written
  exact implicit backward ``obs_bar = J (J^T J + sum_i r_i D^2 r_i)^{-1} v``;
* the same node with ``hessian="gauss_newton"`` (the approximation ``H ~= J^T J``);
* ``jaxopt.GaussNewton`` (jitted, vmapped, implicit differentiation) when ``jax`` and ``jaxopt`` are importable;
  otherwise the row is skipped.

``ratio`` is baseline time / our time (above 1: torchddn is faster). ``grad_err`` is the max relative difference
of each gradient to an exact reference computed independently: a dense implicit gradient ``-B^T H^{-1} v``
with ``H`` and ``B = D^2_{y, obs} f`` from ``torch.func.hessian`` / ``jacrev`` of the per-element objective at the
solution (refined by Newton steps on the exact Hessian).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from torchddn.bench.common import module_main, resolve_device, timeit
from torchddn.function import DeclarativeLayer
from torchddn.node import DeclarativeNode

__all__ = ["ExponentialFit", "make_problem", "handwritten_gauss_newton", "reference_gradient", "run"]


class ExponentialFit(DeclarativeNode):
    """``(a, k) = argmin 1/2 sum_j (a exp(-k t_j) - obs_j)^2`` per row: ``obs`` (b, n), ``t`` (n,) -> (b, 2)."""

    def __init__(self, t: Tensor, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.t = t

    def initial_guess(self, obs: Tensor) -> Tensor:
        return torch.ones(obs.shape[0], 2, dtype=obs.dtype, device=obs.device)

    def residuals(self, obs: Tensor, y: Tensor) -> Tensor:
        return y[:, :1] * torch.exp(-y[:, 1:] * self.t) - obs


def make_problem(b: int = 64, n: int = 100, noise: float = 0.05, device: Any = "cpu", seed: int = 0
                 ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(t, obs, y_true, v)``: sample times (n,), observations (b, n), true parameters (b, 2), loss weights."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 3, n, dtype=torch.float64)
    y_true = torch.stack([0.5 + torch.rand(b, generator=g, dtype=torch.float64),
                          0.3 + 1.5 * torch.rand(b, generator=g, dtype=torch.float64)], 1)
    obs = y_true[:, :1] * torch.exp(-y_true[:, 1:] * t) + noise * torch.randn(b, n, generator=g, dtype=torch.float64)
    v = torch.randn(b, 2, generator=g, dtype=torch.float64)
    return tuple(x.to(device) for x in (t, obs, y_true, v))  # type: ignore[return-value]


def _model(y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    e = torch.exp(-y[:, 1:] * t)
    return y[:, :1] * e, e


def _solve2(a11: Tensor, a12: Tensor, a22: Tensor, b1: Tensor, b2: Tensor) -> tuple[Tensor, Tensor]:
    det = a11 * a22 - a12 * a12
    return (a22 * b1 - a12 * b2) / det, (a11 * b2 - a12 * b1) / det


class _HandwrittenGN(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, obs: Tensor, t: Tensor, y0: Tensor, max_iter: int, tol: float) -> Tensor:
        y = y0.clone()
        for _ in range(max_iter):
            f, e = _model(y, t)
            r = f - obs
            ja, jk = e, -t * f
            d1, d2 = _solve2((ja * ja).sum(1), (ja * jk).sum(1), (jk * jk).sum(1), -(ja * r).sum(1),
                             -(jk * r).sum(1))
            d = torch.stack([d1, d2], 1)
            y = y + d
            if bool((d.abs() <= tol * (1 + y.abs())).all()):
                break
        ctx.save_for_backward(y, t, obs)
        return y

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple:
        y, t, obs = ctx.saved_tensors
        f, e = _model(y, t)
        r = f - obs
        ja, jk = e, -t * f
        # exact Hessian: J^T J + sum_j r_j D^2 r_j with D^2 r_j = [[0, -t e], [-t e, a t^2 e]]
        h11 = (ja * ja).sum(1)
        h12 = (ja * jk).sum(1) - (r * t * e).sum(1)
        h22 = (jk * jk).sum(1) + (r * t * t * f).sum(1)
        u1, u2 = _solve2(h11, h12, h22, v[:, 0], v[:, 1])
        # f = 1/2 ||r||^2 with dr/dobs = -I: B = -J^T, so obs_bar = -B^T H^{-1} v = J H^{-1} v
        return ja * u1[:, None] + jk * u2[:, None], None, None, None, None


def handwritten_gauss_newton(obs: Tensor, t: Tensor, max_iter: int = 50, tol: float = 1e-10) -> Tensor:
    """Batched Gauss-Newton for the exponential fit with the analytic Jacobian and exact implicit backward."""
    y0 = torch.ones(obs.shape[0], 2, dtype=obs.dtype, device=obs.device)
    return _HandwrittenGN.apply(obs, t, y0, max_iter, tol)


def reference_gradient(obs: Tensor, t: Tensor, y: Tensor, v: Tensor) -> Tensor:
    """Exact ``v^T dy/dobs`` by a dense implicit gradient built with ``torch.func`` per element.

    ``y`` is first refined by three Newton steps on the exact per-element Hessian."""
    from torch.func import grad, hessian, jacrev, vmap

    def f(yi: Tensor, oi: Tensor) -> Tensor:
        return 0.5 * ((yi[0] * torch.exp(-yi[1] * t) - oi) ** 2).sum()

    gfun = vmap(grad(f))
    hfun = vmap(hessian(f))
    for _ in range(3):
        y = y - torch.linalg.solve(hfun(y, obs), gfun(y, obs).unsqueeze(-1)).squeeze(-1)
    H = hfun(y, obs)
    B = vmap(jacrev(grad(f), argnums=1))(y, obs)  # (b, 2, n)
    u = torch.linalg.solve(H, v.unsqueeze(-1))
    return -(B.transpose(1, 2) @ u).squeeze(-1)


def _rel(a: Tensor, ref: Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def _jaxopt_row(obs: Tensor, t: Tensor, v: Tensor, g_ref: Tensor, repeats: int) -> dict:
    import jax  # noqa: F401  (ImportError: the harness skips the row)
    import jax.numpy as jnp
    import jaxopt

    jax.config.update("jax_enable_x64", True)
    tj = jnp.asarray(t.cpu().numpy())
    oj = jnp.asarray(obs.cpu().numpy())
    vj = jnp.asarray(v.cpu().numpy())

    def residual(y, o):
        return y[0] * jnp.exp(-y[1] * tj) - o

    solver = jaxopt.GaussNewton(residual_fun=residual, maxiter=50, tol=1e-10, implicit_diff=True)

    def loss(o):
        ys = jax.vmap(lambda oi: solver.run(jnp.ones(2), oi).params)(o)
        return (ys * vj).sum()

    fb = jax.jit(jax.grad(loss))
    g = fb(oj).block_until_ready()
    t_j = timeit(lambda: fb(oj).block_until_ready(), repeats=repeats, warmup=1)
    import numpy as np
    err = float(np.abs(np.asarray(g) - g_ref.cpu().numpy()).max() / float(g_ref.abs().max()))
    return {"t_ms": 1e3 * t_j, "grad_err": err}


def run(quick: bool = False, device: str = "cpu", b: int = 64, n: int = 100) -> list[dict]:
    """Node forward+backward vs a hand-written batched Gauss-Newton (and jaxopt when present)."""
    dev = resolve_device(device)
    repeats = 10 if quick else 30
    t, obs, _, v = make_problem(b, n, device=dev)
    size = f"b={b} n={n} m=2"

    exact = DeclarativeLayer(ExponentialFit(t))
    approx = DeclarativeLayer(ExponentialFit(t, hessian="gauss_newton"))
    o = obs.clone().requires_grad_(True)

    def ours(layer: DeclarativeLayer) -> Tensor:
        return torch.autograd.grad((layer(o) * v).sum(), o)[0]

    def hand() -> Tensor:
        return torch.autograd.grad((handwritten_gauss_newton(o, t) * v).sum(), o)[0]

    with torch.no_grad():
        y_hand = handwritten_gauss_newton(obs, t)
    g_ref = reference_gradient(obs, t, y_hand, v)
    g_ours, g_gn, g_hand = ours(exact), ours(approx), hand()
    t_hand = timeit(hand, repeats=repeats, warmup=2, device=dev)
    t_ours = timeit(lambda: ours(exact), repeats=repeats, warmup=2, device=dev)
    t_gn = timeit(lambda: ours(approx), repeats=repeats, warmup=2, device=dev)
    iters = exact.node.diagnostics.iterations
    base = "hand-written batched Gauss-Newton (torch, analytic J)"
    rows = [
        {"benchmark": "exp fit fwd+bwd (residuals node, exact backward)", "baseline": base,
         "ratio": t_hand / t_ours, "size": size, "ours_ms": 1e3 * t_ours, "baseline_ms": 1e3 * t_hand,
         "grad_err": _rel(g_ours, g_ref), "baseline_grad_err": _rel(g_hand, g_ref),
         "lm_iters_max": int(iters.max())},
        {"benchmark": "exp fit fwd+bwd (residuals node, hessian=gauss_newton)", "baseline": base,
         "ratio": t_hand / t_gn, "size": size, "ours_ms": 1e3 * t_gn, "baseline_ms": 1e3 * t_hand,
         "grad_err": _rel(g_gn, g_ref), "note": "grad_err is the Gauss-Newton approximation error"},
    ]
    try:
        jx = _jaxopt_row(obs, t, v, g_ref, repeats)
    except ImportError as exc:
        rows.append({"benchmark": "exp fit fwd+bwd vs jaxopt.GaussNewton", "baseline": "jaxopt.GaussNewton (jit)",
                     "ratio": None, "skipped": f"missing dependency: {exc}"})
    else:
        rows.append({"benchmark": "exp fit fwd+bwd (residuals node, exact backward)",
                     "baseline": "jaxopt.GaussNewton (jit, vmap, implicit diff)", "ratio": jx["t_ms"] / (1e3 * t_ours),
                     "size": size, "ours_ms": 1e3 * t_ours, "baseline_ms": jx["t_ms"],
                     "grad_err": _rel(g_ours, g_ref), "baseline_grad_err": jx["grad_err"]})
    return rows


def main(argv: list[str] | None = None) -> None:
    module_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
