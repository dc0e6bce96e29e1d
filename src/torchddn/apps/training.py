"""A small supervised training loop shared by the apps, with optional DistributedDataParallel and tqdm progress."""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from torchddn.apps._common import DistInfo, all_reduce_sum, progress

Transform = Callable[[Tensor, torch.Generator], Tensor]


def train_classifier(model: nn.Module, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float,
                     info: DistInfo, seed: int, transform: Optional[Transform] = None, desc: str = "train",
                     show_progress: bool = True, weight_decay: float = 1e-4) -> nn.Module:
    """Train ``model`` with Adam and a cosine learning-rate schedule on ``(x, y)``; returns the trained module.

    Under ``torchrun`` the model is wrapped in ``DistributedDataParallel`` and each rank sees its
    ``DistributedSampler`` share of every epoch. ``transform(xb, generator)`` (e.g. outlier injection) is applied to
    each batch with a generator seeded per rank, so runs are reproducible.
    """
    model.to(info.device)
    net: nn.Module = model
    sampler = None
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP
        from torch.utils.data.distributed import DistributedSampler

        dev_ids = [info.device.index] if info.device.type == "cuda" else None
        net = DDP(model, device_ids=dev_ids)
        sampler = DistributedSampler(TensorDataset(x, y), num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=seed)
    g = torch.Generator().manual_seed(seed)
    drop_last = len(x) // max(info.world_size, 1) > batch_size  # never a last batch of one (BatchNorm)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=sampler is None, sampler=sampler,
                        generator=g if sampler is None else None, drop_last=drop_last)
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * len(loader), 1))
    tg = torch.Generator(device="cpu").manual_seed(seed * 1000 + info.rank + 1)
    bar = progress(range(epochs), info, disable=not show_progress, desc=desc, leave=False)
    for epoch in bar:
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        total, count = 0.0, 0
        for xb, yb in loader:
            if transform is not None:
                xb = transform(xb, tg)
            xb, yb = xb.to(info.device), yb.to(info.device)
            loss = F.cross_entropy(net(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(yb)
            count += len(yb)
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{total / max(count, 1):.3f}")
    return model


@torch.no_grad()
def predict(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """Logits of ``model`` on ``x`` (in eval mode), on the CPU."""
    model.eval()
    out = [model(x[i: i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)]
    return torch.cat(out) if out else torch.empty(0)


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, info: DistInfo) -> float:
    """Top-1 accuracy; under ``torchrun`` each rank scores a shard and the counts are summed."""
    idx = torch.arange(info.rank, len(x), info.world_size)
    logits = predict(model, x[idx], batch_size, info.device)
    correct = float((logits.argmax(1) == y[idx]).sum()) if len(idx) else 0.0
    c, n = all_reduce_sum(info, correct, float(len(idx)))
    return c / max(n, 1.0)
