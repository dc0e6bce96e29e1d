"""A shared suite of batched test problems with closed-form (or scipy) reference solutions.

Each builder returns a :class:`Case` with the problem, a starting point and the reference ``y`` and ``nu``
(``nu`` in the ``grad f = J^T nu`` convention, inequality multipliers ``<= 0``; None where not known).
Batches deliberately mix active and inactive constraints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import scipy.optimize as so
import torch
from torch import Tensor

from torchddn.solvers.base import Problem


@dataclass
class Case:
    name: str
    problem: Problem
    y0: Tensor
    y: Tensor
    nu: Optional[Tensor]
    kind: str  # "unconstrained" | "equality" | "inequality"
    ref_atol: float = 0.0  # accuracy of the reference itself (scipy references are looser than closed forms)


def _points(b: int, m: int, dtype, seed: int, scale: float = 2.0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(b, m, generator=g, dtype=torch.float64)).to(dtype)


def quadratic(dtype=torch.float64, b: int = 4, m: int = 4, seed: int = 0) -> Case:
    """``min 1/2 y^T Q y - c^T y``: ``y = Q^{-1} c``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, m, m, generator=g, dtype=torch.float64)
    Q = (a @ a.mT + 0.5 * torch.eye(m, dtype=torch.float64)).to(dtype)
    c = _points(b, m, dtype, seed + 1)
    y = torch.linalg.solve(Q.double(), c.double().unsqueeze(-1)).squeeze(-1).to(dtype)
    obj = lambda u: 0.5 * torch.einsum("bi,bij,bj->b", u, Q, u) - (c * u).sum(1)  # noqa: E731
    return Case("quadratic", Problem(obj), torch.zeros(b, m, dtype=dtype), y, None, "unconstrained")


def logistic_ridge(dtype=torch.float64, b: int = 4, m: int = 3, seed: int = 1) -> Case:
    """A smooth non-quadratic objective (softplus + ridge + quartic); reference from scipy BFGS."""
    x = _points(b, m, dtype, seed)

    def obj(u: Tensor) -> Tensor:
        return torch.nn.functional.softplus(u - x).sum(1) + 0.5 * (u * u).sum(1) + 0.1 * (u ** 4).sum(1)

    ref = []
    for i in range(b):
        xi = x[i].double().numpy()
        f = lambda u: (np.logaddexp(0, u - xi).sum() + 0.5 * (u * u).sum() + 0.1 * (u ** 4).sum())  # noqa: E731
        gr = lambda u: 1 / (1 + np.exp(-(u - xi))) + u + 0.4 * u ** 3  # noqa: E731
        ref.append(so.minimize(f, np.zeros(m), jac=gr, method="BFGS", options={"gtol": 1e-12}).x)
    y = torch.tensor(np.array(ref), dtype=dtype)
    return Case("logistic_ridge", Problem(obj), torch.zeros(b, m, dtype=dtype), y, None, "unconstrained",
                ref_atol=1e-7)


def sphere(dtype=torch.float64, b: int = 5, m: int = 4, seed: int = 2) -> Case:
    """Projection onto the unit sphere: ``y = x / |x|``, ``nu = 1 - |x|``."""
    x = _points(b, m, dtype, seed)
    n = x.norm(dim=1, keepdim=True)
    prob = Problem(lambda u: ((u - x) ** 2).sum(1), eq=lambda u: (u * u).sum(1, keepdim=True) - 1)
    return Case("sphere", prob, torch.ones(b, m, dtype=dtype), x / n, 1 - n, "equality")


def ball(dtype=torch.float64, b: int = 6, m: int = 3, seed: int = 3, radius: float = 2.0) -> Case:
    """Projection onto the ball ``|y| <= r``: ``y = x min(1, r/|x|)``, ``nu = min(0, 1 - |x|/r)``; points inside
    and outside the ball in one batch."""
    x = _points(b, m, dtype, seed)
    x[0] *= 0.1  # certainly inside
    x[1] = 5 * x[1] / x[1].norm()  # certainly outside
    n = x.norm(dim=1, keepdim=True)
    y = x * (radius / n).clamp(max=1)
    nu = (1 - n / radius).clamp(max=0)
    prob = Problem(lambda u: ((u - x) ** 2).sum(1), ineq=lambda u: (u * u).sum(1, keepdim=True) - radius ** 2)
    return Case("ball", prob, torch.zeros(b, m, dtype=dtype), y, nu, "inequality")


def simplex(dtype=torch.float64, b: int = 5, m: int = 4, seed: int = 4) -> Case:
    """Projection onto the probability simplex (equality and inequality constraints); reference by the
    threshold ``theta`` found by bisection-free enumeration in numpy, multipliers from the KKT conditions."""
    x = _points(b, m, dtype, seed, scale=1.0)
    ys, nus = [], []
    for i in range(b):
        v = x[i].double().numpy()
        best = None
        for k in range(1, m + 1):  # support of size k made of the k largest entries
            idx = np.argsort(-v)[:k]
            theta = (v[idx].sum() - 1) / k
            cand = np.maximum(v - theta, 0)
            if abs(cand.sum() - 1) < 1e-12 and np.all(v[idx] - theta > 0):
                best = (cand, theta)
        cand, theta = best
        nu_h = -2 * theta
        nu_g = np.where(cand > 0, 0.0, 2 * (v - theta))
        ys.append(cand)
        nus.append(np.concatenate([[nu_h], nu_g]))
    prob = Problem(lambda u: ((u - x) ** 2).sum(1), eq=lambda u: u.sum(1, keepdim=True) - 1, ineq=lambda u: -u)
    return Case("simplex", prob, torch.zeros(b, m, dtype=dtype), torch.tensor(np.array(ys), dtype=dtype),
                torch.tensor(np.array(nus), dtype=dtype), "inequality")


