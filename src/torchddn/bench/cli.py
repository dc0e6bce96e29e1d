"""``torchddn bench``: run the benchmark suite, print one table of ratios, save JSON and charts.

Usage::

    torchddn bench [--quick] [--device cpu|cuda] [--only NAME ...] --out DIR

Runs the modules of :data:`torchddn.bench.REGISTRY` in order (or only those named with ``--only``), each in
the same process so that all ratios come from one run on one machine.  A module that cannot be imported
(not written, or an optional peer package such as ``qpth`` or ``cvxpylayers`` is missing) or that raises is
reported as a row with a ``"skipped"`` reason; the rest of the suite still runs.  Writes

* ``DIR/results.json``: ``{"config": {...}, "rows": [...]}``;
* ``DIR/ratios.png``: bars of baseline time / our time on a log scale, with the 1x line;
* ``DIR/scaling.png``: log-log cost against problem size, for rows carrying ``"size"`` and a time key.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

from . import REGISTRY
from .common import format_value, machine_config, print_table, resolve_device, write_results

__all__ = ["add_arguments", "main", "run_suite", "plot_ratios", "plot_scaling", "TIME_KEYS"]

#: keys recognised as "our" time for the scaling plot, in order of preference (values in ms unless named _s)
TIME_KEYS: tuple[str, ...] = ("ours_ms", "our_ms", "time_ms", "ms", "ours_s", "time_s")

#: keys recognised as the baseline's time for the scaling plot
BASELINE_TIME_KEYS: tuple[str, ...] = ("baseline_ms", "base_ms", "baseline_s")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``torchddn bench`` options to ``parser``."""
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats (well under a minute per module)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="device to run on (default: cpu)")
    parser.add_argument("--only", nargs="+", metavar="NAME", default=None,
                        help=f"run only these benchmarks (from: {', '.join(REGISTRY)})")
    parser.add_argument("--out", default="bench_results", metavar="DIR",
                        help="output directory for results.json and the charts (default: bench_results)")
    parser.add_argument("--no-plots", action="store_true", help="do not write the PNG charts")


def _skip_row(name: str, reason: str) -> dict[str, Any]:
    return {"benchmark": name, "baseline": "-", "ratio": None, "skipped": reason}


