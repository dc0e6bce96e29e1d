"""Tests of the PnP node: exact recovery, RANSAC with outliers, gradcheck, finite differences of re-solves, the
generic core node, bad inputs and the weight-learning example."""
from __future__ import annotations

import math

import pytest
import torch

from torchddn.diagnostics import DDNError
from torchddn.nodes.pnp import PnP, learn_weights_example, pnp, pose_error, rodrigues, synthetic_scene

D = torch.float64


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_exact_recovery_with_and_without_intrinsics():
    X, x, R, t, _ = synthetic_scene(3, 12, seed=1)
    Rh, th = pnp(X, x, generator=gen())
    assert pose_error(Rh, th, R, t).max() < 1e-8
    K = torch.tensor([[500.0, 0, 320], [0, 480.0, 240], [0, 0, 1]], dtype=D)
    pix = x @ K[:2, :2].T + K[:2, 2]
    Rk, tk = pnp(X, pix, K=K, generator=gen())
    assert pose_error(Rk, tk, R, t).max() < 1e-8
    assert torch.allclose(rodrigues(torch.zeros(3, dtype=D)), torch.eye(3, dtype=D))


def test_ransac_rejects_outliers_given_weights_and_module():
    X, x, R, t, outlier = synthetic_scene(4, 30, outlier_fraction=0.3, noise=1e-4, seed=2)
    layer = PnP(seed=0)
    Rh, th = layer(X, x, (~outlier).to(D))
    assert pose_error(Rh, th, R, t).max() < 1e-2
    assert layer.diagnostics.converged.all()
    # Unweighted least squares is pulled away by the outliers.
    Ru, tu = pnp(X, x, generator=gen())
    assert pose_error(Ru, tu, R, t).mean() > 5 * pose_error(Rh, th, R, t).mean()


def test_gradcheck():
    X, x, _, _, _ = synthetic_scene(2, 7, noise=2e-2, seed=3)
    w = torch.rand(2, 7, generator=gen(1), dtype=D) + 0.5
    args = tuple(a.clone().requires_grad_() for a in (X, x, w))
    fn = lambda X, x, w: pnp(X, x, w, generator=gen(), return_axis_angle=True, tol=1e-13, hypotheses=8)
    assert torch.autograd.gradcheck(fn, args, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.slow
def test_gradient_matches_resolves_and_is_not_gauss_newton():
    # Large residuals (noise) make the exact Hessian differ from the Gauss-Newton one.
    X, x, _, _, _ = synthetic_scene(1, 8, noise=2e-2, seed=4)
    w = torch.rand(1, 8, generator=gen(2), dtype=D) + 0.5
    c = torch.randn(6, generator=gen(3), dtype=D)
    wr = w.clone().requires_grad_()
    (pnp(X, x, wr, generator=gen(), return_axis_angle=True, hypotheses=8) @ c).sum().backward()
    eps = 1e-6
    fd = torch.zeros_like(w)
    for j in range(0, 8, 2):
        e = torch.zeros_like(w)
        e[0, j] = eps
        up = pnp(X, x, w + e, generator=gen(), return_axis_angle=True, tol=1e-13, hypotheses=8) @ c
        dn = pnp(X, x, w - e, generator=gen(), return_axis_angle=True, tol=1e-13, hypotheses=8) @ c
        fd[0, j] = (up - dn).sum() / (2 * eps)
    assert torch.allclose(wr.grad[:, ::2], fd[:, ::2], atol=1e-6)
    # The Gauss-Newton Hessian J^T W J would give a different (wrong) gradient at these residuals.
    from torchddn.nodes.pnp import _hess_b, _weighted_residual
    theta = pnp(X, x, w, generator=gen(), return_axis_angle=True, hypotheses=8)
    J = torch.func.vmap(torch.func.jacrev(_weighted_residual))(theta, X, x, w)
    H, Hgn = _hess_b(theta, X, x, w), J.mT @ J
    assert (H - Hgn).abs().max() > 1e-3 * H.abs().max()


def test_matches_generic_core_node():
    ddn = pytest.importorskip("torchddn")
    if not hasattr(ddn, "DeclarativeNode"):
        pytest.skip("core nodes unavailable")
    from torchddn.nodes.pnp import _objective

    class PnPNode(ddn.DeclarativeNode):
        def initial_guess(self, X, x, w):
            return X.new_zeros(X.shape[0], 6)

        def objective(self, X, x, w, y):
            return torch.func.vmap(_objective)(y, X, x, w)

        def solve(self, X, x, w):
            return pnp(X.detach(), x.detach(), w.detach(), generator=gen(), return_axis_angle=True), None

    X, x, _, _, _ = synthetic_scene(2, 8, noise=1e-2, seed=5)
    w = torch.rand(2, 8, generator=gen(4), dtype=D) + 0.5
    c = torch.randn(2, 6, generator=gen(5), dtype=D)
    a = [t.clone().requires_grad_() for t in (X, x, w)]
    b = [t.clone().requires_grad_() for t in (X, x, w)]
    (pnp(*a, generator=gen(), return_axis_angle=True) * c).sum().backward()
    (ddn.DeclarativeLayer(PnPNode())(*b) * c).sum().backward()
    for u, v in zip(a, b):
        assert torch.allclose(u.grad, v.grad, atol=1e-7)


def test_bad_inputs():
    X, x, _, _, _ = synthetic_scene(2, 8, seed=6)
    with pytest.raises(DDNError, match="x must have shape"):
        pnp(X, x[:, :7])
    with pytest.raises(DDNError, match="at least 6"):
        pnp(X[:, :5], x[:, :5])
    bad = x.clone()
    bad[1, 2, 0] = math.nan
    with pytest.raises(DDNError, match=r"x contains NaN or Inf at batch elements \[1\]"):
        pnp(X, bad)
    w = torch.ones(2, 8, dtype=D)
    w[0, 0] = -1
    with pytest.raises(DDNError, match=r"negative at batch elements \[0\]"):
        pnp(X, x, w)
    w = torch.ones(2, 8, dtype=D)
    w[1, :3] = 0
    with pytest.raises(DDNError, match=r"fewer than 6 points with positive weight at batch elements \[1\]"):
        pnp(X, x, w)


def test_learn_weights_example():
    res = learn_weights_example(B=3, N=20, steps=4, seed=0)
    assert res["final_error"] < 0.5 * res["initial_error"]
    assert res["history"][-1] < res["history"][0]
    # Outliers end up with lower weights than inliers on average.
    w, out = res["weights"], res["outlier"]
    assert w[out].mean() < w[~out].mean()
