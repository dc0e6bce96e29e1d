"""Quick runs of the DEQ-with-weights benchmark and the core's less well conditioned rows: rows well formed."""
from __future__ import annotations

import importlib.util
import math

import torch

from torchddn.bench import REGISTRY, core, deq


def _finite(v) -> bool:
    return isinstance(v, float) and math.isfinite(v)


def test_deq_registered_and_quick_rows_well_formed():
    assert REGISTRY["deq"] == "torchddn.bench.deq"
    rows = deq.run(quick=True, batches=(2, 4), n=16, repeats=1)
    names = {r["baseline"] for r in rows}
    expected = {"torchddn params", "torchddn params (fixed_point backward)", "torchddn expanded W", "unrolled picard"}
    if importlib.util.find_spec("torchdeq") is not None:
        expected.add("torchdeq")
    assert names == expected and len(rows) == 2 * len(expected)
    for r in rows:
        assert r["benchmark"].startswith("deq_linear fwd+bwd b=")
        assert _finite(r["ratio"]) and r["ratio"] > 0
        assert math.isclose(r["ratio"], r["baseline_ms"] / r["ours_ms"])
        assert r["baseline_backward_mem_MB"] > 0 and r["ours_backward_mem_MB"] > 0
        # every method's weight gradient agrees with the dense implicit reference to about the forward tolerance
        assert r["baseline_weight_rel_err"] < 1e-7 and r["baseline_bias_rel_err"] < 1e-7
    self_rows = [r for r in rows if r["baseline"] == "torchddn params"]
    assert all(r["ratio"] == 1.0 for r in self_rows)


def test_reference_gradient_matches_autograd_through_converged_picard():
    lin, x, target = deq._setup(3, 12, torch.device("cpu"), seed=3)
    ref_w, ref_b, steps = deq.reference_grads(lin, x, target)
    z = torch.zeros_like(x)
    for _ in range(400):  # far past convergence (contraction <= 0.9)
        z = torch.tanh(lin(z) + x)
    gw, gb = torch.autograd.grad(((z - target) ** 2).sum(), (lin.weight, lin.bias))
    assert torch.allclose(gw, ref_w, rtol=1e-10, atol=1e-12) and torch.allclose(gb, ref_b, rtol=1e-10, atol=1e-12)
    assert 5 < steps < 400


def test_backward_memory_sees_allocations():
    a = torch.randn(200, 200, dtype=torch.float64, requires_grad=True)
    loss = (a.exp() * 3).sum()
    assert deq.backward_memory(loss.backward, torch.device("cpu")) >= 200 * 200 * 8


def test_core_ill_conditioned_rows():
    rows = core.run(quick=True, sizes=(8,), ill_sizes=(8,))
    ill = [r for r in rows if r["benchmark"] == "generic backward A/sqrt(m) m=8"]
    assert len(ill) == 1 and ill[0]["size"] == 8 and ill[0]["baseline"] == "column-by-column dense (reference)"
    assert _finite(ill[0]["ratio"]) and ill[0]["max_grad_diff"] < 1e-9
    assert any(r["benchmark"] == "generic backward m=8" for r in rows)
