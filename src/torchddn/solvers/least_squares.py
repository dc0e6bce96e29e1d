r"""Batched nonlinear least squares: Levenberg-Marquardt and Gauss-Newton for ``min_y 1/2 ||r(y)||^2``.

The problem's ``residuals`` ``r: (b, m) -> (b, k)`` are required; element ``i`` of ``r`` depends only on ``y[i]``.
Both solvers work with the per-element Jacobian ``J = dr/dy`` of shape ``(b, k, m)``, the gradient
``g = J^T r`` and the Gauss-Newton matrix ``A = J^T J`` (``(b, m, m)``, small ``m``).

The Jacobian is built once per iteration, together with ``r``, by the double-VJP identity: with
``phi(w) = J^T w`` (one reverse pass that keeps its graph) ``J u = d/dw <phi(w), u>``, so the ``m`` columns are
``m`` batched reverse passes through the (linear) graph of ``phi``. Forward mode (``torch.func.jvp`` under
``vmap``) gives the same result but costs about three times as much per call on CPU; it is the fallback when the
residuals are not twice differentiable by ``torch.autograd`` (for instance a custom Function marked
``once_differentiable``). No ``torch.func`` transform is rebuilt inside the iteration on the default path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.func import jvp, vmap

from torchddn.diagnostics import DDNError, element_list
from torchddn.solvers._common import armijo, check_inputs, effective_tol
from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import BatchFn

__all__ = ["levenberg_marquardt", "gauss_newton", "residuals_and_jacobian"]


def _residuals(fn: BatchFn, y: Tensor) -> Tensor:
    r = fn(y)
    if not isinstance(r, Tensor) or r.dim() == 0 or r.shape[0] != y.shape[0]:
        shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
        raise DDNError(f"residuals must return shape ({y.shape[0]}, k) (one row per batch element), got {shape}")
    return r.reshape(y.shape[0], -1)


def _jacobian_forward(fn: BatchFn, y: Tensor) -> tuple[Tensor, Tensor]:
    b, m = y.shape
    basis = torch.eye(m, dtype=y.dtype, device=y.device).unsqueeze(1).expand(m, b, m)
    r, cols = vmap(lambda e: jvp(lambda u: _residuals(fn, u), (y,), (e,)), out_dims=(None, 0))(basis)
    return r, cols.permute(1, 2, 0)


def residuals_and_jacobian(fn: BatchFn, y: Tensor, method: str = "auto") -> tuple[Tensor, Tensor]:
    """``r(y)`` of shape ``(b, k)`` and the per-element Jacobian ``dr/dy`` of shape ``(b, k, m)``.

    ``method``: ``"reverse"`` (double VJP: one reverse pass keeping its graph, then ``m`` batched reverse passes
    through it), ``"forward"`` (``m`` forward-mode products under one ``vmap``) or ``"auto"`` (reverse, falling
    back to forward when the residuals cannot be differentiated twice by autograd). Cost: about ``m + 2``
    evaluations of ``r``; no ``k x m`` work beyond storing ``J``.
    """
    if method == "forward":
        return _jacobian_forward(fn, y)
    b, m = y.shape
    try:
        with torch.enable_grad():
            u = y.detach().requires_grad_(True)
            r = _residuals(fn, u)
            if not r.requires_grad:  # residuals that do not depend on y
                return r.detach(), r.new_zeros(b, r.shape[1], m)
            w = torch.zeros_like(r, requires_grad=True)
            (g,) = torch.autograd.grad(r, u, w, create_graph=True, allow_unused=True)
            if g is None:  # r does not depend on y
                return r.detach(), r.new_zeros(b, r.shape[1], m)
            if not g.requires_grad:  # a backward that autograd cannot differentiate
                raise RuntimeError("the residuals' backward is not differentiable")
            basis = torch.eye(m, dtype=y.dtype, device=y.device).unsqueeze(1).expand(m, b, m)
            if m <= 8:  # a few plain reverse passes cost fewer dispatches than one batched (vmapped) pass
                cols = [torch.autograd.grad(g, w, basis[j], retain_graph=j < m - 1, allow_unused=True)[0]
                        for j in range(m)]
                if any(c is None for c in cols):  # g = J^T w does not reach w: a once-differentiable backward
                    raise RuntimeError("the residuals' backward is not differentiable")
                return r.detach(), torch.stack(cols, dim=2)
            (cols,) = torch.autograd.grad(g, w, basis, is_grads_batched=True, allow_unused=True)
        if cols is None:
            raise RuntimeError("the residuals' backward is not differentiable")
        return r.detach(), cols.permute(1, 2, 0)
    except RuntimeError:
        if method == "reverse":
            raise
        return _jacobian_forward(fn, y)


def _start(problem: Problem, y0: Tensor, tol: float, max_iter: int, name: str) -> BatchFn:
    check_inputs(y0, tol, max_iter)
    if problem.residuals is None:
        raise DDNError(f"{name} needs problem.residuals (a (b, m) -> (b, k) function); for a general objective "
                       f"use 'newton' or 'lbfgs'")
    if problem.constrained():
        raise DDNError(f"{name} solves unconstrained least squares; constrained residual problems go to 'sqp', "
                       f"'interior_point' or 'augmented_lagrangian' with the objective 1/2 ||r||^2")
    return problem.residuals


def _check_start(r: Tensor, J: Tensor, name: str) -> None:
    bad = ~(torch.isfinite(r).all(dim=1) & torch.isfinite(J).flatten(1).all(dim=1))
    if bool(bad.any()):
        raise DDNError(f"{name}: the residuals or their Jacobian are NaN or Inf at the starting point y0 at batch "
                       f"elements {element_list(bad)}")


def _gtest(g: Tensor, J: Tensor, r: Tensor, tol: float) -> Tensor:
    """Scale-invariant first-order test ``||J^T r|| <= tol ||J||_F ||r||`` (true where ``J^T r = 0``)."""
    gn = g.norm(dim=1)
    return (gn <= tol * J.flatten(1).norm(dim=1) * r.norm(dim=1)) | (gn == 0)


def _normal_equations(r: Tensor, J: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``F = 1/2 ||r||^2``, ``g = J^T r``, ``A = J^T J`` and the scale-free gradient ratio
    ``||g|| / (||J||_F ||r||)`` (0 where ``g = 0``; ``||J||_F^2 = tr A``) from one ``J^T [J, r]`` product.
    Non-finite values give ``F = inf`` and ``ratio = inf``."""
    m = J.shape[2]
    G = J.transpose(1, 2) @ torch.cat([J, r.unsqueeze(-1)], dim=2)  # (b, m, m + 1)
    A, g = G[:, :, :m], G[:, :, m]
    F = 0.5 * (r * r).sum(dim=1)
    scale = (A.diagonal(dim1=1, dim2=2).sum(dim=1) * 2 * F).sqrt()
    ratio = g.norm(dim=1) / scale.clamp_min(torch.finfo(F.dtype).tiny)
    F = F.nan_to_num(nan=float("inf"))
    ratio = torch.where(torch.isfinite(F), ratio.nan_to_num(nan=float("inf")), float("inf"))
    return F, g, A, ratio