def run_suite(
    names: Sequence[str],
    quick: bool = False,
    device: str = "cpu",
    registry: Mapping[str, str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the benchmark modules ``names`` and return all rows, each tagged with ``"module"``.

    A module that fails to import, lacks ``run``, or raises while running gives one row with a ``"skipped"``
    reason instead of stopping the suite.
    """
    registry = globals()["REGISTRY"] if registry is None else registry
    rows: list[dict[str, Any]] = []
    for name in names:
        module_name = registry[name]
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            missing = getattr(exc, "name", None)
            if missing == module_name:
                reason = f"module {module_name} is not available"
            else:
                reason = f"missing dependency: {exc}"
            log(f"[bench] skipping {name}: {reason}")
            rows.append({**_skip_row(name, reason), "module": name})
            continue
        run = getattr(module, "run", None)
        if not callable(run):
            reason = f"{module_name} defines no run()"
            log(f"[bench] skipping {name}: {reason}")
            rows.append({**_skip_row(name, reason), "module": name})
            continue
        log(f"[bench] running {name} ...")
        start = time.perf_counter()
        try:
            result = run(quick=quick, device=device)
        except ImportError as exc:  # an optional peer package imported lazily inside run()
            reason = f"missing dependency: {exc}"
            log(f"[bench] skipping {name}: {reason}")
            rows.append({**_skip_row(name, reason), "module": name})
            continue
        except Exception as exc:  # noqa: BLE001 - one failing benchmark must not stop the suite
            reason = f"error: {type(exc).__name__}: {exc}"
            log(f"[bench] {name} failed: {reason}")
            log(traceback.format_exc(limit=3))
            rows.append({**_skip_row(name, reason), "module": name})
            continue
        log(f"[bench] {name} done in {time.perf_counter() - start:.1f} s")
        for row in result or []:
            rows.append({"module": name, **dict(row)})
    return rows


def _finite_ratio(row: Mapping[str, Any]) -> float | None:
    r = row.get("ratio")
    if isinstance(r, (int, float)) and not isinstance(r, bool) and math.isfinite(r) and r > 0:
        return float(r)
    return None


def _label(row: Mapping[str, Any]) -> str:
    parts = [str(row.get("benchmark", "?"))]
    size = row.get("size")
    if size is not None and str(size) not in parts[0]:
        parts.append(f"n={size}" if isinstance(size, (int, float)) else str(size))
    baseline = str(row.get("baseline", "?"))
    if len(baseline) > 36:
        baseline = baseline[:35] + "..."
    parts.append(f"vs {baseline}")
    return " ".join(parts)


def plot_ratios(rows: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str | None:
    """Bar chart of ratios (baseline time / our time) on a log axis with the 1x line; returns the path."""
    data = [(_label(r), _finite_ratio(r)) for r in rows]
    data = [(lab, v) for lab, v in data if v is not None]
    if not data:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [lab for lab, _ in data]
    values = [v for _, v in data]
    height = max(2.5, 0.32 * len(values) + 1.2)
    width = max(9.0, 6.0 + 0.07 * max(len(lab) for lab in labels))
    fig, ax = plt.subplots(figsize=(width, height))
    colors = ["tab:green" if v >= 1 else "tab:red" for v in values]
    ypos = list(range(len(values)))
    ax.barh(ypos, values, color=colors, left=0)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1.0, linestyle="--", label="1x (same speed)")
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up: baseline time / torchddn time (log scale; >1 means torchddn is faster)")
    lo, hi = min(values + [1.0]), max(values + [1.0])
    ax.set_xlim(lo / 2.0, hi * 2.0)
    for y, v in zip(ypos, values):
        ax.text(v, y, f" {v:.3g}x", va="center", fontsize=7)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _time_of(row: Mapping[str, Any], keys: Sequence[str]) -> float | None:
    for k in keys:
        v = row.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0:
            return float(v) * (1000.0 if k.endswith("_s") else 1.0)
    return None


_SIZE_TOKEN = re.compile(r"\s*\b[A-Za-z]+\s*=\s*\d+(?:\.\d+)?\b")


def _numeric_size(size: Any) -> float | None:
    """``size`` as a number: numbers as they are; strings such as ``"b=8 n=64"`` by their ``n=`` entry."""
    if isinstance(size, bool):
        return None
    if isinstance(size, (int, float)):
        return float(size) if math.isfinite(size) and size > 0 else None
    if isinstance(size, str):
        match = re.search(r"\bn\s*=\s*(\d+(?:\.\d+)?)", size)
        if match and float(match.group(1)) > 0:
            return float(match.group(1))
    return None


def _series_name(row: Mapping[str, Any]) -> str:
    """The benchmark name without size tokens such as ``m=64``, so that the sizes of one sweep form one line."""
    name = _SIZE_TOKEN.sub("", str(row.get("benchmark", "?"))).strip()
    return name or str(row.get("benchmark", "?"))


def plot_scaling(rows: Sequence[Mapping[str, Any]], path: str, title: str = "") -> str | None:
    """Log-log plot of time (ms) against problem size for each benchmark (ours solid, baseline dashed).

    Uses rows that carry a ``"size"`` (a number, or a string with an ``n=`` entry such as ``"b=8 n=64"``) and one
    of :data:`TIME_KEYS`; rows whose names differ only by size tokens (``"... m=64"``) form one line.  The slope
    of each line shows how the cost grows with the problem size.  Returns the path, or ``None`` when no
    benchmark has two sizes.
    """
    series: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for r in rows:
        size = _numeric_size(r.get("size"))
        if size is None:
            continue
        ours = _time_of(r, TIME_KEYS)
        if ours is None:
            continue
        key = _series_name(r)
        s = series.setdefault(key, {"ours": [], "base": [], "baseline": [str(r.get("baseline", "baseline"))]})
        s["ours"].append((float(size), ours))
        base = _time_of(r, BASELINE_TIME_KEYS)
        if base is not None:
            s["base"].append((float(size), base))
    series = {k: v for k, v in series.items() if len({x for x, _ in v["ours"]}) >= 2}
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    cmap = plt.get_cmap("tab10")
    for i, (name, s) in enumerate(sorted(series.items())):
        color = cmap(i % 10)
        pts = sorted(s["ours"])
        ax.loglog([x for x, _ in pts], [y for _, y in pts], "o-", color=color, label=f"{name} (torchddn)")
        if len({x for x, _ in s["base"]}) >= 2:
            pts = sorted(s["base"])
            ax.loglog([x for x, _ in pts], [y for _, y in pts], "s--", color=color, alpha=0.7,
                      label=f"{name} ({s['baseline'][0]})")
    ax.set_xlabel("problem size (n)")
    ax.set_ylabel("time per call (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(title or "cost against problem size (log-log; slope = growth exponent)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(args: argparse.Namespace) -> int:
    """Run the suite as configured by ``args`` (from :func:`add_arguments`); returns the exit status."""
    registry = REGISTRY  # module global, so that tests can substitute a registry
    names = list(registry) if not args.only else list(args.only)
    unknown = [n for n in names if n not in registry]
    if unknown:
        print(f"torchddn bench: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(registry)}")
        return 2
    try:
        resolve_device(args.device)
    except RuntimeError as exc:
        print(f"torchddn bench: {exc}; run with --device cpu")
        return 2

    quick = bool(args.quick)
    start = time.perf_counter()
    rows = run_suite(names, quick=quick, device=args.device, registry=registry)
    elapsed = time.perf_counter() - start

    config = machine_config(device=args.device, quick=quick, benchmarks=names, seconds=round(elapsed, 1))
    print()
    print(f"torchddn bench ({'quick' if quick else 'full'}, device={args.device}, torch {config['torch']}, "
          f"{config['cpu']})")
    print("ratio = baseline time / torchddn time (>1: torchddn is faster), all measured in this run")
    table_rows = [r for r in rows if not r.get("skipped")]
    if table_rows:
        print_table(table_rows, _table_columns(table_rows))
    skipped = [r for r in rows if r.get("skipped")]
    for r in skipped:
        print(f"skipped {r['benchmark']}: {r['skipped']}")

    out = args.out
    path = write_results(out, rows, config)
    print(f"wrote {path}")
    md = os.path.join(out, "results.md")
    with open(md, "w", encoding="utf-8") as fh:
        fh.write(markdown_table(rows) + "\n")
    print(f"wrote {md}")
    if not getattr(args, "no_plots", False):
        title = f"torchddn bench ({'quick' if quick else 'full'}, {args.device})"
        for written in (plot_ratios(rows, os.path.join(out, "ratios.png"), title),
                        plot_scaling(rows, os.path.join(out, "scaling.png"))):
            if written:
                print(f"wrote {written}")
    return 0


#: columns that :func:`markdown_table` shows on their own; every other numeric key goes into ``notes``
_MD_MAIN = ("benchmark", "baseline", "ratio", "size", "ours_ms", "baseline_ms")
_MD_SKIP = {"module", "note", "skipped"}


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as a Markdown table (benchmark, baseline, ratio, size, times, notes), e.g. for the docs.

    ``notes`` collects the remaining keys of each row (memory, gradient errors, ...) as ``key=value``; skipped
    benchmarks are listed with the reason."""
    head = "| " + " | ".join(_MD_MAIN) + " | notes |"
    lines = [head, "|" + "---|" * (len(_MD_MAIN) + 1)]
    for r in rows:
        if r.get("skipped"):
            lines.append(f"| {r.get('benchmark', '?')} | - | - | - | - | - | skipped: {r['skipped']} |")
            continue
        cells = [format_value(r.get(c)) for c in _MD_MAIN]
        notes = [f"{k}={format_value(v)}" for k, v in r.items()
                 if k not in _MD_MAIN and k not in _MD_SKIP and v not in (None, "", "-")]
        if r.get("note"):
            notes.append(str(r["note"]))
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " | "
                     + ", ".join(notes).replace("|", "/") + " |")
    return "\n".join(lines)


def _table_columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    cols = ["benchmark", "baseline", "ratio"]
    if any("size" in r for r in rows):
        cols.append("size")
    for r in rows:
        for k in r:
            if k not in cols and k != "module":
                cols.append(k)
    return cols


if __name__ == "__main__":  # pragma: no cover
    p = argparse.ArgumentParser(prog="torchddn bench")
    add_arguments(p)
    raise SystemExit(main(p.parse_args()))
