"""``torchddn bilevel``: the zero-centring toy.

Sets of points ``x`` (n points each, a few of them outliers) are moved by gradient descent on ``|y(x)|^2 / 2`` until
their average ``y`` reaches zero, with ``y`` the mean, the pseudo-Huber average declared as a generic
``torchddn.DeclarativeNode`` (objective + initial guess only), or robust pooling (``torchddn.nodes.RobustPool``) with
each penalty. The mean moves every point equally; robust averages move the inliers and leave the outliers nearly
where they were.

Rows: ``method``, ``test_accuracy`` (here: the fraction of trials whose ``|y|`` fell below ``--tol`` within
``--iters`` steps), ``iterations`` (mean over trials), ``final_abs_y`` (max over trials), ``inlier_movement`` and
``outlier_movement`` (mean absolute displacement). Plot: ``trajectories.png`` (the points of trial 0 against the
iteration, per method).
"""
from __future__ import annotations

import argparse

import torch

from torchddn.apps import _common as C
from torchddn.apps.demo import descend, make_average, make_points

METHODS = ("mean", "pseudo_huber_node") + C.ROBUST_PENALTIES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    C.add_common_arguments(parser, "runs/bilevel")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None, help="averages (default: all)")
    parser.add_argument("--trials", type=int, default=None, help="independent point sets (default 20; quick 5)")
    parser.add_argument("--n", type=int, default=20, help="points per set (default 20)")
    parser.add_argument("--outliers", type=int, default=4, help="outliers per set (default 4)")
    parser.add_argument("--alpha", type=float, default=1.0, help="robust penalty scale (default 1)")
    parser.add_argument("--lr", type=float, default=None, help="step size (default n / 2)")
    parser.add_argument("--iters", type=int, default=None, help="maximum iterations (default 200; quick 50)")
    parser.add_argument("--tol", type=float, default=1e-3, help="success when |y| < tol (default 1e-3)")


def run(args: argparse.Namespace) -> int:
    C.seed_everything(args.seed)
    trials = C.resolve(args.trials, 5 if args.quick else 20)
    iters = C.resolve(args.iters, 50 if args.quick else 200)
    lr = C.resolve(args.lr, args.n / 2)
    methods = list(args.methods or METHODS)
    x0, mask = make_points(trials, args.n, args.outliers, args.seed)
    rows, trajectories = [], {}
    for method in C.progress(methods, disable=args.no_progress, desc="bilevel"):
        res = descend(x0, make_average(method, args.alpha), lr, iters, args.tol, record=True)
        moved = (res["x"] - x0).abs()
        rows.append({
            "method": method, "test_accuracy": float((res["final_abs_y"] < args.tol).double().mean()),
            "iterations": res["iterations"], "final_abs_y": float(res["final_abs_y"].max()),
            "inlier_movement": float(moved[~mask].mean()),
            "outlier_movement": float(moved[mask].mean()) if mask.any() else 0.0,
        })
        trajectories[method] = (torch.stack([x[0] for x in res["xs"]]), torch.stack([y[0] for y in res["ys"]]))
    config = C.args_config(args, trials=trials, iters=iters, lr=lr, methods=methods)
    C.write_results(args.out, config, rows)
    _plot(trajectories, mask[0], args.out)
    print(C.format_table(rows))
    print(f"wrote {args.out}/results.json, results.csv, trajectories.png")
    return 0


def _plot(trajectories: dict, mask: torch.Tensor, out: str) -> None:
    plt = C.pyplot()
    k = len(trajectories)
    cols = min(k, 4)
    rows = (k + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False, sharey=True)
    for ax, (method, (xs, ys)) in zip(axes.flat, trajectories.items()):
        for i in range(xs.shape[1]):
            ax.plot(xs[:, i].numpy(), color="tab:red" if mask[i] else "tab:blue", lw=0.8, alpha=0.8)
        ax.plot(ys.numpy(), color="k", lw=2, label="y")
        ax.axhline(0, color="gray", lw=0.5)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("iteration")
    for ax in list(axes.flat)[k:]:
        ax.axis("off")
    axes[0][0].set_ylabel("point position (red: outliers)")
    fig.tight_layout()
    fig.savefig(f"{out}/trajectories.png", dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    return C.run_app(run, args)