def levenberg_marquardt(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100,
                        xtol: Optional[float] = None, ftol: Optional[float] = None, tau: float = 1e-3,
                        jacobian: str = "auto") -> SolverResult:
    r"""Batched Levenberg-Marquardt for ``min_y 1/2 ||r(y)||^2`` with damping per element.

    Per element and iteration, with ``J``, ``g = J^T r`` and ``A = J^T J`` at ``y``, the step solves
    ``(A + lambda D) d = -g`` by Cholesky, with ``D = diag(max_k diag(A_k))`` (Marquardt's scaling: the running
    maximum of the diagonal over the iterations, which makes the method invariant to rescaling the parameters).
    The gain ratio ``rho = (F(y) - F(y + d)) / (L(0) - L(d))``, with ``L(0) - L(d) = 1/2 d^T (lambda D d - g)``
    the decrease predicted by the linear model, decides: ``rho > 1e-4`` accepts the step and sets
    ``lambda <- lambda max(1/3, 1 - (2 rho - 1)^3)``; otherwise the step is rejected and ``lambda`` grows by
    ``nu`` (doubling on each consecutive rejection; Nielsen's rule). The start is ``lambda = tau`` (relative to
    ``D``).

    Stopping is scale-invariant and per element; an element stops at the first of

    * gradient: ``||J^T r|| <= tol ||J||_F ||r||`` (the residual is orthogonal to the range of ``J`` up to
      ``tol``; unchanged when ``r`` or ``y`` are rescaled);
    * step: an accepted step with ``||d|| <= xtol (||y|| + xtol)`` (``xtol`` defaults to ``tol``);
    * cost: an accepted step with ``rho > 1/4`` whose decrease ``F(y) - F(y + d) <= ftol F(y)`` (``ftol``
      defaults to ``4 eps``: no further decrease is resolvable) while the gradient test fails with ``sqrt(eps)``;
      once it holds with ``sqrt(eps)``, the cost cannot rank steps any more (its changes are at rounding level),
      so steps that do not raise it beyond ``4 ftol F`` are accepted and the gradient and step tests decide;

    and fails when ``lambda`` exceeds ``1e16`` without an acceptable step (it then counts as
    converged if the gradient test holds with ``sqrt(eps)``). ``tol`` and ``xtol`` are floored at ``64 eps``.
    Converged elements are frozen; all elements are evaluated together (no gathering).

    Args:
        problem: a :class:`~torchddn.solvers.base.Problem` with ``residuals`` and no constraints.
        y0: ``(b, m)`` finite starting point (NaN or Inf raises :class:`~torchddn.diagnostics.DDNError`, as
            do residuals that are not finite there).
        tol, max_iter: gradient tolerance and iteration limit per element.
        xtol, ftol: step and cost tolerances (see above).
        tau: initial damping ``lambda`` (relative to the scaling ``D``).
        jacobian: ``"auto"``, ``"reverse"`` or ``"forward"`` (see :func:`residuals_and_jacobian`).

    Returns:
        :class:`~torchddn.solvers.base.SolverResult` with ``nu=None`` and ``residual = max|J^T r|`` (the
        gradient of ``1/2 ||r||^2``; ``inf`` where it is not finite).

    Cost per iteration: one evaluation of ``r`` and ``J`` at the trial point (about ``m + 2`` residual
    evaluations), ``J^T J`` (``O(b k m^2)``) and a ``(b, m, m)`` Cholesky.
    """
    name = "levenberg_marquardt"
    fn = _start(problem, y0, tol, max_iter, name)
    y = y0.detach().clone()
    b, m = y.shape
    dt = y.dtype
    eps = torch.finfo(dt).eps
    tiny = torch.finfo(dt).tiny
    tol_e = effective_tol(tol, dt)
    xtol_e = effective_tol(tol if xtol is None else xtol, dt)
    ftol_e = 4 * eps if ftol is None else float(ftol)
    loose = eps ** 0.5
    with torch.no_grad():
        r, J = residuals_and_jacobian(fn, y, jacobian)
        _check_start(r, J, name)
        F, g, A, ratio = _normal_equations(r, J)
        dmax = A.diagonal(dim1=1, dim2=2).clone()
        lam = torch.full_like(F, float(tau))
        nu = torch.full_like(lam, 2.0)
        conv = ratio <= tol_e
        failed = torch.zeros(b, dtype=torch.bool, device=y.device)
        iters = torch.zeros(b, dtype=torch.int64, device=y.device)
        for _ in range(int(max_iter)):
            active = ~(conv | failed)
            if not bool(active.any()):
                break
            dscale = dmax.amax(dim=1, keepdim=True)
            D = lam[:, None] * torch.maximum(dmax, eps * dscale)
            d, info = torch.linalg.solve_ex(A + torch.diag_embed(D), g.neg().unsqueeze(-1))
            d = d.squeeze(-1)
            solved = active & (info == 0)
            d = torch.where(solved[:, None], d, 0.0)
            pred = 0.5 * (d * (D * d - g)).sum(dim=1)  # L(0) - L(d) of the damped linear model
            dn = d.norm(dim=1)
            yn = y.norm(dim=1)
            r_t, J_t = residuals_and_jacobian(fn, y + d, jacobian)
            F_t, g_t, A_t, ratio_t = _normal_equations(r_t, J_t)
            rho = (F - F_t) / pred  # NaN or -inf where the trial is not finite or d = 0: rejected
            # once the gradient test holds with sqrt(eps) the cost can no longer tell better steps from worse:
            # steps that do not raise it beyond rounding are kept and the gradient and step tests decide
            rounding = solved & (ratio <= loose) & (F_t <= F * (1 + 4 * ftol_e))
            accept = (solved & (rho > 1e-4)) | rounding
            # stopping tests on this iteration (see the docstring); nu = 2: no rejection since the last acceptance
            small_step = solved & (accept | (nu == 2)) & (dn <= xtol_e * (yn + xtol_e))
            small_gain = accept & ~rounding & (rho > 0.25) & ((F - F_t) <= ftol_e * F)
            # per-element damping update (Nielsen)
            factor = torch.where(rounding, 1.0 / 3.0, torch.clamp(1 - (2 * rho - 1) ** 3, min=1.0 / 3.0))
            lam = torch.where(accept, lam * factor, torch.where(active, lam * nu, lam))
            nu = torch.where(accept, 2.0, torch.where(active, 2 * nu, nu))
            acc = accept[:, None]
            y = torch.where(acc, y + d, y)
            r = torch.where(acc, r_t, r)
            F = torch.where(accept, F_t, F)
            g = torch.where(acc, g_t, g)
            A = torch.where(acc[:, :, None], A_t, A)
            ratio = torch.where(accept, ratio_t, ratio)
            dmax = torch.maximum(dmax, A.diagonal(dim1=1, dim2=2))
            iters += active
            conv = conv | small_step | small_gain | (accept & (ratio <= tol_e))
            stalled = active & ~conv & (lam > 1e16)
            conv = conv | (stalled & (ratio <= loose))
            failed = failed | (stalled & (ratio > loose))
        gn = g.abs().amax(dim=1)
        gn = torch.where(torch.isfinite(gn), gn, float("inf"))
    return SolverResult(y=y, nu=None, converged=conv, iterations=iters, residual=gn)


