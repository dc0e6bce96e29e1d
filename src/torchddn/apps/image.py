"""``torchddn image``: Euclidean projection layers in image classification.

A small ResNet whose pooled features pass through a non-affine ``BatchNorm1d`` and then, optionally, a Euclidean
projection (``torchddn.nodes.EuclideanProjection``) onto an L1/L2/Linf sphere or ball before the linear classifier.

Data: Fashion-MNIST from the IDX files of Debian's ``dataset-fashion-mnist`` package (/usr/share/datasets/fashion-mnist)
when present; otherwise scikit-learn's bundled 8x8 digits, with a printed notice. ``--data DIR`` reads an ImageFolder
tree with pillow (``DIR/train/<class>/*.png`` and ``DIR/test/<class>/*.png``, or ``DIR/<class>/*.png`` split 80/20).
Nothing is downloaded.

Rows: ``method`` ("none" or the projection kind), ``radius``, ``test_accuracy`` (top-1), ``top5_accuracy``, ``ece``
(expected calibration error, 15 equal-width confidence bins), ``noise_accuracy`` (additive Gaussian noise, std 0.3,
clipped to [0, 1]) and ``occlusion_accuracy`` (a random square of a third of the side set to zero). Plots:
``reliability.png`` (reliability diagrams) and ``accuracy.png``.

Default radius of each projection: half the expected norm of a standard normal feature vector of the feature
dimension ``d`` in that norm (L1: ``0.5 d sqrt(2/pi)``, L2: ``0.5 sqrt(d)``, Linf: ``0.5 sqrt(2 ln d)``), so the
projection is active on the normalised features; ``--radius`` overrides it.
"""
from __future__ import annotations

import argparse
import math

import torch
from torch import Tensor

from torchddn.apps import _common as C
from torchddn.apps.data import FASHION_MNIST_DIR, load_digits_split, load_fashion_mnist, load_image_folder
from torchddn.apps.models import SmallResNet
from torchddn.apps.training import predict, train_classifier

KINDS = ("l1_sphere", "l2_sphere", "linf_sphere", "l1_ball", "l2_ball", "linf_ball")
QUICK_KINDS = ("l1_sphere", "l2_sphere", "linf_sphere")


