"""Perspective-n-point: camera pose from 2D-3D correspondences as a differentiable layer.

.. math::

    (r^\\star, t^\\star) = \\arg\\min_{r, t}\\; \\tfrac12 \\sum_i w_i \\,\\| \\pi(R(r) X_i + t) - x_i \\|^2,
    \\qquad \\pi(u) = (u_1 / u_3, u_2 / u_3),

with ``R(r)`` the rotation of axis-angle vector ``r`` and ``x_i`` normalised image coordinates (``K^{-1}``
applied). Forward: batched RANSAC (six-point DLT hypotheses scored by weighted inlier counts, vectorised over
hypotheses and batch) followed by Levenberg-Marquardt (:func:`torchddn.solvers.least_squares.levenberg_marquardt`)
on the weighted reprojection residuals and a final Newton polish
with the exact Hessian. Backward: implicit differentiation of the optimality condition with the exact 6x6 Hessian
(from ``torch.func``, not Gauss-Newton) w.r.t. the 3D points, the 2D points and the weights.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, vmap

from torchddn.nodes._callable import make_callable
from torchddn.diagnostics import (
    ConvergenceWarning,
    DDNError,
    Diagnostics,
    NonRegularWarning,
    element_list,
    report,
)
from torchddn.solvers.base import Problem
from torchddn.solvers.least_squares import levenberg_marquardt

__all__ = ["pnp", "PnP", "rodrigues", "synthetic_scene", "pose_error", "learn_weights_example"]


def rodrigues(r: Tensor) -> Tensor:
    """Rotation matrices ``(..., 3, 3)`` from axis-angle vectors ``(..., 3)`` (smooth at ``r = 0``)."""
    theta2 = (r * r).sum(-1, keepdim=True)
    small = theta2 < 1e-8
    t2 = torch.where(small, torch.ones_like(theta2), theta2)
    theta = t2.sqrt()
    a = torch.where(small, 1 - theta2 / 6 + theta2 * theta2 / 120, torch.sin(theta) / theta)
    b = torch.where(small, 0.5 - theta2 / 24 + theta2 * theta2 / 720, (1 - torch.cos(theta)) / t2)
    zero = torch.zeros_like(r[..., 0])
    K = torch.stack([zero, -r[..., 2], r[..., 1], r[..., 2], zero, -r[..., 0], -r[..., 1], r[..., 0], zero],
                    -1).reshape(*r.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=r.dtype, device=r.device)
    return eye + a.unsqueeze(-1) * K + b.unsqueeze(-1) * (K @ K)


def _residual(theta: Tensor, X: Tensor, x: Tensor) -> Tensor:
    """Reprojection residuals (N, 2) of one element: pose theta (6,), X (N, 3), x (N, 2)."""
    R = rodrigues(theta[:3])
    u = X @ R.T + theta[3:]
    return u[:, :2] / u[:, 2:3] - x


def _objective(theta: Tensor, X: Tensor, x: Tensor, w: Tensor) -> Tensor:
    r = _residual(theta, X, x)
    return 0.5 * (w * (r * r).sum(-1)).sum()


def _weighted_residual(theta: Tensor, X: Tensor, x: Tensor, w: Tensor) -> Tensor:
    return (_residual(theta, X, x) * w.clamp_min(0).sqrt().unsqueeze(-1)).reshape(-1)


_obj_b = vmap(_objective)
_grad_b = vmap(grad(_objective))
_hess_b = vmap(hessian(_objective))
_wres_b = vmap(_weighted_residual)


def _rotation_to_axis_angle(R: Tensor) -> Tensor:
    """Axis-angle vectors (..., 3) of rotations (..., 3, 3) (angles below pi)."""
    cos = ((R.diagonal(dim1=-2, dim2=-1).sum(-1) - 1) / 2).clamp(-1 + 1e-7, 1 - 1e-7)
    angle = torch.acos(cos)
    v = torch.stack([R[..., 2, 1] - R[..., 1, 2], R[..., 0, 2] - R[..., 2, 0], R[..., 1, 0] - R[..., 0, 1]], -1)
    scale = torch.where(angle < 1e-6, torch.full_like(angle, 0.5), angle / (2 * torch.sin(angle)))
    return v * scale.unsqueeze(-1)


def _dlt(X: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """Weighted DLT pose hypotheses. X (..., N, 3), x (..., N, 2), w (..., N) -> theta (..., 6)."""
    ones = torch.ones_like(X[..., :1])
    Xh = torch.cat([X, ones], -1)  # (..., N, 4)
    zero = torch.zeros_like(Xh)
    r1 = torch.cat([Xh, zero, -x[..., :1] * Xh], -1)
    r2 = torch.cat([zero, Xh, -x[..., 1:2] * Xh], -1)
    sw = w.clamp_min(0).sqrt().unsqueeze(-1)
    M = torch.cat([r1 * sw, r2 * sw], -2)  # (..., 2N, 12)
    _, vecs = torch.linalg.eigh(M.transpose(-1, -2) @ M)
    P = vecs[..., :, 0].reshape(*X.shape[:-2], 3, 4)
    # P is defined up to sign: choose the one putting the (weighted) points in front of the camera.
    depth = (Xh * P[..., 2, :].unsqueeze(-2)).sum(-1)
    front = torch.where((w * torch.sign(depth)).sum(-1) < 0, -1.0, 1.0).to(X.dtype)
    P = P * front[..., None, None]
    A, p4 = P[..., :3], P[..., 3]
    U, S, Vh = torch.linalg.svd(A)
    sign = torch.sign(torch.linalg.det(U @ Vh))
    R = U @ torch.diag_embed(torch.stack([torch.ones_like(sign), torch.ones_like(sign), sign], -1)) @ Vh
    t = p4 / S.mean(-1).unsqueeze(-1)
    return torch.cat([_rotation_to_axis_angle(R), t], -1)


def _ransac(X: Tensor, x: Tensor, w: Tensor, hypotheses: int, threshold: float,
            generator: Optional[torch.Generator]) -> Tensor:
    B, N, _ = X.shape
    k = 6
    if N < k:
        raise DDNError(f"pnp: at least {k} correspondences are needed, got {N}")
    keys = torch.rand(B, hypotheses, N, generator=generator, dtype=X.dtype).to(X.device)
    keys = keys.masked_fill((w <= 0).unsqueeze(1), 2.0)  # never sample zero-weight points
    idx = keys.argsort(-1)[..., :k]  # (B, H, k) without replacement
    Xs = torch.gather(X.unsqueeze(1).expand(B, hypotheses, N, 3), 2, idx.unsqueeze(-1).expand(B, hypotheses, k, 3))
    xs = torch.gather(x.unsqueeze(1).expand(B, hypotheses, N, 2), 2, idx.unsqueeze(-1).expand(B, hypotheses, k, 2))
    hyp = _dlt(Xs, xs, torch.ones_like(xs[..., 0]))  # (B, H, 6)
    hyp = torch.cat([_dlt(X, x, w).unsqueeze(1), hyp], 1)  # hypothesis 0: weighted DLT on all points
    R = rodrigues(hyp[..., :3])
    u = X.unsqueeze(1) @ R.transpose(-1, -2) + hyp[..., None, 3:]
    err = (u[..., :2] / u[..., 2:3] - x.unsqueeze(1)).norm(dim=-1)
    inlier = (err < threshold) & (u[..., 2] > 0) & torch.isfinite(err)
    score = (inlier * w.unsqueeze(1)).sum(-1)
    score = torch.where(torch.isfinite(hyp).all(-1), score, torch.full_like(score, -1.0))
    best = score.argmax(-1)
    return hyp[torch.arange(B, device=X.device), best]


def _levenberg_marquardt(theta, X, x, w, max_iter, tol):
    """Refine the poses with the batched Levenberg-Marquardt solver on the weighted reprojection residuals."""
    problem = Problem(objective=lambda th: _obj_b(th, X, x, w), residuals=lambda th: _wres_b(th, X, x, w))
    return levenberg_marquardt(problem, theta, tol=tol, max_iter=max_iter).y


def _newton_polish(theta, X, x, w, steps: int):
    """A few Newton steps with the exact Hessian (positive definite there), kept only where they lower the
    objective or, once the objective stops resolving changes, the gradient norm."""
    g = _grad_b(theta, X, x, w)
    f = _obj_b(theta, X, x, w)
    for _ in range(steps):
        H = _hess_b(theta, X, x, w)
        L, info = torch.linalg.cholesky_ex(H)
        step = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
        new = theta + step
        g_new, f_new = _grad_b(new, X, x, w), _obj_b(new, X, x, w)
        better = (f_new < f) | ((f_new <= f * (1 + 1e-12) + 1e-300) & (g_new.norm(dim=-1) < g.norm(dim=-1)))
        ok = (info == 0) & torch.isfinite(step).all(-1) & torch.isfinite(f_new) & better
        theta = torch.where(ok[:, None], new, theta)
        g = torch.where(ok[:, None], g_new, g)
        f = torch.where(ok, f_new, f)
    return theta


class _PnPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, X, x, w, opts):
        hypotheses, threshold, max_iter, tol, generator, on_failure, diag = opts
        with torch.no_grad():
            theta = _ransac(X, x, w, hypotheses, threshold, generator)
            theta = _levenberg_marquardt(theta, X, x, w, max_iter, tol)
            theta = _newton_polish(theta, X, x, w, 3)
            g = _grad_b(theta, X, x, w)
            H = _hess_b(theta, X, x, w)
            cost = _obj_b(theta, X, x, w)
            res = g.abs().amax(-1)
            conv = res <= 1e3 * tol * (1 + cost)
            if bool((~conv).any()):
                report(on_failure, f"pnp: the pose did not converge at batch elements {element_list(~conv)} "
                       f"(gradient {float(res.max()):.3g})", ConvergenceWarning, stacklevel=5)
            if diag is not None:
                diag.residual = res
                diag.converged = conv
                diag.constraint_violation = torch.zeros_like(res)
        ctx.save_for_backward(theta, X, x, w, H)
        return theta

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gtheta):
        theta, X, x, w, H = ctx.saved_tensors
        # v = H^{-1} g (exact Hessian); dL/dz = -d/dz <grad_theta f(theta, z), v>.
        evals, evecs = torch.linalg.eigh(H)
        scale = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(H.dtype).tiny)
        bad = evals <= 1e3 * torch.finfo(H.dtype).eps * scale
        if bool(bad.any()):
            warnings.warn(f"pnp: the reprojection error's Hessian is singular or indefinite at batch elements "
                          f"{element_list(bad.any(-1))}; returning the minimum-norm gradient", NonRegularWarning,
                          stacklevel=2)
        inv = torch.where(bad, torch.zeros_like(evals), 1.0 / torch.where(bad, torch.ones_like(evals), evals))
        v = (evecs @ (inv * (evecs.transpose(-1, -2) @ gtheta.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)).squeeze(-1)

        def inner(X, x, w):
            return (_grad_b(theta, X, x, w) * v).sum()

        gX, gx, gw = torch.func.grad(inner, argnums=(0, 1, 2))(X, x, w)
        return -gX, -gx, -gw, None


def pnp(X: Tensor, x: Tensor, w: Optional[Tensor] = None, K: Optional[Tensor] = None, *, hypotheses: int = 128,
        threshold: float = 1e-2, max_iter: int = 100, tol: Optional[float] = None,
        generator: Optional[torch.Generator] = None, return_axis_angle: bool = False, on_failure: str = "warn",
        diagnostics: Optional[Diagnostics] = None):
    r"""Camera pose from 2D-3D correspondences by weighted reprojection-error minimisation.

    .. math::

        (R, t) = \arg\min_{r, t} \tfrac12 \sum_i w_i \| \pi(R(r) X_i + t) - x_i \|^2

    Args:
        X: ``(B, N, 3)`` or ``(N, 3)`` 3D points (world frame), ``N >= 6``.
        x: ``(B, N, 2)`` or ``(N, 2)`` image points: normalised coordinates, or pixels when ``K`` is given.
        w: ``(B, N)`` or ``(N,)`` non-negative weights (default ones).
        K: optional ``(3, 3)`` or ``(B, 3, 3)`` intrinsics; ``x`` is then mapped through ``K^{-1}``.
        hypotheses: RANSAC hypotheses per element (six-point DLTs; one more is the weighted DLT on all points).
        threshold: RANSAC inlier threshold on the reprojection error, in normalised coordinates.
        max_iter: Levenberg-Marquardt iterations.
        tol: gradient tolerance (default ``1e-10`` float64, ``1e-5`` float32), relative to ``1 + cost``.
        generator: random generator for RANSAC sampling (for reproducibility).
        return_axis_angle: return the pose as ``(B, 6)`` = (axis-angle, translation) instead of ``(R, t)``.

    Returns:
        ``(R, t)`` with ``R`` ``(B, 3, 3)`` and ``t`` ``(B, 3)`` mapping world points into the camera frame
        (no batch dimension when no argument has one).

    Gradient: with ``f`` the weighted reprojection objective and ``H = \nabla^2_{\theta\theta} f`` its exact
    6x6 Hessian at the optimum (``torch.func.hessian``), ``v = H^{-1} g_\theta`` and
    ``dL/dz = -\partial_z \langle \nabla_\theta f(\theta, z), v \rangle`` for ``z`` in ``(X, x, w)``. A singular
    or indefinite Hessian gives the minimum-norm gradient with a
    :class:`~torchddn.diagnostics.NonRegularWarning`. Cost ``O(B H N)`` for RANSAC and ``O(B N)`` per LM step.
    """
    if not isinstance(X, Tensor) or not isinstance(x, Tensor):
        raise DDNError("pnp: X and x must be tensors")
    batched = X.dim() == 3
    if X.dim() == 2:
        X, x = X.unsqueeze(0), x.unsqueeze(0)
        w = None if w is None else w.unsqueeze(0)
        K = None if K is None else K.unsqueeze(0) if K.dim() == 2 else K
    if X.dim() != 3 or X.shape[-1] != 3:
        raise DDNError(f"pnp: X must have shape (B, N, 3) or (N, 3), got {tuple(X.shape)}")
    B, N, _ = X.shape
    if x.shape != (B, N, 2):
        raise DDNError(f"pnp: x must have shape {(B, N, 2)} to match X, got {tuple(x.shape)}")
    if w is None:
        w = torch.ones(B, N, dtype=X.dtype, device=X.device)
    if w.shape != (B, N):
        raise DDNError(f"pnp: w must have shape {(B, N)}, got {tuple(w.shape)}")
    if N < 6:
        raise DDNError(f"pnp: at least 6 correspondences are needed, got {N}")
    for name, t in (("X", X), ("x", x), ("w", w)):
        if t.dtype != X.dtype or not t.dtype.is_floating_point:
            raise DDNError(f"pnp: {name} must be floating point with the dtype of X")
        bad = ~torch.isfinite(t).reshape(B, -1).all(-1)
        if bool(bad.any()):
            raise DDNError(f"pnp: {name} contains NaN or Inf at batch elements {element_list(bad)}")
    negative = (w < 0).any(-1)
    if bool(negative.any()):
        raise DDNError(f"pnp: weights must be non-negative; negative at batch elements {element_list(negative)}")
    few = (w > 0).sum(-1) < 6
    if bool(few.any()):
        raise DDNError(f"pnp: fewer than 6 points with positive weight at batch elements {element_list(few)}")
    if K is not None:
        if K.dim() == 2:
            K = K.unsqueeze(0)
        xh = torch.cat([x, torch.ones_like(x[..., :1])], -1)
        xn = torch.linalg.solve(K, xh.transpose(-1, -2)).transpose(-1, -2)
        x = xn[..., :2] / xn[..., 2:3]
    if tol is None:
        tol = 1e-10 if X.dtype == torch.float64 else 1e-5
    opts = (hypotheses, threshold, max_iter, tol, generator, on_failure, diagnostics)
    theta = _PnPFunction.apply(X, x, w, opts)
    if not batched:
        theta = theta[0]
    if return_axis_angle:
        return theta
    return rodrigues(theta[..., :3]), theta[..., 3:]


class PnP(nn.Module):
    """Module form of :func:`pnp`: ``layer(X, x, w=None, K=None) -> (R, t)``; ``layer.diagnostics`` after a call."""

    def __init__(self, *, hypotheses: int = 128, threshold: float = 1e-2, max_iter: int = 100,
                 tol: Optional[float] = None, seed: Optional[int] = 0, return_axis_angle: bool = False,
                 on_failure: str = "warn") -> None:
        super().__init__()
        self.hypotheses, self.threshold, self.max_iter, self.tol = hypotheses, threshold, max_iter, tol
        self.seed, self.return_axis_angle, self.on_failure = seed, return_axis_angle, on_failure
        self.diagnostics = Diagnostics()

    def forward(self, X: Tensor, x: Tensor, w: Optional[Tensor] = None, K: Optional[Tensor] = None):
        self.diagnostics = Diagnostics()
        gen = None if self.seed is None else torch.Generator().manual_seed(self.seed)
        return pnp(X, x, w, K, hypotheses=self.hypotheses, threshold=self.threshold, max_iter=self.max_iter,
                   tol=self.tol, generator=gen, return_axis_angle=self.return_axis_angle,
                   on_failure=self.on_failure, diagnostics=self.diagnostics)


def synthetic_scene(B: int, N: int, outlier_fraction: float = 0.0, noise: float = 0.0, seed: int = 0,
                    dtype: torch.dtype = torch.float64):
    """Random poses, 3D points in front of the camera and their projections (a fraction replaced by outliers).

    Returns ``X (B, N, 3)``, ``x (B, N, 2)``, ``R (B, 3, 3)``, ``t (B, 3)``, ``outlier (B, N)`` bool."""
    g = torch.Generator().manual_seed(seed)
    r = 0.5 * torch.randn(B, 3, generator=g, dtype=dtype)
    R = rodrigues(r)
    t = torch.cat([0.3 * torch.randn(B, 2, generator=g, dtype=dtype),
                   4 + torch.rand(B, 1, generator=g, dtype=dtype)], -1)
    Xc = torch.cat([2 * torch.rand(B, N, 2, generator=g, dtype=dtype) - 1,
                    torch.rand(B, N, 1, generator=g, dtype=dtype) * 2 - 1], -1)  # around the origin
    u = Xc @ R.transpose(-1, -2) + t.unsqueeze(1)
    x = u[..., :2] / u[..., 2:3] + noise * torch.randn(B, N, 2, generator=g, dtype=dtype)
    outlier = torch.rand(B, N, generator=g, dtype=dtype) < outlier_fraction
    x = torch.where(outlier.unsqueeze(-1), x + 0.3 * (2 * torch.rand(B, N, 2, generator=g, dtype=dtype) - 1), x)
    return Xc, x, R, t, outlier


def pose_error(R: Tensor, t: Tensor, R_true: Tensor, t_true: Tensor) -> Tensor:
    """Per-element pose error: rotation angle (radians) plus translation distance."""
    D = R_true.transpose(-1, -2) @ R
    axis = torch.stack([D[..., 2, 1] - D[..., 1, 2], D[..., 0, 2] - D[..., 2, 0], D[..., 1, 0] - D[..., 0, 1]], -1)
    sin2 = (axis.square().sum(-1) + 1e-30).sqrt()  # 2 sin(angle), smooth at 0
    angle = torch.atan2(sin2, D.diagonal(dim1=-2, dim2=-1).sum(-1) - 1)
    return angle + (t - t_true).norm(dim=-1)


def learn_weights_example(B: int = 4, N: int = 24, outlier_fraction: float = 0.25, noise: float = 1e-3,
                          steps: int = 30, lr: float = 0.5, seed: int = 0) -> dict:
    """Learn per-point weights by gradient descent through the PnP layer so that the pose error falls.

    Synthetic scenes with outliers are solved with weights ``w = sigmoid(logits)``; the mean pose error against the
    ground truth is back-propagated through :func:`pnp` (implicit gradient w.r.t. the weights) and the logits are
    updated with Adam. Returns ``{"initial_error", "final_error", "history", "weights", "outlier"}``.
    """
    X, x, R_true, t_true, outlier = synthetic_scene(B, N, outlier_fraction, noise, seed)
    logits = torch.zeros(B, N, dtype=X.dtype, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=lr)
    history = []
    for _ in range(steps + 1):
        w = torch.sigmoid(logits)
        R, t = pnp(X, x, w, generator=torch.Generator().manual_seed(seed), hypotheses=32, on_failure="ignore")
        loss = pose_error(R, t, R_true, t_true).mean()
        history.append(float(loss.detach()))
        if len(history) == steps + 1:
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {"initial_error": history[0], "final_error": history[-1], "history": history,
            "weights": torch.sigmoid(logits).detach(), "outlier": outlier}


make_callable(__name__)  # torchddn.nodes.pnp is this module and calls pnp(...) (see nodes/_callable.py)
