"""``torchddn demo``: the bilevel robust-average example.

Points ``x`` (b, n) are moved by gradient descent on ``J(x) = |y(x)|^2 / 2`` until their average ``y`` reaches zero.
Two averages are compared:

* the mean, ``y = (1/n) sum_i x_i``, whose gradient ``dy/dx_i = 1/n`` moves every point, outliers included, equally;
* the pseudo-Huber average ``y(x) = argmin_u sum_i alpha^2 (sqrt(1 + ((u - x_i)/alpha)^2) - 1)``, a declarative node
  written with nothing but its objective and an initial guess (:class:`PseudoHuberAverage`), solved and
  differentiated by ``torchddn.DeclarativeLayer``. Its gradient ``dy/dx_i = w_i / sum_j w_j`` with
  ``w_i = (1 + ((y - x_i)/alpha)^2)^(-3/2)`` concentrates on the inliers, so outliers barely move.

Prints a table (method, iterations, final |y|, how far the points moved).
"""
from __future__ import annotations

import argparse
from typing import Callable

import torch
from torch import Tensor

from torchddn.apps import _common as C


def make_pseudo_huber_node(alpha: float = 1.0, **kwargs):
    """A ``torchddn.DeclarativeNode`` for the pseudo-Huber average of the rows of ``x`` (b, n) -> ``y`` (b, 1).

    Declared by its objective and initial guess only; the library supplies the solver and the implicit gradient.
    """
    import torchddn as ddn

    class PseudoHuberAverage(ddn.DeclarativeNode):
        """``y = argmin_u sum_i alpha^2 (sqrt(1 + ((u - x_i) / alpha)^2) - 1)`` for ``x`` (b, n), ``y`` (b, 1)."""

        def __init__(self, alpha: float = 1.0, **kw) -> None:
            super().__init__(**kw)
            self.alpha = alpha

        def initial_guess(self, x: Tensor) -> Tensor:
            return x.mean(dim=1, keepdim=True)

        def objective(self, x: Tensor, y: Tensor) -> Tensor:
            a = self.alpha
            z = (y - x) / a
            return (a * a * (torch.sqrt(1 + z * z) - 1)).sum(dim=1)

    return PseudoHuberAverage(alpha, **kwargs)


def pseudo_huber_gradient(x: Tensor, y: Tensor, alpha: float) -> Tensor:
    """Closed-form ``dy/dx`` (b, n) of the pseudo-Huber average at its solution ``y`` (b, 1)."""
    w = (1 + ((y - x) / alpha) ** 2).pow(-1.5)
    return w / w.sum(dim=1, keepdim=True)


def make_average(method: str, alpha: float = 1.0) -> Callable[[Tensor], Tensor]:
    """``x`` (b, n) -> ``y`` (b, 1) for ``method`` in {"mean", "pseudo_huber_node"} or a robust pooling penalty."""
    if method == "mean":
        return lambda x: x.mean(dim=1, keepdim=True)
    if method == "pseudo_huber_node":
        import torchddn as ddn

        layer = ddn.DeclarativeLayer(make_pseudo_huber_node(alpha))
        return lambda x: layer(x).reshape(x.shape[0], 1)
    pool = C.import_robust_pool()(method, alpha=alpha, dim=-1)
    return lambda x: pool(x).reshape(x.shape[0], 1)


def make_points(b: int, n: int, n_outliers: int, seed: int, dtype=torch.float64) -> tuple[Tensor, Tensor]:
    """``b`` sets of ``n`` points: inliers ~ N(2, 0.5^2), the first ``n_outliers`` ~ N(12, 1).

    Returns ``(x, outlier_mask)``.
    """
    g = torch.Generator().manual_seed(seed)
    x = 2.0 + 0.5 * torch.randn(b, n, generator=g, dtype=dtype)
    x[:, :n_outliers] = 12.0 + torch.randn(b, n_outliers, generator=g, dtype=dtype)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[:, :n_outliers] = True
    return x, mask


def descend(x0: Tensor, average: Callable[[Tensor], Tensor], lr: float, iters: int, tol: float,
            record: bool = False) -> dict:
    """Gradient descent on ``J(x) = |y(x)|^2 / 2`` from ``x0`` (b, n); stops when every ``|y| < tol``.

    Returns iterations, final |y| (b,), the trajectory (list of x, if ``record``) and of y.
    """
    x = x0.clone().requires_grad_(True)
    xs, ys = [x0.clone()], []
    it = 0
    for it in range(iters + 1):
        y = average(x)
        ys.append(y.detach().squeeze(1).clone())
        if bool((y.detach().abs() < tol).all()) or it == iters:
            break
        (g,) = torch.autograd.grad(0.5 * (y**2).sum(), x)
        with torch.no_grad():
            x -= lr * g
        if record:
            xs.append(x.detach().clone())
    final = ys[-1].abs()
    return {"iterations": it, "final_abs_y": final, "x": x.detach(), "xs": xs, "ys": ys}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--n", type=int, default=20, help="points per set (default 20)")
    parser.add_argument("--outliers", type=int, default=4, help="outliers per set (default 4)")
    parser.add_argument("--alpha", type=float, default=1.0, help="pseudo-Huber scale (default 1)")
    parser.add_argument("--lr", type=float, default=None, help="step size (default: n / 2)")
    parser.add_argument("--iters", type=int, default=200, help="maximum iterations (default 200)")
    parser.add_argument("--tol", type=float, default=1e-3, help="stop when |y| < tol (default 1e-3)")
    parser.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    x0, mask = make_points(1, args.n, args.outliers, args.seed)
    lr = args.lr if args.lr is not None else args.n / 2
    rows = []
    for method in ("mean", "pseudo_huber_node"):
        res = descend(x0, make_average(method, args.alpha), lr, args.iters, args.tol)
        moved = (res["x"] - x0).abs()
        rows.append({"method": "mean" if method == "mean" else "pseudo-Huber (DeclarativeNode)",
                     "iterations": res["iterations"], "final_|y|": float(res["final_abs_y"].max()),
                     "moved_total": float(moved.sum()), "moved_inliers": float(moved[~mask].mean()),
                     "moved_outliers": float(moved[mask].mean()) if mask.any() else 0.0})
    print(f"demo: {args.n} points ({args.outliers} outliers near 12, inliers near 2); gradient descent on |y|^2/2, "
          f"step {lr:g}, until |y| < {args.tol:g}")
    print(C.format_table(rows))
    return 0


def main(args: argparse.Namespace) -> int:
    return C.run_app(run, args)
