"""The curve-fitting benchmark runs at a tiny size, its reference gradient is exact, and jaxopt is optional."""
from __future__ import annotations

import torch

from torchddn.bench import curve_fit


def test_reference_gradient_matches_finite_differences():
    t, obs, _, v = curve_fit.make_problem(b=2, n=6)
    y = curve_fit.handwritten_gauss_newton(obs, t)
    g = curve_fit.reference_gradient(obs, t, y, v)
    fd = torch.zeros_like(obs)
    h = 1e-6
    for i in range(2):
        for j in range(6):
            e = torch.zeros_like(obs)
            e[i, j] = h
            yp = curve_fit.handwritten_gauss_newton(obs + e, t, tol=1e-15)
            ym = curve_fit.handwritten_gauss_newton(obs - e, t, tol=1e-15)
            fd[i, j] = ((yp - ym) * v).sum() / (2 * h)
    torch.testing.assert_close(g, fd, atol=1e-7, rtol=1e-6)


def test_run_tiny():
    rows = curve_fit.run(quick=True, b=4, n=20)
    timed = [r for r in rows if not r.get("skipped")]
    assert len(timed) >= 2 and all(r["ratio"] > 0 for r in timed)
    assert timed[0]["grad_err"] < 1e-6           # exact backward
    assert timed[1]["grad_err"] > 1e-4           # the Gauss-Newton approximation is not exact with noise
    assert timed[0]["baseline_grad_err"] < 1e-8  # the hand-written backward
