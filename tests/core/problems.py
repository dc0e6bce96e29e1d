"""Declarative nodes with closed-form solutions, shared by the core tests."""
import torch

import torchddn as ddn


class InputHessianQuadratic(ddn.DeclarativeNode):
    """min_y 1/2 y^T diag(exp(a)) y - c^T y  ->  y = c / exp(a) (the Hessian depends on the input a)."""

    def objective(self, a, c, y):
        return 0.5 * (torch.exp(a) * y * y).sum(-1) - (c * y).sum(-1)

    def initial_guess(self, a, c):
        return torch.zeros_like(c)

    def solve(self, a, c):
        return c / torch.exp(a), None


def input_hessian_quadratic(a, c):
    return c / torch.exp(a)


class RobustAverage(ddn.DeclarativeNode):
    """Pseudo-Huber average with the built-in solver (no solve())."""

    def initial_guess(self, x):
        return x.mean(-1, keepdim=True)

    def objective(self, x, y):
        return (torch.sqrt(1 + (y - x) ** 2) - 1).sum(-1)


class LinearOnCircle(ddn.EqConstDeclarativeNode):
    """min_y x^T y s.t. ||y||^2 = 1  ->  y = -x / ||x||."""

    def objective(self, x, y):
        return (x * y).sum(-1)

    def equality_constraints(self, x, y):
        return (y ** 2).sum(-1) - 1

    def solve(self, x):
        return -x / x.norm(dim=-1, keepdim=True), None


def linear_on_circle(x):
    return -x / x.norm(dim=-1, keepdim=True)


class QuadraticOnSphere(ddn.EqConstDeclarativeNode):
    """min_y 1/2 ||y - x||^2 s.t. ||y||^2 = r^2  ->  y = r x / ||x|| (r is an input)."""

    def objective(self, x, r, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, r, y):
        return (y ** 2).sum(-1) - r.squeeze(-1) ** 2

    def initial_guess(self, x, r):
        return x.clone()

    def solve(self, x, r):
        return r * x / x.norm(dim=-1, keepdim=True), None


def quadratic_on_sphere(x, r):
    return r * x / x.norm(dim=-1, keepdim=True)


class BallProjection(ddn.IneqConstDeclarativeNode):
    """min_y 1/2 ||y - x||^2 s.t. ||y||^2 <= 1."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return (y ** 2).sum(-1) - 1

    def solve(self, x):
        n = x.norm(dim=-1, keepdim=True)
        return torch.where(n > 1, x / n, x), None


def ball_projection(x):
    n = x.norm(dim=-1, keepdim=True)
    return torch.where(n > 1, x / n, x)


class BoxProjection(ddn.IneqConstDeclarativeNode):
    """min_y 1/2 ||y - x||^2 s.t. lo <= y <= hi (elementwise), lo/hi inputs."""

    def objective(self, x, lo, hi, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, lo, hi, y):
        return torch.cat([y - hi, lo - y], -1)

    def solve(self, x, lo, hi):
        return torch.minimum(torch.maximum(x, lo), hi), None


def box_projection(x, lo, hi):
    return torch.minimum(torch.maximum(x, lo), hi)


class WeightedHyperplane(ddn.LinEqConstDeclarativeNode):
    """min_y 1/2 sum w (y - x)^2 s.t. 1^T y = 1."""

    def objective(self, x, w, y):
        return 0.5 * (w * (y - x) ** 2).sum(-1)

    def linear_constraint_parameters(self, y):
        m = y.shape[-1]
        return torch.ones(1, m, dtype=y.dtype, device=y.device), torch.ones(1, dtype=y.dtype, device=y.device)

    def solve(self, x, w):
        winv = 1 / w
        lam = (x.sum(-1, keepdim=True) - 1) / winv.sum(-1, keepdim=True)
        return x - winv * lam, None


def weighted_hyperplane(x, w):
    winv = 1 / w
    lam = (x.sum(-1, keepdim=True) - 1) / winv.sum(-1, keepdim=True)
    return x - winv * lam
