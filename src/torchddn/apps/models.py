"""Models for the apps: a PointNet whose global pooling is max or robust pooling, and a small ResNet with an
optional Euclidean projection layer before the classifier."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from torchddn.apps._common import import_projection, import_robust_pool


class MaxPool(nn.Module):
    """Global max pooling over ``dim``."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return x.amax(dim=self.dim)


def make_pool(method: str, alpha: float = 1.0, dim: int = -1) -> nn.Module:
    """``"max"`` -> :class:`MaxPool`; a penalty name -> ``torchddn.nodes.RobustPool(method, alpha, dim)``."""
    if method == "max":
        return MaxPool(dim)
    return import_robust_pool()(method, alpha=alpha, dim=dim)


class PointNet(nn.Module):
    """PointNet (no input/feature transforms): a shared per-point MLP, a global pooling over points, an MLP head.

    Args:
        num_classes: output classes.
        pool: ``"max"`` or a robust pooling penalty (``"quadratic"``, ``"pseudo_huber"``, ``"huber"``, ``"welsch"``,
            ``"truncated_quadratic"``).
        alpha: the robust penalty's scale.
        widths: channels of the shared per-point MLP (the last is the pooled feature size).
        head: hidden sizes of the classifier MLP.
        dropout: dropout in the classifier.

    Shape: ``(b, n, 3)`` -> logits ``(b, num_classes)``.
    """

    def __init__(self, num_classes: int, pool: str = "max", alpha: float = 1.0,
                 widths: Sequence[int] = (64, 64, 128, 256), head: Sequence[int] = (128,), dropout: float = 0.3
                 ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in widths:
            layers += [nn.Conv1d(c, w, 1), nn.BatchNorm1d(w), nn.ReLU(inplace=True)]
            c = w
        self.features = nn.Sequential(*layers)
        self.pool = make_pool(pool, alpha, dim=-1)
        hl: list[nn.Module] = []
        for h in head:
            hl += [nn.Linear(c, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True), nn.Dropout(dropout)]
            c = h
        hl.append(nn.Linear(c, num_classes))
        self.head = nn.Sequential(*hl)

    def forward(self, points: Tensor) -> Tensor:
        f = self.features(points.transpose(1, 2))  # (b, c, n)
        return self.head(self.pool(f))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.short(x))


class SmallResNet(nn.Module):
    """A small ResNet: stem, three stages of basic blocks, global average pooling, then
    ``BatchNorm1d(affine=False)`` -> optional Euclidean projection -> linear classifier.

    Args:
        num_classes: output classes.
        in_channels: image channels.
        width: channels of the first stage (doubled at each later stage).
        blocks: basic blocks per stage.
        projection: None / ``"none"``, or a kind accepted by ``torchddn.nodes.EuclideanProjection`` (``"l1_sphere"``,
            ``"l2_ball"``, ...), applied to the normalised features.
        radius: the projection's radius.

    Shape: ``(b, in_channels, H, W)`` -> logits ``(b, num_classes)``.
    """

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 16, blocks: int = 1,
                 projection: str | None = None, radius: float = 1.0) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(inplace=True))
        stages: list[nn.Module] = []
        c = width
        for i, w in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                stages.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.stages = nn.Sequential(*stages)
        self.norm = nn.BatchNorm1d(c, affine=False)
        self.project: nn.Module = nn.Identity()
        if projection not in (None, "none"):
            self.project = import_projection()(projection, radius=radius, dim=-1)
        self.fc = nn.Linear(c, num_classes)
        self.feature_dim = c

    def forward(self, x: Tensor) -> Tensor:
        f = self.stages(self.stem(x)).mean(dim=(2, 3))
        return self.fc(self.project(self.norm(f)))
