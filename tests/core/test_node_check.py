"""The node-level first-order check after any solver is scale free: a wrong answer warns at every data scale,
a right one never does."""
from __future__ import annotations

import warnings

import pytest
import torch

import torchddn as ddn

DT = torch.float64


class RobustAverage(ddn.DeclarativeNode):
    def initial_guess(self, x):
        return x.mean(-1, keepdim=True)

    def objective(self, x, y):
        return (torch.sqrt(1 + (y - x) ** 2) - 1).sum(-1)


class ReturnsMean(RobustAverage):
    """A user solve that is wrong at every scale: half a standard deviation above the mean (pseudo-Huber is
    quadratic at small scales, where the mean is its minimiser, and L1-like at large ones)."""

    def solve(self, x):
        return x.mean(-1, keepdim=True) + 0.5 * x.std(-1, keepdim=True), None


def data(scale):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 101, generator=g, dtype=DT)  # odd: at large scales the minimiser is near a unique median
    x[:, :20] += 10
    return scale * x


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1.0, 1e4, 1e8])
def test_wrong_user_solution_warns_at_every_scale(scale):
    with pytest.warns(ddn.ConvergenceWarning, match="first-order"):
        ddn.DeclarativeLayer(ReturnsMean())(data(scale))


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1.0, 1e4, 1e8])
def test_right_solution_is_quiet_and_matches_reference(scale):
    import scipy.optimize
    x = data(scale)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ddn.ConvergenceWarning)
        y = ddn.DeclarativeLayer(RobustAverage())(x)
    for i in range(x.shape[0]):
        xi = x[i].numpy()
        # the root of the (monotone) derivative, by bisection-type brentq to full precision
        ref = scipy.optimize.brentq(lambda u: ((u - xi) / (1 + (u - xi) ** 2) ** 0.5).sum(), xi.min(), xi.max(),
                                    xtol=1e-300, rtol=1e-15)
        assert abs(float(y[i]) - ref) <= 1e-6 * max(abs(ref), scale)
