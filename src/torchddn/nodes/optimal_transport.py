r"""Entropy-regularised optimal transport (Sinkhorn) with an exact implicit backward.

.. math::
    P(M, r, c) = \arg\min_{P \ge 0,\; P 1 = r,\; P^\top 1 = c} \;\langle P, M\rangle
                 + \frac1\gamma \sum_{ij} P_{ij}(\log P_{ij} - 1),

whose solution is :math:`P = \operatorname{diag}(u)\,e^{-\gamma M}\operatorname{diag}(v)`. The forward runs the
Sinkhorn iterations in the log domain, :math:`\log P_{ij} = \alpha_i + \beta_j - \gamma M_{ij}`, per batch element
until the row marginal error is below ``tol`` (the column marginals hold exactly after each column update).

Exact backward (``backward="implicit"``). Linearising the marginal constraints in the dual variables gives the
symmetric :math:`(m+n)` system

.. math::
    \begin{pmatrix}\operatorname{diag}(r) & P\\ P^\top & \operatorname{diag}(c)\end{pmatrix}
    \begin{pmatrix}\lambda\\ \mu\end{pmatrix} = \begin{pmatrix}(\bar P\odot P)1\\ (\bar P\odot P)^\top 1\end{pmatrix},

which has the one-dimensional null space :math:`(1, -1)` (the right-hand side is orthogonal to it). It is solved by
a Schur complement onto the smaller side with one dual variable fixed to zero, then shifted to the minimum-norm
solution. The gradients are :math:`\bar M = \gamma\,P\odot(\lambda 1^\top + 1\mu^\top - \bar P)`,
:math:`\bar r = \lambda`, :math:`\bar c = \mu`. Because :math:`\sum r = \sum c` must hold, :math:`(\bar r, \bar c)`
is defined up to adding :math:`(t1, -t1)`; the returned pair is the representative orthogonal to :math:`(1, -1)`
(exact along every perturbation that keeps the masses equal, e.g. when ``r``, ``c`` come from a softmax).
Cost: :math:`O(b\,m\,n\,\min(m,n) + b\,\min(m,n)^3)`.

Approximate backward (``backward="truncated"``): re-runs the last ``truncate`` Sinkhorn iterations with autograd,
starting from the converged (detached) potentials, and differentiates through them. Cost :math:`O(b\,m\,n)` per
iteration (memory too); the error decays geometrically with ``truncate`` at the rate of the Sinkhorn contraction.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from torchddn.diagnostics import ConvergenceWarning, DDNError, element_list, report

__all__ = ["sinkhorn", "Sinkhorn"]


def _log_sinkhorn(logk: Tensor, logr: Tensor, logc: Tensor, tol: float, max_iter: int,
                  alpha: Optional[Tensor] = None, beta: Optional[Tensor] = None, freeze: bool = True):
    """Log-domain Sinkhorn. ``logk`` (b, m, n) = -gamma M; returns (alpha, beta, err, converged, iterations)."""
    bsz, m, n = logk.shape
    alpha = logk.new_zeros(bsz, m) if alpha is None else alpha
    beta = logk.new_zeros(bsz, n) if beta is None else beta
    done = torch.zeros(bsz, dtype=torch.bool, device=logk.device)
    iters = torch.zeros(bsz, dtype=torch.long, device=logk.device)
    r = logr.exp()
    err = torch.full((bsz,), float("inf"), dtype=logk.dtype, device=logk.device)
    check_every = 5
    for it in range(max_iter):
        new_alpha = logr - torch.logsumexp(logk + beta[:, None, :], dim=2)
        new_beta = logc - torch.logsumexp(logk + new_alpha[:, :, None], dim=1)
        if freeze:
            alpha = torch.where(done[:, None], alpha, new_alpha)
            beta = torch.where(done[:, None], beta, new_beta)
            iters = iters + (~done).long()
        else:
            alpha, beta = new_alpha, new_beta
        if (it + 1) % check_every == 0 or it == max_iter - 1:
            rows = torch.exp(logk + alpha[:, :, None] + beta[:, None, :]).sum(2)
            err = (rows - r).abs().sum(1)
            done = done | (err <= tol)
            if bool(done.all()):
                break
    return alpha, beta, err, done, iters


def _implicit_backward(P: Tensor, gP: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the linearised marginal system for (lambda, mu); see the module docstring."""
    transpose = P.shape[1] < P.shape[2]
    if transpose:  # eliminate the larger side, solve on the smaller one
        P, gP = P.transpose(1, 2), gP.transpose(1, 2)
    q = gP * P
    a, b = q.sum(2), q.sum(1)
    rs, cs = P.sum(2), P.sum(1)  # marginals of the returned P keep the null space exact
    pr = P / rs[:, :, None]
    # Schur complement on the column side: (diag(c) - P^T diag(r)^-1 P) mu = b - P^T diag(r)^-1 a
    schur = torch.diag_embed(cs) - P.transpose(1, 2) @ pr
    rhs = b - (pr.transpose(1, 2) @ a[..., None])[..., 0]
    # one-dimensional null space (the ones vector): fix mu_last = 0 and drop the last equation
    mu = torch.linalg.solve(schur[:, :-1, :-1], rhs[:, :-1, None])[..., 0]
    mu = torch.cat([mu, mu.new_zeros(mu.shape[0], 1)], dim=1)
    lam = (a - (P @ mu[..., None])[..., 0]) / rs
    # minimum-norm representative of {(lam + t, mu - t)}
    t = (mu.sum(1) - lam.sum(1)) / (lam.shape[1] + mu.shape[1])
    lam, mu = lam + t[:, None], mu - t[:, None]
    if transpose:
        lam, mu = mu, lam
    return lam, mu


