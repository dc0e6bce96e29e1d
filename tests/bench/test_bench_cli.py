"""The benchmark harness (``torchddn bench``) on a fake registry, and the shared benchmark utilities."""
from __future__ import annotations

import argparse
import json
import math
import textwrap

import pytest
import torch

from torchddn.bench import REGISTRY, cli, common

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

FAKE_MODULES = {
    "fakebench_ok": """
        def run(quick=False, device="cpu"):
            rows = []
            for n in (10, 100, 1000):
                rows.append({"benchmark": "fake solve", "baseline": "naive", "size": n,
                             "ours_ms": 0.01 * n, "baseline_ms": 0.0001 * n * n,
                             "ratio": (0.0001 * n * n) / (0.01 * n), "quick": quick, "device": device})
            return rows
    """,
    "fakebench_other": """
        def run(quick=False, device="cpu"):
            return [{"benchmark": "other", "baseline": "loop", "ratio": 3.5, "err": 1e-12}]
    """,
    "fakebench_dep": """
        import torchddn_no_such_peer_package  # an optional peer package that is not installed
        def run(quick=False, device="cpu"):
            return []
    """,
    "fakebench_lazydep": """
        def run(quick=False, device="cpu"):
            import torchddn_no_such_peer_package_either
            return []
    """,
    "fakebench_error": """
        def run(quick=False, device="cpu"):
            raise RuntimeError("boom in the benchmark")
    """,
    "fakebench_norun": """
        X = 1
    """,
}


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    pkg = tmp_path / "fakes"
    pkg.mkdir()
    for name, src in FAKE_MODULES.items():
        (pkg / f"{name}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(pkg))
    registry = {
        "ok": "fakebench_ok",
        "missing": "fakebench_does_not_exist",
        "dep": "fakebench_dep",
        "lazydep": "fakebench_lazydep",
        "error": "fakebench_error",
        "norun": "fakebench_norun",
        "other": "fakebench_other",
    }
    monkeypatch.setattr(cli, "REGISTRY", registry)
    return registry


def _args(out, *extra):
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    return parser.parse_args(["--quick", "--out", str(out), *extra])


def test_registry_order():
    assert list(REGISTRY) == ["core", "unrolled", "pooling", "projections", "qp", "sinkhorn",
                              "least_squares", "curve_fit", "pointnet", "fixed_point", "deq"]
    assert all(v == f"torchddn.bench.{k}" for k, v in REGISTRY.items())


def test_harness_runs_fake_registry(fake_registry, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(_args(out)) == 0
    printed = capsys.readouterr().out

    data = json.loads((out / "results.json").read_text())
    cfg = data["config"]
    assert cfg["device"] == "cpu" and cfg["quick"] is True
    assert cfg["torch"] == torch.__version__
    assert cfg["cpu"] and cfg["date"]
    rows = {(r["module"], r.get("size")): r for r in data["rows"]}
    # the good modules' rows are all there, in registry order, with run() given the options
    ok = [r for r in data["rows"] if r["module"] == "ok"]
    assert [r["size"] for r in ok] == [10, 100, 1000]
    assert all(r["quick"] is True and r["device"] == "cpu" for r in ok)
    assert math.isclose(rows[("ok", 1000)]["ratio"], 10.0)
    assert rows[("other", None)]["ratio"] == 3.5
    assert [r["module"] for r in data["rows"]] == ["ok"] * 3 + ["missing", "dep", "lazydep", "error", "norun",
                                                                 "other"]
    # every broken module is skipped with a reason, without stopping the suite
    skipped = {r["module"]: r["skipped"] for r in data["rows"] if r.get("skipped")}
    assert set(skipped) == {"missing", "dep", "lazydep", "error", "norun"}
    assert "not available" in skipped["missing"]
    assert "torchddn_no_such_peer_package" in skipped["dep"]
    assert "torchddn_no_such_peer_package_either" in skipped["lazydep"]
    assert "boom in the benchmark" in skipped["error"]
    assert "run()" in skipped["norun"]
    for name in skipped:
        assert f"skipping {name}" in printed or f"{name} failed" in printed
    # one table with the ratios, the same as Markdown (one line per row, skipped ones with the reason), and charts
    assert "ratio" in printed and "fake solve" in printed and "other" in printed
    md = (out / "results.md").read_text().splitlines()
    assert md[0].startswith("| benchmark | baseline | ratio |") and len(md) == 2 + len(data["rows"])
    assert sum("skipped:" in line for line in md) == 5
    assert any("| 10 |" in line or "| 10.0 |" in line for line in md)
    for png in ("ratios.png", "scaling.png"):
        blob = (out / png).read_bytes()
        assert blob[:8] == PNG_MAGIC and len(blob) > 2000


def test_only_selects_modules(fake_registry, tmp_path):
    out = tmp_path / "only"
    assert cli.main(_args(out, "--only", "other")) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["module"] for r in data["rows"]] == ["other"]
    assert data["config"]["benchmarks"] == ["other"]
    assert (out / "ratios.png").exists()
    assert not (out / "scaling.png").exists()  # no row carries a size


def test_only_unknown_name_is_an_error(fake_registry, tmp_path, capsys):
    assert cli.main(_args(tmp_path / "x", "--only", "nope")) == 2
    assert "unknown benchmark" in capsys.readouterr().out
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error(fake_registry, tmp_path, capsys):
    assert cli.main(_args(tmp_path / "c", "--device", "cuda")) == 2
    assert "CUDA is not available" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        common.resolve_device("cuda")


def test_entry_point_dispatches_to_bench(fake_registry, tmp_path):
    from torchddn.cli import SUBCOMMANDS, main as torchddn_main

    assert SUBCOMMANDS["bench"][0] == "torchddn.bench.cli"
    out = tmp_path / "entry"
    assert torchddn_main(["bench", "--quick", "--only", "ok", "--out", str(out), "--no-plots"]) == 0
    assert (out / "results.json").exists() and not (out / "ratios.png").exists()


def test_plots_skip_when_nothing_to_plot(tmp_path):
    rows = [{"benchmark": "a", "baseline": "b", "ratio": None, "skipped": "missing"}]
    assert cli.plot_ratios(rows, str(tmp_path / "r.png")) is None
    assert cli.plot_scaling(rows, str(tmp_path / "s.png")) is None
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- common


def test_timeit_runs_warmup_and_repeats_and_returns_median(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(common, "_clock", lambda: now[0])  # a fake clock: each call "takes" a scripted time
    durations = iter([5.0, 5.0, 0.003, 0.001, 0.002])      # two warm-up calls, then three timed ones
    calls = []

    def fn():
        d = next(durations)
        calls.append(d)
        now[0] += d

    t = common.timeit(fn, repeats=3, warmup=2)
    assert len(calls) == 5
    assert t == pytest.approx(0.002)  # the median of the timed runs; the slow warm-up is excluded
    durations = iter([1.0, 1.0, 1.0])
    assert common.timeit(fn, repeats=3, warmup=0, max_time=1.5) == pytest.approx(1.0)
    assert next(durations) == 1.0      # stopped after two runs: the budget was spent
    with pytest.raises(ValueError, match="repeats"):
        common.timeit(fn, repeats=0)


def test_peak_memory_cpu_counts_saved_tensors_and_outputs():
    x = torch.randn(50, 20, dtype=torch.float64, requires_grad=True)
    # exp saves its output (50*20*8 bytes) which is also the returned tensor: counted once
    assert common.peak_memory(lambda: x.exp(), "cpu") == 50 * 20 * 8
    # mul by a tensor saves both operands (x and w), plus the (b,) output
    w = torch.randn(50, 20, dtype=torch.float64, requires_grad=True)
    assert common.peak_memory(lambda: (x * w).sum(1), "cpu") == 2 * 50 * 20 * 8 + 50 * 8
    # without autograd nothing is saved: only the output counts
    with torch.no_grad():
        assert common.peak_memory(lambda: x.exp(), "cpu") == 50 * 20 * 8
    # an unrolled loop holds on to every iterate, an implicit one does not
    def unrolled():
        y = x
        for _ in range(10):
            y = torch.tanh(y)
        return y

    assert common.peak_memory(unrolled, "cpu") == 10 * 50 * 20 * 8
    assert common.graph_memory(unrolled, "cpu") == 10 * 50 * 20 * 8


def test_format_and_print_table(capsys):
    rows = [{"benchmark": "alpha", "baseline": "b", "ratio": 12.3456, "ms": 0.000123, "size": 10},
            {"benchmark": "much longer name", "baseline": "bb", "ratio": 0.5, "note": None, "ok": True}]
    common.print_table(rows)
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["benchmark", "baseline", "ratio", "ms", "size", "note", "ok"]
    assert set(lines[1]) <= {"-", " "}
    assert "12.3" in lines[2] and "1.23e-04" in lines[2]
    assert "0.500" in lines[3] and "yes" in lines[3]
    # numbers right-aligned: the ratio column ends at the same offset on every line
    end = lines[0].index("ratio") + len("ratio")
    assert lines[2][:end].endswith("12.3") and lines[3][:end].endswith("0.500")
    assert common.format_table([{"a": 1}], columns=["a", "b"]).splitlines()[2].split() == ["1", "-"]
    assert common.format_table([]) == "(no rows)"
    assert common.format_value(float("nan")) == "nan" and common.format_value(2.0e6) == "2.00e+06"


def test_write_results_is_valid_json(tmp_path):
    rows = [{"benchmark": "a", "baseline": "b", "ratio": float("inf"), "t": torch.tensor(2.5),
             "v": torch.tensor([1.0, 2.0])}]
    path = common.write_results(tmp_path / "deep" / "dir", rows, common.machine_config("cpu", quick=True))
    data = json.loads(open(path).read())
    assert data["rows"][0]["ratio"] == "inf" and data["rows"][0]["t"] == 2.5 and data["rows"][0]["v"] == [1.0, 2.0]
    assert data["config"]["quick"] is True and data["config"]["device"] == "cpu"


def test_scaling_groups_sweeps_and_parses_string_sizes(tmp_path):
    assert cli._numeric_size(64) == 64.0 and cli._numeric_size("b=8 n=64") == 64.0
    assert cli._numeric_size("b=8") is None and cli._numeric_size(True) is None and cli._numeric_size(-1) is None
    assert cli._series_name({"benchmark": "generic backward m=16"}) == "generic backward"
    assert cli._series_name({"benchmark": "pointnet_epoch[welsch]"}) == "pointnet_epoch[welsch]"
    one_per_size = [{"benchmark": f"generic backward m={m}", "baseline": "dense", "ratio": 2.0, "size": m,
                     "ours_ms": 0.1 * m} for m in (16, 64)]
    assert cli.plot_scaling(one_per_size, str(tmp_path / "a.png")) == str(tmp_path / "a.png")
    strings = [{"benchmark": "sinkhorn", "baseline": "unrolled", "ratio": 2.0, "size": f"b=4 n={n}",
                "ours_ms": 0.01 * n * n, "baseline_ms": 0.02 * n * n} for n in (32, 128)]
    assert cli.plot_scaling(strings, str(tmp_path / "b.png")) is not None
    single = [{"benchmark": "x", "baseline": "y", "ratio": 1.0, "size": 8, "ours_ms": 1.0}]
    assert cli.plot_scaling(single, str(tmp_path / "c.png")) is None  # one size: no line to draw
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC and not (tmp_path / "c.png").exists()
    assert "vs dense" in cli._label(one_per_size[0]) and "n=16" not in cli._label(one_per_size[0])
