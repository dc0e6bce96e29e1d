"""The tutorials in docs/tutorials/ run end to end at tiny sizes, write their plots, and appear on the site.

The scripts run in two worker subprocesses (one per core; each imports torch once and runs its share of the
scripts one after another, each as ``__main__`` in a fresh namespace) with ``TORCHDDN_TUTORIAL_QUICK=1`` and a
temporary output directory ``TORCHDDN_TUTORIAL_OUT``. The scripts assert their own numerical checks (gradcheck,
closed forms, independent solvers), so a wrong gradient fails here. A module-scoped fixture runs them all; each
test then checks its own script's result.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL_DIR = ROOT / "docs" / "tutorials"
TIMEOUT_S = 600  # for a whole worker; guards against a hang

#: script -> modules it needs (a tutorial is skipped only when one of these modules does not exist)
TUTORIALS: dict[str, list[str]] = {
    "first_node": ["torchddn.node", "torchddn.function"],
    "bilevel": ["torchddn.node", "torchddn.nodes.least_squares"],
    "robust_pooling": ["torchddn.nodes.robust_pool"],
    "projections": ["torchddn.nodes.projections", "torchddn.node"],
    "constrained": ["torchddn.node"],
    "fixed_point": ["torchddn.fixed_point"],
    "qp_layer": ["torchddn.nodes.qp"],
    "optimal_transport": ["torchddn.nodes.optimal_transport"],
    "eigenvectors": ["torchddn.nodes.eigen"],
    "pnp": ["torchddn.nodes.pnp"],
    "tv": ["torchddn.nodes.tv"],
    "own_solver": ["torchddn.node", "torchddn.solvers.scipy_adapter"],
    "learned_parameters": ["torchddn.node", "torchddn.fixed_point"],
    "curve_fitting": ["torchddn.node", "torchddn.solvers.least_squares"],
}


def _missing(modules: list[str]) -> list[str]:
    """The modules (dotted names under ``torchddn``) whose source file does not exist in this checkout."""
    out = []
    for name in modules:
        rel = Path("src", *name.split("."))
        if not (ROOT / rel.with_suffix(".py")).exists() and not (ROOT / rel / "__init__.py").exists():
            out.append(name)
    return out


#: runs scripts one after another in one interpreter (so torch is imported once per worker), each in a fresh
#: ``__main__`` namespace with its own output directory and environment, and records a JSON result per script
RUNNER = r"""
import contextlib, io, json, os, runpy, sys, time, traceback
tutorial_dir, base = sys.argv[1], sys.argv[2]
for name in sys.argv[3:]:
    out_dir = os.path.join(base, name)
    os.makedirs(out_dir, exist_ok=True)
    os.environ["TORCHDDN_TUTORIAL_QUICK"] = "1"
    os.environ["TORCHDDN_TUTORIAL_OUT"] = out_dir
    os.chdir(out_dir)
    buf_out, buf_err = io.StringIO(), io.StringIO()
    start, ok = time.perf_counter(), True
    with contextlib.redirect_stdout(buf_out), contextlib.redirect_stderr(buf_err):
        try:
            runpy.run_path(os.path.join(tutorial_dir, name + ".py"), run_name="__main__")
        except BaseException:
            ok = False
            traceback.print_exc()
    result = {"ok": ok, "seconds": time.perf_counter() - start, "stdout": buf_out.getvalue(),
              "stderr": buf_err.getvalue()}
    with open(os.path.join(base, name + ".json"), "w") as fh:
        json.dump(result, fh)
"""


def _run_worker(names: list[str], base: Path) -> str:
    env = dict(os.environ)
    env.update(MPLBACKEND="Agg", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    try:
        proc = subprocess.run([sys.executable, "-c", RUNNER, str(TUTORIAL_DIR), str(base), *names], env=env,
                              capture_output=True, text=True, timeout=TIMEOUT_S)
        return proc.stderr
    except subprocess.TimeoutExpired:
        return f"worker timed out after {TIMEOUT_S} s"


@pytest.fixture(scope="module")
def tutorial_runs(tmp_path_factory):
    runnable = [n for n, mods in TUTORIALS.items() if not _missing(mods)]
    base = tmp_path_factory.mktemp("tutorials")
    shares = [runnable[0::2], runnable[1::2]]  # two worker processes, one per core
    with ThreadPoolExecutor(max_workers=2) as pool:
        worker_errors = list(pool.map(lambda names: _run_worker(names, base), [s for s in shares if s]))
    results = {}
    for n in runnable:
        path = base / f"{n}.json"
        if path.exists():
            results[n] = (json.loads(path.read_text()), base / n)
        else:  # the worker died or timed out before finishing this script
            results[n] = ({"ok": False, "seconds": None, "stdout": "", "stderr": "\n".join(worker_errors)}, base / n)
    return results


@pytest.mark.parametrize("name", list(TUTORIALS))
def test_tutorial_runs(name, tutorial_runs):
    missing = _missing(TUTORIALS[name])
    if missing:
        pytest.skip(f"tutorial {name}.py needs {', '.join(missing)}, which does not exist yet")
    result, out_dir = tutorial_runs[name]
    assert result["ok"], (f"{name}.py failed:\n--- stdout\n{result['stdout'][-3000:]}"
                          f"\n--- stderr\n{result['stderr'][-6000:]}")
    pngs = sorted(out_dir.glob("*.png"))
    assert pngs, f"{name}.py wrote no plot to its output directory"
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_every_tutorial_is_listed_and_has_a_page():
    scripts = sorted(p.stem for p in TUTORIAL_DIR.glob("*.py"))
    assert scripts == sorted(TUTORIALS), "docs/tutorials/*.py and TUTORIALS differ"
    nav = (ROOT / "mkdocs.yml").read_text()
    index = (TUTORIAL_DIR / "index.md").read_text()
    for name in scripts:
        page = TUTORIAL_DIR / f"{name}.md"
        assert page.exists(), f"no page for {name}.py"
        assert f'--8<-- "tutorials/{name}.py"' in page.read_text(), f"{page.name} does not embed {name}.py"
        assert f"tutorials/{name}.md" in nav, f"{name}.md is not in the mkdocs nav"
        assert f"({name}.md)" in index, f"{name}.md is not linked from tutorials/index.md"


def test_scripts_follow_the_conventions():
    for path in TUTORIAL_DIR.glob("*.py"):
        text = path.read_text()
        assert text.startswith('"""'), f"{path.name} has no docstring"
        assert "TORCHDDN_TUTORIAL_QUICK" in text and "TORCHDDN_TUTORIAL_OUT" in text, path.name
        assert 'matplotlib.use("Agg")' in text, path.name
        assert re.search(r"savefig\(os\.path\.join\(OUT,", text), f"{path.name} saves no plot to OUT"
        assert "torch.manual_seed(" in text, f"{path.name} does not fix its seed"


@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings")
    pytest.importorskip("material")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert (tmp_path / "site" / "index.html").exists()
    assert (tmp_path / "site" / "tutorials" / "first_node" / "index.html").exists()
