"""The demo's pseudo-Huber DeclarativeNode (gradients checked against autograd.gradcheck, the closed form and scipy)
and the small helpers of the apps."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from torchddn.apps.demo import descend, make_average, make_points, make_pseudo_huber_node, pseudo_huber_gradient
from torchddn.apps.ensemble import corrupt
from torchddn.apps.image import default_radius, expected_calibration_error, occlude

ddn = pytest.importorskip("torchddn")


def _layer(alpha=1.0):
    return ddn.DeclarativeLayer(make_pseudo_huber_node(alpha))


def test_pseudo_huber_node_forward_matches_scipy():
    from scipy.optimize import minimize_scalar

    x, _ = make_points(3, 9, 2, seed=1)
    y = _layer(0.7)(x).reshape(3)
    for i in range(3):
        xi = x[i].numpy()
        f = lambda u: np.sum(0.49 * (np.sqrt(1 + ((u - xi) / 0.7) ** 2) - 1))  # noqa: E731
        ref = minimize_scalar(f, bracket=(xi.min(), xi.max()), tol=1e-12).x
        assert abs(float(y[i]) - ref) < 1e-6


def test_pseudo_huber_node_gradcheck_and_closed_form():
    x, _ = make_points(2, 6, 1, seed=2)
    x = x.requires_grad_(True)
    layer = _layer(1.0)
    assert torch.autograd.gradcheck(lambda t: layer(t), (x,), atol=1e-6, rtol=1e-5)
    y = layer(x)
    jac = torch.stack([torch.autograd.grad(y[i].sum(), x, retain_graph=True)[0][i] for i in range(2)])
    closed = pseudo_huber_gradient(x.detach(), y.detach().reshape(2, 1), 1.0)
    assert torch.allclose(jac, closed, atol=1e-8)
    assert torch.allclose(jac.sum(dim=1), torch.ones(2, dtype=x.dtype), atol=1e-10)  # translation equivariance


def test_descent_mean_vs_robust():
    x0, mask = make_points(2, 12, 3, seed=0)
    mean = descend(x0, make_average("mean"), lr=6.0, iters=100, tol=1e-4)
    robust = descend(x0, make_average("pseudo_huber_node"), lr=6.0, iters=100, tol=1e-4)
    for res in (mean, robust):
        assert bool((res["final_abs_y"] < 1e-4).all()) and res["iterations"] < 100
    moved_mean = (mean["x"] - x0).abs()
    moved_rob = (robust["x"] - x0).abs()
    # the mean moves every point by the same amount; the robust average leaves the outliers nearly in place
    assert torch.allclose(moved_mean, moved_mean[:, :1].expand_as(moved_mean), atol=1e-9)
    assert moved_rob[mask].max() < 0.05 * moved_mean[mask].min()
    assert moved_rob[~mask].mean() > moved_rob[mask].mean() * 10


def test_corrupt_replaces_exact_count():
    g = torch.Generator().manual_seed(0)
    x = torch.zeros(4, 30)
    out = corrupt(x, 0.2, 10.0, g)
    assert ((out != 0).sum(dim=1) == 6).all()
    assert torch.equal(corrupt(x, 0.0, 10.0, g), x)


def test_expected_calibration_error_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    ece, table = expected_calibration_error(probs, labels, bins=10)
    # bins: 0.9 -> [0.9,1] acc 1; 0.8 -> [0.8,0.9) acc 0; 0.7 -> acc 1; 0.6 -> acc 0
    expected = 0.25 * (abs(1 - 0.9) + abs(0 - 0.8) + abs(1 - 0.7) + abs(0 - 0.6))
    assert ece == pytest.approx(expected)
    assert sum(t["count"] for t in table) == 4


def test_occlude_zeroes_one_square_per_image():
    x = torch.ones(5, 1, 9, 9)
    out = occlude(x, torch.Generator().manual_seed(0))
    assert ((out == 0).sum(dim=(1, 2, 3)) == 9).all()  # a 3x3 hole in each


def test_default_radius_orders():
    assert default_radius("linf_ball", 64) < default_radius("l2_sphere", 64) < default_radius("l1_ball", 64)


def test_generic_node_matches_robust_pool_pseudo_huber():
    from torchddn.nodes import RobustPool

    x, _ = make_points(3, 10, 3, seed=5)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    y1 = _layer(0.5)(x1).reshape(3)
    y2 = RobustPool("pseudo_huber", alpha=0.5, dim=-1)(x2)
    assert torch.allclose(y1, y2, atol=1e-9)
    w = torch.tensor([1.0, -2.0, 0.5], dtype=x.dtype)
    (g1,) = torch.autograd.grad((y1 * w).sum(), x1)
    (g2,) = torch.autograd.grad((y2 * w).sum(), x2)
    assert torch.allclose(g1, g2, atol=1e-9)