def gauss_newton(problem: Problem, y0: Tensor, *, tol: float = 1e-10, max_iter: int = 100,
                 xtol: Optional[float] = None, ftol: Optional[float] = None, c1: float = 1e-4,
                 jacobian: str = "auto") -> SolverResult:
    r"""Batched Gauss-Newton with a backtracking line search for ``min_y 1/2 ||r(y)||^2``.

    Per element and iteration: ``d = -(J^T J + delta I)^{-1} J^T r`` (``delta = 4 eps max diag(J^T J)``, a
    rounding-level shift that keeps rank-deficient ``J`` solvable), then the largest ``alpha = 2^-j`` with
    ``F(y + alpha d) <= F(y) + c1 alpha g^T d`` (:func:`~torchddn.solvers._common.armijo`). Stopping rules as in
    :func:`levenberg_marquardt` (the cost test without the gain-ratio condition); an element whose line search
    fails stops, converged if the gradient test holds with ``sqrt(eps)``. Fast near a solution with small
    residuals; :func:`levenberg_marquardt` is the robust choice from poor starts.

    Cost per iteration: one ``r`` and ``J`` evaluation, one ``(b, m, m)`` Cholesky and one residual evaluation
    per line-search trial.
    """
    name = "gauss_newton"
    fn = _start(problem, y0, tol, max_iter, name)
    y = y0.detach().clone()
    b, m = y.shape
    dt = y.dtype
    eps = torch.finfo(dt).eps
    tol_e = effective_tol(tol, dt)
    xtol_e = effective_tol(tol if xtol is None else xtol, dt)
    ftol_e = 4 * eps if ftol is None else float(ftol)

    def cost(u: Tensor) -> Tensor:
        ru = _residuals(fn, u)
        return 0.5 * (ru * ru).sum(dim=1)

    with torch.no_grad():
        r, J = residuals_and_jacobian(fn, y, jacobian)
        _check_start(r, J, name)
        F = 0.5 * (r * r).sum(dim=1)
        g = torch.einsum("bkm,bk->bm", J, r)
        conv = _gtest(g, J, r, tol_e)
        failed = torch.zeros(b, dtype=torch.bool, device=y.device)
        iters = torch.zeros(b, dtype=torch.int64, device=y.device)
        eye = torch.eye(m, dtype=dt, device=y.device)
        for _ in range(int(max_iter)):
            active = ~conv & ~failed
            if not bool(active.any()):
                break
            A = J.transpose(1, 2) @ J
            shift = 4 * eps * A.diagonal(dim1=1, dim2=2).amax(dim=1).clamp_min(torch.finfo(dt).tiny)
            L, info = torch.linalg.cholesky_ex(A + shift[:, None, None] * eye)
            d = -torch.cholesky_solve(g.unsqueeze(-1), L).squeeze(-1)
            ok = (info == 0) & torch.isfinite(d).all(dim=1)
            d = torch.where(ok[:, None], d, -g)
            slope = (g * d).sum(dim=1)
            alpha, F_t, ls_ok = armijo(cost, y, F, d, slope, active & (slope < 0), c1=c1)
            step = active & ls_ok
            dy = alpha[:, None] * d
            y_new = torch.where(step[:, None], y + dy, y)
            r_new, J_new = residuals_and_jacobian(fn, y_new, jacobian)
            small_step = step & (dy.norm(dim=1) <= xtol_e * (y.norm(dim=1) + xtol_e))
            small_gain = step & ((F - F_t) <= ftol_e * F)
            y = y_new
            r = torch.where(step[:, None], r_new, r)
            J = torch.where(step[:, None, None], J_new, J)
            F = torch.where(step, F_t, F)
            g = torch.einsum("bkm,bk->bm", J, r)
            iters = iters + active.to(torch.int64)
            conv = conv | (active & (small_step | small_gain | _gtest(g, J, r, tol_e)))
            stalled = active & ~ls_ok & ~conv
            loose = _gtest(g, J, r, eps ** 0.5)
            conv = conv | (stalled & loose)
            failed = failed | (stalled & ~loose)
        gn = g.abs().amax(dim=1)
        gn = torch.where(torch.isfinite(gn), gn, torch.full_like(gn, float("inf")))
    return SolverResult(y=y, nu=None, converged=conv, iterations=iters, residual=gn)
