"""``torchddn pointcloud``: PointNet with robust pooling vs max pooling, under outliers.

PointNet's global max pooling is replaced by robust pooling (``torchddn.nodes.RobustPool``) with the penalties
quadratic, pseudo-Huber, Huber, Welsch and truncated quadratic; a fraction of each cloud's points is replaced by points
uniform in the unit ball. Rows of ``results.json`` carry ``method`` ("max" or the penalty), ``outlier_fraction``,
``protocol`` and ``test_accuracy``.

Protocols:
    ``--protocol both`` (default): outliers in training and test clouds (fresh random outliers for every training
    batch), one model per outlier fraction, as the reference code does.
    ``--protocol test``: clean training, outliers only at test time (one model per method, "no outliers seen during
    training").

Data: by default a PROCEDURAL 3D shape dataset, NOT ModelNet40: twelve classes of shapes (sphere, box, cylinder,
cone, capsule, annulus, pyramid, torus, bowl, saddle, helix, Moebius strip) sampled from surfaces, with random
proportions, scale and rotation about the up axis, centred and normalised to the unit sphere. ``--data DIR`` reads
ModelNet40 in its HDF5 layout (``ply_data_train*.h5`` / ``ply_data_test*.h5`` with ``data`` (N, 2048, 3) and
``label``).

Distributed training: ``torchrun --standalone --nproc_per_node=2 -m torchddn pointcloud --quick --out DIR`` trains
with DistributedDataParallel (gloo on CPU, nccl with one GPU per process when CUDA is present) using a
DistributedSampler; only rank 0 shows progress, prints, and writes results. On a cluster run the same command on each
node with ``torchrun --nnodes=N --nproc_per_node=G --node_rank=K --rdzv_backend=c10d --rdzv_endpoint=HOST:PORT
--rdzv_id=JOB -m torchddn pointcloud ...``.
"""
from __future__ import annotations

import argparse
import time

import torch

from torchddn.apps import _common as C
from torchddn.apps.data import SHAPE_CLASSES, add_outliers, load_modelnet_h5, procedural_shapes
from torchddn.apps.models import PointNet
from torchddn.apps.training import accuracy, train_classifier

METHODS = ("max",) + C.ROBUST_PENALTIES
DEFAULT_FRACTIONS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
QUICK_FRACTIONS = (0.0, 0.5)

#: (default, quick) settings
SETTINGS = {
    "n_points": (1024, 128),
    "n_train_per_class": (400, 30),
    "n_test_per_class": (100, 25),
    "epochs": (60, 10),
    "batch_size": (32, 32),
    "lr": (1e-3, 2e-3),
    "widths": ((64, 64, 64, 128, 1024), (32, 64)),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "PointNet with robust pooling vs max pooling under outliers. NOTE: the default data is a procedural 3D shape "
        "dataset (12 classes of primitive and parametric surfaces), NOT ModelNet40; pass --data DIR for ModelNet40 "
        "in its HDF5 layout (ply_data_train*.h5, ply_data_test*.h5). Multi-process: torchrun --standalone "
        "--nproc_per_node=2 -m torchddn pointcloud --quick."
    )
    C.add_common_arguments(parser, "runs/pointcloud")
    parser.add_argument("--data", default=None,
                        help="ModelNet40 HDF5 folder (ply_data_*.h5). Default: procedural shapes, not ModelNet40")
    parser.add_argument("--protocol", choices=("both", "test"), default="both",
                        help="both: outliers in train and test (default); test: clean training, outliers at test only")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=None,
                        help="pooling methods (default: max and all five penalties)")
    parser.add_argument("--fractions", nargs="+", type=float, default=None,
                        help="outlier fractions (default 0 .. 0.9; quick: 0 0.5)")
    parser.add_argument("--alpha", type=float, default=1.0, help="robust penalty scale (default 1)")
    parser.add_argument("--points", type=int, default=None, help="points per cloud (default 1024; quick 128)")
    parser.add_argument("--classes", type=int, default=None, help=argparse.SUPPRESS)


def _settings(args: argparse.Namespace) -> dict:
    q = 1 if args.quick else 0
    s = {k: v[q] for k, v in SETTINGS.items()}
    s["n_points"] = C.resolve(args.points, s["n_points"])
    s["epochs"] = C.resolve(args.epochs, s["epochs"])
    s["methods"] = list(args.methods or METHODS)
    s["fractions"] = list(args.fractions or (QUICK_FRACTIONS if args.quick else DEFAULT_FRACTIONS))
    for f in s["fractions"]:
        if not 0.0 <= f <= 1.0:
            raise C.AppError(f"--fractions: {f} is not in [0, 1]")
    return s