def default_radius(kind: str, d: int) -> float:
    """Half the expected norm of a standard normal vector in R^d, in the projection's norm."""
    if kind.startswith("l1"):
        return 0.5 * d * math.sqrt(2 / math.pi)
    if kind.startswith("linf"):
        return 0.5 * math.sqrt(2 * math.log(max(d, 2)))
    if kind == "simplex":
        return 1.0
    return 0.5 * math.sqrt(d)


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = 15) -> tuple[float, list[dict]]:
    """ECE with equal-width confidence bins, and the per-bin (confidence, accuracy, count) for a reliability diagram."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=conf.dtype)
    which = torch.bucketize(conf, edges[1:-1], right=True)
    ece, table = 0.0, []
    for b in range(bins):
        m = which == b
        n = int(m.sum())
        if n:
            acc, cf = float(correct[m].mean()), float(conf[m].double().mean())
            ece += n / len(labels) * abs(acc - cf)
            table.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "confidence": cf, "accuracy": acc,
                          "count": n})
    return ece, table


def add_noise(x: Tensor, std: float, g: torch.Generator) -> Tensor:
    return (x + std * torch.randn(x.shape, generator=g, dtype=x.dtype)).clamp(0, 1)


def occlude(x: Tensor, g: torch.Generator, frac: float = 1 / 3) -> Tensor:
    """Zero a random square of side ``frac`` of the image in each sample (vectorised)."""
    b, _, h, w = x.shape
    s = max(1, int(round(frac * min(h, w))))
    top = torch.randint(0, h - s + 1, (b, 1, 1), generator=g)
    left = torch.randint(0, w - s + 1, (b, 1, 1), generator=g)
    rr, cc = torch.arange(h).view(1, h, 1), torch.arange(w).view(1, 1, w)
    hole = (rr >= top) & (rr < top + s) & (cc >= left) & (cc < left + s)
    return x * (~hole).unsqueeze(1).to(x.dtype)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    C.add_common_arguments(parser, "runs/image")
    parser.add_argument("--data", default=None,
                        help="ImageFolder tree (default: Fashion-MNIST if installed, else digits)")
    parser.add_argument("--methods", nargs="+", choices=("none",) + C.PROJECTION_KINDS, default=None,
                        help="'none' and projection kinds (default: none + L1/L2/Linf sphere and ball)")
    parser.add_argument("--radius", type=float, default=None, help="projection radius (default: per kind, see docs)")
    parser.add_argument("--width", type=int, default=None, help="ResNet base width (default 16; quick 8)")
    parser.add_argument("--image-size", type=int, default=28, help="ImageFolder images are resized to this (28)")
    parser.add_argument("--rgb", action="store_true", help="read ImageFolder images as RGB (default grayscale)")
    parser.add_argument("--fashion-dir", default=str(FASHION_MNIST_DIR), help=argparse.SUPPRESS)


def _load(args: argparse.Namespace, info: C.DistInfo):
    if args.data:
        return (*load_image_folder(args.data, args.image_size, args.seed, grayscale=not args.rgb), "imagefolder")
    fm = load_fashion_mnist(args.fashion_dir)
    if fm is not None:
        return (*fm, "fashion-mnist")
    C.say(info, f"notice: Fashion-MNIST not found in {args.fashion_dir} (install Debian's dataset-fashion-mnist); "
                "using scikit-learn's 8x8 digits instead")
    return (*load_digits_split(args.seed), "sklearn-digits")


def _subset(x: Tensor, y: Tensor, n: int | None, seed: int) -> tuple[Tensor, Tensor]:
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def run(args: argparse.Namespace) -> int:
    info = C.init_distributed(args.device)
    try:
        C.seed_everything(args.seed)
        xtr, ytr, xte, yte, names, data_name = _load(args, info)
        n_train = C.resolve(args.n_train, 4000 if args.quick else None)
        n_test = C.resolve(args.n_test, 2000 if args.quick else None)
        xtr, ytr = _subset(xtr, ytr, n_train, args.seed)
        xte, yte = _subset(xte, yte, n_test, args.seed + 1)
        epochs = C.resolve(args.epochs, 4 if args.quick else 15)
        width = C.resolve(args.width, 8 if args.quick else 16)
        methods = list(args.methods or (("none",) + (QUICK_KINDS if args.quick else KINDS)))
        C.say(info, f"image: data={data_name}, {len(xtr)} train / {len(xte)} test, {len(names)} classes, "
                    f"images {tuple(xtr.shape[1:])}, epochs {epochs}, width {width}")
        g = torch.Generator().manual_seed(args.seed + 7)
        noisy, occluded = add_noise(xte, 0.3, g), occlude(xte, g)
        rows, reliab = [], {}
        for method in C.progress(methods, info, disable=args.no_progress, desc="methods"):
            C.seed_everything(args.seed)
            model = SmallResNet(len(names), xtr.shape[1], width=width, projection=method)
            radius = None
            if method != "none":
                radius = args.radius if args.radius is not None else default_radius(method, model.feature_dim)
                model = SmallResNet(len(names), xtr.shape[1], width=width, projection=method, radius=radius)
            train_classifier(model, xtr, ytr, epochs=epochs, batch_size=128, lr=2e-3, info=info, seed=args.seed,
                             desc=method, show_progress=not args.no_progress)
            if not info.is_main:
                continue
            logits = predict(model, xte, 256, info.device)
            probs = logits.softmax(1)
            k = min(5, logits.shape[1])
            top5 = float((logits.topk(k, dim=1).indices == yte[:, None]).any(1).double().mean())
            ece, table = expected_calibration_error(probs, yte)
            reliab[method] = table
            def acc(xx):
                return float((predict(model, xx, 256, info.device).argmax(1) == yte).double().mean())

            rows.append({"method": method, "radius": radius,
                         "test_accuracy": float((logits.argmax(1) == yte).double().mean()),
                         "top5_accuracy": top5, "ece": ece, "noise_accuracy": acc(noisy),
                         "occlusion_accuracy": acc(occluded)})
        if info.is_main:
            config = C.args_config(args, data_name=data_name, classes=names, n_train=len(xtr), n_test=len(xte),
                                   epochs_resolved=epochs, width_resolved=width, methods_resolved=methods,
                                   reliability=reliab, world_size=info.world_size)
            C.write_results(args.out, config, rows)
            _plot(rows, reliab, args.out)
            print(C.format_table(rows))
            print(f"wrote {args.out}/results.json, results.csv, reliability.png, accuracy.png")
    finally:
        C.cleanup_distributed(info)
    return 0


def _plot(rows: list[dict], reliab: dict, out: str) -> None:
    plt = C.pyplot()
    k = len(reliab)
    fig, axes = plt.subplots(1, k, figsize=(2.8 * k, 3), squeeze=False)
    for ax, (m, table) in zip(axes[0], reliab.items()):
        ax.bar([(t["lo"] + t["hi"]) / 2 for t in table], [t["accuracy"] for t in table],
               width=[t["hi"] - t["lo"] for t in table], edgecolor="k", alpha=0.7)
        ax.plot([0, 1], [0, 1], "r--", lw=1)
        ece = next(r["ece"] for r in rows if r["method"] == m)
        ax.set_title(f"{m} (ECE {ece:.3f})", fontsize=9)
        ax.set_xlabel("confidence")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(f"{out}/reliability.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    keys = ["test_accuracy", "noise_accuracy", "occlusion_accuracy"]
    w = 0.8 / len(keys)
    for i, key in enumerate(keys):
        ax.bar([j + i * w for j in range(len(rows))], [r[key] for r in rows], width=w, label=key)
    ax.set_xticks([j + w for j in range(len(rows))])
    ax.set_xticklabels([r["method"] for r in rows], fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}/accuracy.png", dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    return C.run_app(run, args)
