"""``torchddn ensemble``: a robust ensemble on the breast-cancer data (scikit-learn, bundled, no download).

An ensemble of small MLPs, each trained on its own random subset of the (standardised) features, predicts a logit per
member; the logits are combined by the mean or by robust pooling (``torchddn.nodes.RobustPool``, each penalty) over
the ensemble dimension. At test time a fraction of each sample's features is corrupted (replaced by large random
values): members that read a corrupted feature produce outlying logits, which robust pooling discounts.

Rows: ``method`` ("mean", a penalty name, or "logistic_regression" as a reference trained on all features),
``corrupted_features`` (fraction of features corrupted per test sample) and ``test_accuracy``. Plot: accuracy.png.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchddn.apps import _common as C

DEFAULT_FRACTIONS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4)
QUICK_FRACTIONS = (0.0, 0.1, 0.2)


class SubspaceEnsemble(nn.Module):
    """``k`` independent one-hidden-layer MLPs, member ``j`` reading only the features in ``masks[j]``.

    Shape: ``(b, d)`` -> member logits ``(b, k)``. All members run as one batched ``einsum``.
    """

    def __init__(self, masks: Tensor, hidden: int = 16) -> None:
        super().__init__()
        k, d = masks.shape
        self.register_buffer("masks", masks.float())
        self.w1 = nn.Parameter(torch.randn(k, d, hidden) / d**0.5)
        self.b1 = nn.Parameter(torch.zeros(k, hidden))
        self.w2 = nn.Parameter(torch.randn(k, hidden) / hidden**0.5)
        self.b2 = nn.Parameter(torch.zeros(k))

    def forward(self, x: Tensor) -> Tensor:
        xm = x.unsqueeze(1) * self.masks  # (b, k, d)
        h = torch.relu(torch.einsum("bkd,kdh->bkh", xm, self.w1) + self.b1)
        return torch.einsum("bkh,kh->bk", h, self.w2) + self.b2


def corrupt(x: Tensor, fraction: float, scale: float, generator: torch.Generator) -> Tensor:
    """Replace ``round(fraction * d)`` random features of each row of ``x`` (b, d) by ``scale * N(0, 1)`` values."""
    b, d = x.shape
    k = int(round(fraction * d))
    if k == 0:
        return x
    idx = torch.rand(b, d, generator=generator).argsort(dim=1)[:, :k]
    noise = scale * torch.randn(b, k, generator=generator, dtype=x.dtype)
    return x.clone().scatter_(1, idx, noise)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    C.add_common_arguments(parser, "runs/ensemble")
    parser.add_argument("--members", type=int, default=None, help="ensemble size (default 25; quick 15)")
    parser.add_argument("--feature-fraction", type=float, default=0.2,
                        help="fraction of features each member reads (default 0.2)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden units per member (default 16)")
    parser.add_argument("--alpha", type=float, default=1.0, help="robust penalty scale (default 1)")
    parser.add_argument("--noise-scale", type=float, default=10.0,
                        help="std of corrupted (standardised) feature values (default 10)")
    parser.add_argument("--fractions", nargs="+", type=float, default=None, help="corrupted feature fractions")
    parser.add_argument("--methods", nargs="+", choices=("mean",) + C.ROBUST_PENALTIES, default=None)


def run(args: argparse.Namespace) -> int:
    from sklearn.datasets import load_breast_cancer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    C.seed_everything(args.seed)
    members = C.resolve(args.members, 15 if args.quick else 25)
    epochs = C.resolve(args.epochs, 200 if args.quick else 500)
    fractions = list(args.fractions or (QUICK_FRACTIONS if args.quick else DEFAULT_FRACTIONS))
    methods = list(args.methods or ("mean",) + C.ROBUST_PENALTIES)
    data = load_breast_cancer()
    xtr, xte, ytr, yte = train_test_split(data.data, data.target, test_size=0.3, random_state=args.seed,
                                          stratify=data.target)
    if args.n_train:
        xtr, ytr = xtr[: args.n_train], ytr[: args.n_train]
    if args.n_test:
        xte, yte = xte[: args.n_test], yte[: args.n_test]
    scaler = StandardScaler().fit(xtr)
    xtr, xte = scaler.transform(xtr), scaler.transform(xte)
    d = xtr.shape[1]
    g = torch.Generator().manual_seed(args.seed)
    n_feat = max(1, int(round(args.feature_fraction * d)))
    masks = torch.zeros(members, d)
    for j in range(members):
        masks[j, torch.randperm(d, generator=g)[:n_feat]] = 1.0
    model = SubspaceEnsemble(masks, args.hidden)
    Xtr, Ytr = torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr, dtype=torch.float32)
    Xte, Yte = torch.tensor(xte, dtype=torch.float32), torch.tensor(yte, dtype=torch.int64)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-3)
    for _ in C.progress(range(epochs), disable=args.no_progress, desc="ensemble"):
        logits = model(Xtr)
        loss = F.binary_cross_entropy_with_logits(logits, Ytr.unsqueeze(1).expand_as(logits), reduction="sum")
        opt.zero_grad(set_to_none=True)
        (loss / len(Xtr)).backward()
        opt.step()
    model.eval()
    logreg = LogisticRegression(max_iter=5000).fit(xtr, ytr)
    pools = {m: (lambda z: z.mean(dim=1)) if m == "mean" else C.import_robust_pool()(m, alpha=args.alpha, dim=-1)
             for m in methods}
    rows = []
    for frac in fractions:
        xc = corrupt(Xte, frac, args.noise_scale, torch.Generator().manual_seed(args.seed + 1 + int(1000 * frac)))
        with torch.no_grad():
            member_logits = model(xc)
            for m in methods:
                pred = (pools[m](member_logits).reshape(-1) > 0).long()
                rows.append({"method": m, "corrupted_features": frac,
                             "test_accuracy": float((pred == Yte).double().mean())})
        acc = float(np.mean(logreg.predict(xc.double().numpy()) == yte))
        rows.append({"method": "logistic_regression", "corrupted_features": frac, "test_accuracy": acc})
    config = C.args_config(args, members=members, epochs=epochs, fractions=fractions, methods=methods,
                           features_per_member=n_feat, n_train=len(xtr), n_test=len(xte))
    C.write_results(args.out, config, rows)
    _plot(rows, args.out)
    print(C.format_table(rows, ["method", "corrupted_features", "test_accuracy"]))
    print(f"wrote {args.out}/results.json, results.csv, accuracy.png")
    return 0


def _plot(rows: list[dict], out: str) -> None:
    plt = C.pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["corrupted_features"], r["test_accuracy"]) for r in rows if r["method"] == m)
        ax.plot(*zip(*pts), marker="o", label=m, ls="--" if m == "logistic_regression" else "-")
    ax.set_xlabel("fraction of corrupted test features")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(f"{out}/accuracy.png", dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    return C.run_app(run, args)