def box(dtype=torch.float64, b: int = 4, m: int = 4, seed: int = 5, lo: float = -0.5, hi: float = 0.5) -> Case:
    """Projection onto a box written as ``[y - hi; lo - y] <= 0``: ``y = clamp(x)``; multipliers
    ``2 min(hi - x, 0)`` (upper) and ``2 min(x - lo, 0)`` (lower)."""
    x = _points(b, m, dtype, seed, scale=1.0)
    y = x.clamp(lo, hi)
    nu = torch.cat([2 * (hi - x).clamp(max=0), 2 * (x - lo).clamp(max=0)], dim=1)
    prob = Problem(lambda u: ((u - x) ** 2).sum(1), ineq=lambda u: torch.cat([u - hi, lo - u], dim=1))
    return Case("box", prob, torch.zeros(b, m, dtype=dtype), y, nu, "inequality")


def _scipy_ref(fun: Callable, cons: list, y0: np.ndarray) -> np.ndarray:
    res = so.minimize(fun, y0, method="SLSQP", constraints=cons, options={"ftol": 1e-15, "maxiter": 500})
    return res.x


def qp_mixed(dtype=torch.float64, b: int = 4, m: int = 4, seed: int = 6) -> Case:
    """Convex QP with one linear equality and box-type inequalities; reference from scipy SLSQP."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(b, m, m, generator=g, dtype=torch.float64)
    Q = a @ a.mT + torch.eye(m, dtype=torch.float64)
    c = 3 * torch.randn(b, m, generator=g, dtype=torch.float64)
    A = torch.randn(b, 1, m, generator=g, dtype=torch.float64)
    ys = []
    for i in range(b):
        Qi, ci, Ai = Q[i].numpy(), c[i].numpy(), A[i].numpy()
        cons = [{"type": "eq", "fun": lambda u, Ai=Ai: Ai @ u - 0.5, "jac": lambda u, Ai=Ai: Ai},
                {"type": "ineq", "fun": lambda u: 1 - u, "jac": lambda u: -np.eye(m)},
                {"type": "ineq", "fun": lambda u: u + 1, "jac": lambda u: np.eye(m)}]
        ys.append(_scipy_ref(lambda u, Qi=Qi, ci=ci: 0.5 * u @ Qi @ u - ci @ u, cons, np.zeros(m)))
    Qd, cd, Ad = Q.to(dtype), c.to(dtype), A.to(dtype)
    prob = Problem(lambda u: 0.5 * torch.einsum("bi,bij,bj->b", u, Qd, u) - (cd * u).sum(1),
                   eq=lambda u: torch.einsum("bpm,bm->bp", Ad, u) - 0.5,
                   ineq=lambda u: torch.cat([u - 1, -1 - u], dim=1))
    return Case("qp_mixed", prob, torch.zeros(b, m, dtype=dtype), torch.tensor(np.array(ys), dtype=dtype),
                None, "inequality", ref_atol=1e-6)


def nonconvex(dtype=torch.float64, b: int = 4, m: int = 3, seed: int = 7) -> Case:
    """Nonconvex objective ``|y - x|^2 + sum cos(3 y)`` with a nonlinear (disc) and a linear inequality.

    There are local minima, so the reference ``y`` is None: tests check the KKT conditions and that scipy
    SLSQP started at the returned point stays there (it is a local minimum, not a saddle)."""
    x = _points(b, m, dtype, seed)
    prob = Problem(lambda u: ((u - x) ** 2).sum(1) + torch.cos(3 * u).sum(1),
                   ineq=lambda u: torch.stack([(u * u).sum(1) - 1, u[:, 0] + u[:, 1] - 0.5], dim=1))
    return Case("nonconvex", prob, torch.zeros(b, m, dtype=dtype), None, None, "inequality")


def scipy_polish_check(case: Case, y: Tensor) -> float:
    """Max distance SLSQP moves when started at ``y`` (small when ``y`` is a local minimum)."""
    x_fun = case.problem
    worst = 0.0
    b, m = y.shape
    for i in range(b):
        def fun(u, i=i):
            yb = y.detach().double().clone()
            yb[i] = torch.from_numpy(u)
            return float(x_fun.objective(yb.to(y.dtype)).double()[i])

        def gfun(u, i=i):
            yb = y.detach().double().clone()
            yb[i] = torch.from_numpy(u)
            return (-x_fun.ineq(yb.to(y.dtype)).double()[i]).numpy()

        res = so.minimize(fun, y[i].double().numpy(), method="SLSQP",
                          constraints=[{"type": "ineq", "fun": gfun}], options={"ftol": 1e-14})
        worst = max(worst, float(np.abs(res.x - y[i].double().numpy()).max()))
    return worst


UNCONSTRAINED = [quadratic, logistic_ridge]
EQUALITY = [sphere]
INEQUALITY = [ball, simplex, box, qp_mixed]
