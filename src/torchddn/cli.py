"""The ``torchddn`` command line: ``torchddn SUBCOMMAND [options]`` (also ``python -m torchddn``).

Each subcommand lives in its own module, which defines ``add_arguments(parser)`` and ``main(args) -> int``.
Modules are imported only when their subcommand runs, so ``torchddn --help`` stays fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

#: subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("torchddn.apps.demo", "bilevel robust-average demo: mean vs pseudo-Huber average (prints a table)"),
    "pointcloud": ("torchddn.apps.pointcloud", "PointNet with robust pooling vs max pooling under outliers"),
    "image": ("torchddn.apps.image", "ResNet with Euclidean projection layers on Fashion-MNIST / digits"),
    "ensemble": ("torchddn.apps.ensemble", "robust ensemble of MLPs on the breast-cancer data"),
    "bilevel": ("torchddn.apps.bilevel", "zero-centring toy: move points so their (robust) average reaches zero"),
    "bench": ("torchddn.bench.cli", "run the benchmark suite and print a table of ratios"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchddn", description="Deep declarative networks for PyTorch: experiments, demos and benchmarks."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in SUBCOMMANDS:
        if argv and argv[0] not in ("-h", "--help"):
            parser.print_usage(sys.stderr)
            print(f"torchddn: unknown command {argv[0]!r}; choose from {', '.join(SUBCOMMANDS)}", file=sys.stderr)
            return 2
        parser.print_help()
        return 0
    name = argv[0]
    module_name, help_text = SUBCOMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:  # an optional dependency is missing
        print(f"torchddn {name}: cannot import {module_name}: {exc}. "
              "Install the extras with: pip install 'torchddn[apps]'", file=sys.stderr)
        return 1
    sub = argparse.ArgumentParser(prog=f"torchddn {name}", description=help_text)
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    return int(module.main(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
