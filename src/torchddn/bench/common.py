"""Shared utilities for the benchmark modules in :mod:`torchddn.bench`.

Every benchmark module times our implementation against a baseline in the same process with
:func:`timeit`, measures memory with :func:`peak_memory`, and returns rows (dicts) that the harness prints with
:func:`print_table` and saves with :func:`write_results`.

Timing method
    :func:`timeit` runs ``warmup`` untimed calls (to fill caches, trigger lazy initialisation and CUDA kernel
    selection), then ``repeats`` timed calls, and returns the **median** wall-clock time in seconds.  On CUDA
    the device is synchronised before starting and after finishing each call, so the time covers the kernels
    and not just their launch.

Memory method
    :func:`peak_memory` on CUDA resets the allocator's peak counter and reports
    ``torch.cuda.max_memory_allocated`` minus the memory allocated before the call.  On CPU PyTorch keeps no
    allocator statistics, so it reports the memory an autograd graph holds on to: the bytes of every tensor
    *saved for backward* during the call (recorded with :class:`torch.autograd.graph.saved_tensors_hooks`,
    counting each storage once) plus the bytes of the tensors the call returns.  This is the quantity that
    differs between an implicit backward (saves the inputs and the solution) and an unrolled one (saves every
    iterate), and it is deterministic.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = [
    "timeit",
    "peak_memory",
    "graph_memory",
    "print_table",
    "format_table",
    "format_value",
    "write_results",
    "machine_config",
    "cpu_info",
    "synchronize",
    "resolve_device",
    "module_main",
]


#: the clock used by :func:`timeit` (monotonic, high resolution)
_clock: Callable[[], float] = time.perf_counter


def resolve_device(device: str | torch.device | None) -> torch.device:
    """Return ``device`` as a :class:`torch.device`, raising ``RuntimeError`` if CUDA is asked for but absent."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was requested but CUDA is not available in this PyTorch build/machine")
    return dev


def synchronize(device: str | torch.device | None = None) -> None:
    """Wait for all queued kernels on ``device`` (a no-op on CPU)."""
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.synchronize(dev)


def timeit(
    fn: Callable[[], Any],
    repeats: int = 7,
    warmup: int = 2,
    device: str | torch.device | None = None,
    max_time: float | None = None,
) -> float:
    """Median wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` untimed runs.

    Args:
        fn: a callable taking no arguments (close over the inputs).
        repeats: number of timed runs (at least 1).
        warmup: number of untimed runs before timing.
        device: the device the work runs on.  When it is a CUDA device (or when ``None`` and CUDA is
            initialised), the device is synchronised around every timed call.
        max_time: optional budget in seconds; timing stops early (after at least one timed run) once the
            timed runs have used this much time.

    Returns:
        the median of the timed runs, in seconds.
    """
    if repeats < 1:
        raise ValueError(f"timeit: repeats must be >= 1, got {repeats}")
    if device is None:
        sync = torch.cuda.is_available() and torch.cuda.is_initialized()
        dev = torch.device("cuda") if sync else torch.device("cpu")
    else:
        dev = torch.device(device)
        sync = dev.type == "cuda"
    for _ in range(max(0, int(warmup))):
        fn()
    if sync:
        synchronize(dev)
    times: list[float] = []
    spent = 0.0
    for _ in range(int(repeats)):
        start = _clock()
        fn()
        if sync:
            synchronize(dev)
        elapsed = _clock() - start
        times.append(elapsed)
        spent += elapsed
        if max_time is not None and spent >= max_time:
            break
    return float(statistics.median(times))