class _SinkhornFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, M, r, c, gamma, tol, max_iter, on_failure):
        logk = -gamma * M
        alpha, beta, err, done, _ = _log_sinkhorn(logk, r.log(), c.log(), tol, max_iter)
        if not bool(done.all()):
            report(on_failure, f"sinkhorn did not converge in {max_iter} iterations (marginal error up to "
                               f"{float(err[~done].max()):.3g} > tol={tol:.3g}) at batch elements "
                               f"{element_list(~done)}; increase max_iter or decrease gamma", ConvergenceWarning,
                   stacklevel=4)
        P = torch.exp(logk + alpha[:, :, None] + beta[:, None, :])
        ctx.save_for_backward(P)
        ctx.gamma = gamma
        return P

    @staticmethod
    def backward(ctx, gP):
        (P,) = ctx.saved_tensors
        lam, mu = _implicit_backward(P, gP)
        gM = ctx.gamma * P * (lam[:, :, None] + mu[:, None, :] - gP)
        return gM, lam, mu, None, None, None, None


def _default_tol(dtype: torch.dtype) -> float:
    return 1e-10 if dtype == torch.float64 else 1e-5


def sinkhorn(M: Tensor, r: Optional[Tensor] = None, c: Optional[Tensor] = None, gamma: float = 1.0,
             tol: Optional[float] = None, max_iter: int = 1000, backward: str = "implicit", truncate: int = 10,
             on_failure: str = "warn") -> Tensor:
    r"""Entropic optimal transport plan :math:`P = \operatorname{diag}(u)e^{-\gamma M}\operatorname{diag}(v)`.

    Args:
        M: (b, m, n) cost matrices, or (m, n) shared by the batch (then ``r``/``c`` give the batch size).
        r: (b, m) or (m,) positive row marginals; default uniform ``1/m``.
        c: (b, n) or (n,) positive column marginals; default uniform ``1/n``. ``sum(r) == sum(c)`` is required.
        gamma: inverse regularisation strength (> 0); larger is closer to unregularised OT and slower.
        tol: L1 tolerance on the row marginals (columns hold exactly); default 1e-10 (float64) / 1e-5 (float32).
        max_iter: maximum number of Sinkhorn iterations.
        backward: ``"implicit"`` (exact, see the module docstring) or ``"truncated"`` (approximate: autograd
            through the last ``truncate`` iterations started from the converged potentials).
        truncate: iterations differentiated by ``backward="truncated"``.
        on_failure: ``"warn"`` (default; :class:`ConvergenceWarning`), ``"raise"`` or ``"ignore"`` when some
            element does not converge; the elements are named.

    Returns:
        P: (b, m, n) transport plans with ``P.sum(2) = r`` and ``P.sum(1) = c``.

    Gradient (implicit): :math:`\bar M = \gamma P\odot(\lambda 1^\top + 1\mu^\top - \bar P)`,
    :math:`\bar r = \lambda`, :math:`\bar c = \mu`, with :math:`(\lambda, \mu)` the minimum-norm solution of the
    singular :math:`(m+n)` linearised marginal system (solved by a Schur complement on the smaller side).

    Cost: forward :math:`O(b\,m\,n)` per iteration; implicit backward
    :math:`O(b\,m\,n\min(m,n) + b\min(m,n)^3)`, memory :math:`O(b\,m\,n)` (only ``P`` is saved).
    """
    if backward not in ("implicit", "truncated"):
        raise DDNError(f"backward must be 'implicit' or 'truncated', got {backward!r}")
    if not torch.is_tensor(M) or not M.is_floating_point():
        raise DDNError("M must be a floating-point tensor")
    if M.dim() not in (2, 3):
        raise DDNError(f"M must have shape (b, m, n) or (m, n), got {tuple(M.shape)}")
    if not gamma > 0:
        raise DDNError(f"gamma must be positive, got {gamma}")
    m, n = M.shape[-2:]
    bsz = M.shape[0] if M.dim() == 3 else None
    for name, t in (("r", r), ("c", c)):
        if t is not None:
            if t.dim() == 2:
                if bsz is not None and t.shape[0] != bsz:
                    raise DDNError(f"{name} has batch size {t.shape[0]} but M has {bsz}")
                bsz = t.shape[0]
            elif t.dim() != 1:
                raise DDNError(f"{name} must have shape (b, k) or (k,), got {tuple(t.shape)}")
    bsz = 1 if bsz is None else bsz
    squeeze = M.dim() == 2 and all(t is None or t.dim() == 1 for t in (r, c))
    r = torch.full((bsz, m), 1.0 / m, dtype=M.dtype, device=M.device) if r is None else r.expand(bsz, -1)
    c = torch.full((bsz, n), 1.0 / n, dtype=M.dtype, device=M.device) if c is None else c.expand(bsz, -1)
    if r.shape[1] != m or c.shape[1] != n:
        raise DDNError(f"r must have {m} and c {n} entries to match M of shape {tuple(M.shape)}, got "
                       f"{r.shape[1]} and {c.shape[1]}")
    M = M.expand(bsz, m, n)
    for name, t in (("M", M), ("r", r), ("c", c)):
        fin = torch.isfinite(t.detach()).reshape(bsz, -1).all(1)
        if not bool(fin.all()):
            raise DDNError(f"{name} contains NaN or Inf at batch elements {element_list(~fin)}")
    bad = (r.detach() <= 0).any(1) | (c.detach() <= 0).any(1)
    if bool(bad.any()):
        raise DDNError(f"marginals r and c must be strictly positive; not at batch elements {element_list(bad)}")
    mass = (r.detach().sum(1) - c.detach().sum(1)).abs() > 1e3 * torch.finfo(M.dtype).eps * r.detach().sum(1)
    if bool(mass.any()):
        raise DDNError(f"sum(r) must equal sum(c); differs at batch elements {element_list(mass)}")
    tol = _default_tol(M.dtype) if tol is None else tol
    if backward == "implicit":
        P = _SinkhornFn.apply(M, r, c, float(gamma), tol, max_iter, on_failure)
    else:
        logk = -gamma * M
        with torch.no_grad():
            alpha, beta, err, done, _ = _log_sinkhorn(logk, r.log(), c.log(), tol, max_iter)
        if not bool(done.all()):
            report(on_failure, f"sinkhorn did not converge in {max_iter} iterations at batch elements "
                               f"{element_list(~done)}", ConvergenceWarning)
        alpha, beta, _, _, _ = _log_sinkhorn(logk, r.log(), c.log(), 0.0, truncate, alpha, beta, freeze=False)
        P = torch.exp(logk + alpha[:, :, None] + beta[:, None, :])
    return P[0] if squeeze else P


class Sinkhorn(nn.Module):
    """Module form of :func:`sinkhorn`: ``Sinkhorn(gamma)(M, r=None, c=None) -> P``."""

    def __init__(self, gamma: float = 1.0, tol: Optional[float] = None, max_iter: int = 1000,
                 backward: str = "implicit", truncate: int = 10, on_failure: str = "warn") -> None:
        super().__init__()
        self.gamma, self.tol, self.max_iter = gamma, tol, max_iter
        self.backward, self.truncate, self.on_failure = backward, truncate, on_failure

    def forward(self, M: Tensor, r: Optional[Tensor] = None, c: Optional[Tensor] = None) -> Tensor:
        return sinkhorn(M, r, c, self.gamma, self.tol, self.max_iter, self.backward, self.truncate, self.on_failure)

    def extra_repr(self) -> str:
        return f"gamma={self.gamma}, backward={self.backward!r}"