def _load(args: argparse.Namespace, s: dict):
    if args.data:
        xtr, ytr = load_modelnet_h5(args.data, "train", s["n_points"])
        xte, yte = load_modelnet_h5(args.data, "test", s["n_points"])
        names = [str(i) for i in range(int(max(ytr.max(), yte.max())) + 1)]
        if args.n_train:
            xtr, ytr = xtr[: args.n_train], ytr[: args.n_train]
        if args.n_test:
            xte, yte = xte[: args.n_test], yte[: args.n_test]
        return xtr, ytr, xte, yte, names, "modelnet40-hdf5"
    k = args.classes or len(SHAPE_CLASSES)
    ntr = s["n_train_per_class"] if args.n_train is None else max(1, args.n_train // k)
    nte = s["n_test_per_class"] if args.n_test is None else max(1, args.n_test // k)
    xtr, ytr, names = procedural_shapes(ntr, s["n_points"], seed=args.seed * 2 + 1, classes=args.classes)
    xte, yte, _ = procedural_shapes(nte, s["n_points"], seed=args.seed * 2 + 2, classes=args.classes)
    return xtr, ytr, xte, yte, names, "procedural-shapes (not ModelNet40)"


def run(args: argparse.Namespace) -> int:
    info = C.init_distributed(args.device)
    try:
        s = _settings(args)
        C.seed_everything(args.seed)
        xtr, ytr, xte, yte, names, data_name = _load(args, s)
        C.say(info, f"pointcloud: data={data_name}, {len(xtr)} train / {len(xte)} test clouds, {len(names)} classes, "
                    f"{xtr.shape[1]} points, protocol={args.protocol}, world_size={info.world_size}")
        # fixed test outliers per fraction
        test_sets = {f: add_outliers(xte, f, torch.Generator().manual_seed(10_000 + args.seed + int(f * 1000)))
                     for f in s["fractions"]}
        rows = []
        jobs = [(m, f) for m in s["methods"] for f in s["fractions"]] if args.protocol == "both" \
            else [(m, None) for m in s["methods"]]
        for method, frac in C.progress(jobs, info, disable=args.no_progress, desc="runs"):
            C.seed_everything(args.seed)
            model = PointNet(len(names), pool=method, alpha=args.alpha, widths=s["widths"])
            transform = None
            if frac:
                transform = lambda xb, g, f=frac: add_outliers(xb, f, g)  # noqa: E731
            t0 = time.perf_counter()
            label = f"{method}" + ("" if frac is None else f" @ {frac:g}")
            train_classifier(model, xtr, ytr, epochs=s["epochs"], batch_size=s["batch_size"], lr=s["lr"], info=info,
                             seed=args.seed, transform=transform, desc=label, show_progress=not args.no_progress)
            train_s = time.perf_counter() - t0
            for f in (s["fractions"] if frac is None else [frac]):
                acc = accuracy(model, test_sets[f], yte, 128, info)
                rows.append({"method": method, "outlier_fraction": f, "protocol": args.protocol,
                             "test_accuracy": acc, "train_seconds": round(train_s, 2)})
                C.say(info, f"  {method:>19s}  outliers {f:.2f}  test accuracy {acc:.4f}  "
                            f"(trained in {train_s:.0f} s)")
        rows.sort(key=lambda r: (r["outlier_fraction"], METHODS.index(r["method"])))
        if info.is_main:
            config = C.args_config(args, settings=s, data_name=data_name, classes=names, n_train=len(xtr),
                                   n_test=len(xte), world_size=info.world_size)
            C.write_results(args.out, config, rows)
            _plot(rows, args.out)
            print(C.format_table(rows, ["method", "outlier_fraction", "protocol", "test_accuracy", "train_seconds"]))
            summary = _summary(rows)
            if summary:
                print(summary)
            print(f"wrote {args.out}/results.json, results.csv, accuracy.png")
    finally:
        C.cleanup_distributed(info)
    return 0


def _summary(rows: list[dict]) -> str:
    lines = []
    for f in sorted({r["outlier_fraction"] for r in rows}):
        at = {r["method"]: r["test_accuracy"] for r in rows if r["outlier_fraction"] == f}
        robust = {m: a for m, a in at.items() if m != "max"}
        if "max" in at and robust:
            best = max(robust, key=robust.get)
            lines.append(f"outliers {f:g}: best robust {best} {robust[best]:.3f} vs max {at['max']:.3f} "
                         f"({100 * (robust[best] - at['max']):+.1f} points)")
    return "\n".join(lines)


def _plot(rows: list[dict], out: str) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in METHODS:
        pts = sorted((r["outlier_fraction"], r["test_accuracy"]) for r in rows if r["method"] == m)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=m)
    ax.set_xlabel("outlier fraction")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"PointNet pooling under outliers ({rows[0]['protocol']})")
    fig.tight_layout()
    fig.savefig(f"{out}/accuracy.png", dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    return C.run_app(run, args)
