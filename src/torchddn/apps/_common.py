"""Shared plumbing for the ``torchddn`` apps: arguments, seeding, progress bars, DistributedDataParallel, results.

Every app writes ``results.json`` (``{"config": {...}, "rows": [...]}``), ``results.csv`` (one line per row) and at
least one PNG plot into ``--out``, and prints its table to stdout at the end.

Distributed runs: when launched by ``torchrun`` (the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` environment variables are
set), :func:`init_distributed` starts a process group (``nccl`` when CUDA is available, else ``gloo``); only rank 0
shows progress bars, prints and writes files.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
import torch.distributed as dist

ROBUST_PENALTIES: tuple[str, ...] = ("quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic")
PROJECTION_KINDS: tuple[str, ...] = (
    "simplex", "l1_sphere", "l1_ball", "l2_sphere", "l2_ball", "linf_sphere", "linf_ball",
)


class AppError(RuntimeError):
    """An app cannot run with the given data or options (bad file, wrong layout, missing path)."""


def add_common_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """Options shared by all apps: output folder, quick mode, seed, device, and small-size testing flags."""
    parser.add_argument("--out", default=default_out, help=f"output folder (default: {default_out})")
    parser.add_argument("--quick", action="store_true", help="a small run that finishes in minutes on 2 CPU cores")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    parser.add_argument("--epochs", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-train", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--n-test", type=int, default=None, help=argparse.SUPPRESS)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


@dataclass
class DistInfo:
    """Where this process stands in a (possibly single-process) run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str | None = None) -> DistInfo:
    """Start the process group when launched by ``torchrun``; otherwise describe a single process.

    Uses ``nccl`` with one GPU per local rank when CUDA is available (and no CPU device was asked for), else
    ``gloo`` on CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if world > 1 and "RANK" in os.environ:
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
            backend = "nccl"
        else:
            dev = torch.device("cpu")
            backend = "gloo"
            local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local_world, 1)))
        if not dist.is_initialized():
            dist.init_process_group(backend=backend)
        return DistInfo(rank, world, local_rank, dev, True)
    dev = torch.device(device) if device else torch.device("cuda" if want_cuda else "cpu")
    return DistInfo(device=dev)


def cleanup_distributed(info: DistInfo) -> None:
    if info.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(info: DistInfo, *values: float) -> list[float]:
    """Sum scalars over ranks (identity in a single process)."""
    if not info.distributed:
        return [float(v) for v in values]
    t = torch.tensor(values, dtype=torch.float64, device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def progress(iterable: Iterable, info: DistInfo | None = None, disable: bool = False, **kwargs: Any):
    """A tqdm progress bar on stderr, shown by rank 0 only."""
    from tqdm.auto import tqdm

    hidden = disable or (info is not None and not info.is_main)
    return tqdm(iterable, disable=hidden, dynamic_ncols=True, file=sys.stderr, **kwargs)


def say(info: DistInfo | None, *args: Any) -> None:
    """print() on rank 0 only, through tqdm so that open progress bars are not broken."""
    if info is None or info.is_main:
        from tqdm.auto import tqdm

        tqdm.write(" ".join(str(a) for a in args), file=sys.stdout)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def args_config(args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """The run's configuration: the parsed options plus resolved settings (recorded in results.json)."""
    config = {k: v for k, v in vars(args).items() if not k.startswith("_")}
    config.update(extra)
    config["torch_version"] = torch.__version__
    return _jsonable(config)


def write_results(out: str | Path, config: dict[str, Any], rows: Sequence[dict[str, Any]]) -> Path:
    """Write ``results.json`` (``{"config": ..., "rows": ...}``) and ``results.csv`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [_jsonable(dict(r)) for r in rows]
    with open(out / "results.json", "w") as f:
        json.dump({"config": _jsonable(config), "rows": rows}, f, indent=2)
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        for r in rows:
            writer.writerow(r)
    return out / "results.json"


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A plain-text table of ``rows`` (floats with 4 significant decimals)."""
    if not rows:
        return "(no rows)"
    if columns is None:
        columns = []
        for r in rows:
            columns.extend(k for k in r if k not in columns)

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3e}" if 0 < abs(v) < 1e-3 else f"{v:.4f}"
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells)
    return "\n".join(lines)


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def resolve(value: Any, default: Any) -> Any:
    """``value`` unless it is None."""
    return default if value is None else value


def import_robust_pool():
    """``torchddn.nodes.RobustPool``, with a clear error if the robust pooling node is not available."""
    try:
        from torchddn.nodes import RobustPool
    except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the installed package
        raise AppError(f"robust pooling needs torchddn.nodes.RobustPool, which cannot be imported: {exc}") from exc
    return RobustPool


def import_projection():
    """``torchddn.nodes.EuclideanProjection``, with a clear error if the projection node is not available."""
    try:
        from torchddn.nodes import EuclideanProjection
    except (ImportError, AttributeError) as exc:  # pragma: no cover - depends on the installed package
        raise AppError("projection layers need torchddn.nodes.EuclideanProjection, which cannot be imported: "
                       f"{exc}") from exc
    return EuclideanProjection


def run_app(fn, args: argparse.Namespace) -> int:
    """Run ``fn(args)``; turn an :class:`AppError` (or the library's DDNError on bad data) into a message and exit 2."""
    try:
        return int(fn(args) or 0)
    except AppError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