def _tensors_in(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from _tensors_in(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v)


def _storage_key(t: torch.Tensor) -> tuple:
    try:
        return (t.untyped_storage().data_ptr(), t.device.type)
    except Exception:  # tensors without storage (e.g. some subclasses)
        return (id(t), t.device.type)


def _storage_bytes(t: torch.Tensor) -> int:
    try:
        return int(t.untyped_storage().nbytes())
    except Exception:
        return int(t.numel() * t.element_size())


def peak_memory(fn: Callable[[], Any], device: str | torch.device | None = "cpu") -> int:
    """Memory in bytes used by ``fn()``; see the module docstring for the method.

    On CUDA: the peak of ``torch.cuda.max_memory_allocated`` during the call minus the memory allocated
    before it.  On CPU: the bytes of all distinct tensor storages saved for backward by autograd during the
    call plus the bytes of the returned tensors (outputs counted once even when also saved).

    Args:
        fn: a callable taking no arguments; typically runs a forward pass with ``requires_grad`` inputs
            (and optionally the backward pass).
        device: the device the work runs on.

    Returns:
        the number of bytes (an ``int``).
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        resolve_device(dev)
        synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        out = fn()
        synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev)
        del out
        return int(max(0, peak - before))

    seen: dict[tuple, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen.setdefault(_storage_key(t), _storage_bytes(t))
        return t

    def unpack(t: torch.Tensor) -> torch.Tensor:
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = fn()
    for t in _tensors_in(out):
        seen.setdefault(_storage_key(t), _storage_bytes(t))
    return int(sum(seen.values()))


def format_value(value: Any) -> str:
    """Format one table cell: floats with about 3-4 significant digits, ``None`` as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0.0:
            return "0"
        a = abs(value)
        if a >= 1e5 or a < 1e-3:
            return f"{value:.2e}"
        if a >= 100:
            return f"{value:.0f}"
        if a >= 10:
            return f"{value:.1f}"
        if a >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return format_value(value.item())
    return str(value)


def _default_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    first = ["benchmark", "baseline", "ratio"]
    cols = [c for c in first if any(c in r for r in rows)]
    for r in rows:
        for k in r:
            if k not in cols:
                cols.append(k)
    return cols


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Return ``rows`` as an aligned text table (numbers right-aligned, text left-aligned)."""
    rows = list(rows)
    if not rows:
        return "(no rows)"
    cols = list(columns) if columns is not None else _default_columns(rows)
    cells = [[format_value(r.get(c)) for c in cols] for r in rows]
    numeric = [
        all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows)
        and any(isinstance(r.get(c), (int, float)) for r in rows)
        for c in cols
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def fmt(parts: Sequence[str]) -> str:
        out = []
        for i, p in enumerate(parts):
            out.append(p.rjust(widths[i]) if numeric[i] else p.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt(cols), "  ".join("-" * w for w in widths)]
    lines.extend(fmt(row) for row in cells)
    return "\n".join(lines)


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> None:
    """Print ``rows`` (a list of dicts) as an aligned text table.

    Args:
        rows: the rows; missing keys print as ``-``.
        columns: the columns to show, in order; default: ``benchmark``, ``baseline``, ``ratio`` first, then
            every other key in order of first appearance.
    """
    print(format_table(rows, columns), flush=True)


def cpu_info() -> str:
    """A short description of the CPU (model name where available, and the core count)."""
    name = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if not name:
        name = platform.processor() or platform.machine()
    return f"{name} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def machine_config(device: str = "cpu", quick: bool = False, **extra: Any) -> dict[str, Any]:
    """The run configuration recorded in ``results.json``: device, quick flag, versions, CPU/GPU, date."""
    cfg: dict[str, Any] = {
        "device": str(device),
        "quick": bool(quick),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": cpu_info(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        cfg["gpu"] = torch.cuda.get_device_name(torch.device(device))
    cfg.update(extra)
    return cfg


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):  # numpy scalars
        try:
            return _jsonable(value.item())
        except Exception:
            pass
    return str(value)


def write_results(out_dir: str | os.PathLike, rows: Sequence[Mapping[str, Any]],
                  config: Mapping[str, Any] | None = None) -> str:
    """Write ``{"config": config, "rows": rows}`` to ``out_dir/results.json`` and return the file path.

    The directory is created if needed; tensors and numpy scalars are converted to plain numbers and
    non-finite floats to strings so that the file is valid JSON.
    """
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(os.fspath(out_dir), "results.json")
    payload = {"config": _jsonable(dict(config or {})), "rows": _jsonable(list(rows))}
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(payload, fh, indent=2)
        fh.write("\n")
    return path


def graph_memory(fn: Callable[[], Any], device: str | torch.device | None = "cpu") -> int:
    """Bytes held by the autograd graph of ``fn()``'s outputs (plus the outputs), or the CUDA peak on GPU.

    Unlike :func:`peak_memory` on CPU this needs no saved-tensor hooks, so it also works when ``fn`` runs
    ``torch.func`` transforms (which refuse such hooks). It walks the graph from the outputs and adds up the
    distinct storages of every tensor a node saved for backward (``_saved_*`` attributes and the
    ``saved_tensors`` of custom autograd functions).
    """
    dev = torch.device("cpu" if device is None else device)
    if dev.type == "cuda":
        return peak_memory(fn, dev)
    out = fn()
    seen: dict[tuple, int] = {}
    for t in _tensors_in(out):
        seen.setdefault(_storage_key(t), _storage_bytes(t))
    stack = [t.grad_fn for t in _tensors_in(out) if t.grad_fn is not None]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        saved: list = []
        for name in dir(node):
            if name.startswith("_saved_"):
                try:
                    saved.append(getattr(node, name))
                except Exception:  # freed or not a tensor
                    pass
        try:
            saved.extend(getattr(node, "saved_tensors", ()) or ())
        except Exception:
            pass
        for t in _tensors_in(saved):
            seen.setdefault(_storage_key(t), _storage_bytes(t))
        stack.extend(fn_ for fn_, _ in getattr(node, "next_functions", ()))
    return int(sum(seen.values()))


def module_main(run: Callable[..., list], doc: str | None, argv: Sequence[str] | None = None,
                configure: Callable[[Any], None] | None = None) -> None:
    """Command line of one benchmark module: ``--quick``, ``--device`` (plus what ``configure(parser)`` adds);
    calls ``run(quick=..., device=..., **extra options)`` and prints its rows with :func:`print_table`."""
    import argparse

    parser = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0] if doc else None)
    parser.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    if configure is not None:
        configure(parser)
    args = vars(parser.parse_args(argv))
    print_table(run(**args))
