"""Implicit differentiation of declarative nodes (Gould, Hartley & Campbell, Props. 4.4-4.6).

The optimality conditions, the linear solve and the vector-Jacobian product are kept apart:

* :class:`BoundProblem` evaluates the node's objective ``f``, stacked constraints ``c = [h; g]`` and Lagrangian
  ``L = f - nu^T c`` on a flat, batched ``y`` of shape ``(b, m)`` for given input tensors.
* :func:`constraint_state` finds the active set (scale-aware), recovers multipliers by least squares when the
  solver gave none, and flags non-regular points.
* :class:`ImplicitSolve` solves the symmetric KKT system ``K [u; w] = [v; 0]`` with

  ``K = [[H + gamma I, J_M^T], [J_M, -(I - M)]]``,

  where ``H = D^2_yy L``, ``J_M`` are the rows of the constraint Jacobian for the active constraints and ``M`` the
  active mask, so inactive constraints get ``w_i = 0`` inside one fixed-size batched system (no Python loop over
  elements or active-set groups). Its own backward is implicit too, so double backward is exact.
* :func:`implicit_vjp` finishes with one mixed second-derivative product:
  ``x_bar = - d/dx [ <grad_y L(x, y, nu), u> + <c(x, y), w> ]``, which equals ``v^T Dy`` with
  ``Dy = H^-1 A^T (A H^-1 A^T)^-1 (A H^-1 B - C) - H^-1 B`` (Prop. 4.5) and ``Dy = -H^-1 B`` without constraints
  (Prop. 4.4). No Jacobian with respect to ``x`` is ever formed.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch
from torch import Tensor
from torch.func import grad, vjp

from torchddn import linalg
from torchddn.diagnostics import DDNError, NonRegularWarning, element_list
from torchddn.autodiff import batch_grad, batch_jacobian


@dataclass(eq=False)
class BoundProblem:
    """A node bound to the non-tensor part of its inputs: evaluates ``f``, ``c`` and ``L`` on flat ``y``.

    ``template`` holds the node's positional inputs with ``None`` where a tensor goes; ``tensor_pos`` lists those
    positions. Functions take the tensors in that order, which keeps them usable under ``torch.func`` transforms.
    """

    node: Any
    template: tuple
    tensor_pos: tuple
    yshape: tuple
    num_eq: int = 0
    num_ineq: int = 0
    hess_mode: str = "exact"
    gamma: float = 0.0
    method: str = "auto"
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    dense_max: int = 128
    hess_diag: Optional[Tensor] = None
    infos: list = field(default_factory=list)

    @property
    def num_constraints(self) -> int:
        return self.num_eq + self.num_ineq

    def inputs(self, tensors: Sequence[Tensor]) -> tuple:
        xs = list(self.template)
        for pos, t in zip(self.tensor_pos, tensors):
            xs[pos] = t
        return tuple(xs)

    def unflatten(self, yf: Tensor) -> Tensor:
        return yf.reshape(yf.shape[0], *self.yshape)

    def f(self, tensors: Sequence[Tensor], yf: Tensor) -> Tensor:
        out = self.node.objective(*self.inputs(tensors), y=self.unflatten(yf))
        if not isinstance(out, Tensor) or out.shape != (yf.shape[0],):
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise DDNError(f"{type(self.node).__name__}.objective must return one value per batch element, shape "
                           f"({yf.shape[0]},), but returned {shape}")
        return out

    def c(self, tensors: Sequence[Tensor], yf: Tensor) -> Optional[Tensor]:
        parts = []
        xs = self.inputs(tensors)
        y = self.unflatten(yf)
        b = yf.shape[0]
        for name, count in (("equality_constraints", self.num_eq), ("inequality_constraints", self.num_ineq)):
            if count:
                val = getattr(self.node, name)(*xs, y=y)
                if val.shape[0] != b or val.reshape(b, -1).shape[1] != count:
                    raise DDNError(f"{type(self.node).__name__}.{name} must return shape ({b},) or ({b}, {count}), "
                                   f"got {tuple(val.shape)}")
                parts.append(val.reshape(b, -1))
        if not parts:
            return None
        return torch.cat(parts, -1) if len(parts) > 1 else parts[0]

    def lagrangian(self, tensors: Sequence[Tensor], yf: Tensor, nu: Optional[Tensor]) -> Tensor:
        val = self.f(tensors, yf)
        if self.num_constraints and nu is not None:
            val = val - (nu * self.c(tensors, yf)).sum(-1)
        return val

    # ---- the KKT operator -------------------------------------------------------------------------------------
    def kkt_matvec(self, tensors: Sequence[Tensor], yf: Tensor, nu: Optional[Tensor], mask: Optional[Tensor],
                   z: Tensor) -> Tensor:
        """``K z`` for ``z = [z_u; z_w]`` of shape ``(b, m + r)`` (see module docstring)."""
        m = yf.shape[-1]
        zu, zw = z[..., :m], z[..., m:]
        if self.hess_mode == "exact":
            # reverse-over-reverse (H is symmetric): no forward-mode levels, so calls from several threads are safe
            hz = vjp(lambda u: batch_grad(lambda t: self.lagrangian(tensors, t, nu), u), yf)[1](zu)[0]
        elif self.hess_mode == "identity":
            hz = zu
        elif self.hess_mode == "diagonal":
            hz = self.hess_diag * zu
        else:
            raise ValueError(f"unknown Hessian mode {self.hess_mode!r}")
        if self.gamma:
            hz = hz + self.gamma * zu
        if not self.num_constraints:
            return hz
        maskf = mask.to(yf.dtype)
        cfun = lambda t: self.c(tensors, t)  # noqa: E731
        cval, vjp_fn = vjp(cfun, yf)
        jz = vjp(lambda w: vjp_fn(w)[0], torch.zeros_like(cval))[1](zu)[0]  # J z as the VJP of w -> J^T w
        jtw = vjp_fn(zw * maskf)[0]
        return torch.cat([hz + jtw, maskf * jz - (maskf == 0).to(yf.dtype) * zw], -1)


@dataclass
class ConstraintState:
    """Constraint values ``(b, r)``, Jacobian ``(b, r, m)``, active mask ``(b, r)``, multipliers ``(b, r)`` and
    non-regularity flags ``(b,)`` (``vanishing``, ``dependent``, ``weak``), for the constraints divided by
    ``cscale`` ``(b, r)`` (see :func:`constraint_state`)."""

    cval: Tensor
    jac: Tensor
    mask: Tensor
    nu: Tensor
    vanishing: Tensor
    dependent: Tensor
    weak: Tensor
    dual_infeasible: Tensor
    cscale: Optional[Tensor] = None

    @property
    def weights(self) -> Tensor:
        """``(b, r)``: ``cscale`` on the active constraints, 0 on the inactive ones: the rows of the KKT system
        are the active constraints divided by their gradient norms (see :func:`constraint_state`)."""
        w = self.mask.to(self.jac.dtype)
        return w if self.cscale is None else w * self.cscale


def default_active_tol(dtype: torch.dtype) -> float:
    return 1e-6 if dtype == torch.float64 else 1e-3


def constraint_state(bp: BoundProblem, tensors: Sequence[Tensor], yf: Tensor, nu: Optional[Tensor],
                     active_tol: Optional[float] = None) -> ConstraintState:
    """Active set, multipliers and regularity at ``y``, invariant to how each constraint is scaled.

    Each constraint ``c_i`` is divided by the norm of its gradient at ``y`` (``cscale``, a constant; a vanishing
    gradient keeps scale 1) for every test below and, through :attr:`ConstraintState.weights`, in the rows of the
    KKT system, so multiplying a constraint by any positive constant changes neither the gradient nor the
    verdicts. ``nu`` is returned for the constraints as written.

    * An inequality is active when its distance to the boundary, ``g_i / ||grad g_i||``, is at least
      ``-tol (1 + ||y||)``.
    * Multipliers are taken from ``nu`` (convention ``grad f = J^T nu``) or recovered as the least-squares
      (pseudo-inverse) solution over the active constraints.
    * A constraint gradient vanishes when it is small against the change of the gradient over the scale of ``y``:
      ``||grad c_i|| <= sqrt(eps) ||(grad^2 c_i) y||`` (and when it is exactly zero); linear constraints never
      vanish.
    * Active constraints are dependent when the Gram matrix of the normalised active rows is singular.
    * An active inequality is weak when ``|nu_i| <= weak_tol max(||grad f||, max_j |nu_j|)``.
    """
    tol = default_active_tol(yf.dtype) if active_tol is None else active_tol
    p, r = bp.num_eq, bp.num_constraints
    cfun = lambda t: bp.c(tensors, t)  # noqa: E731
    cval, jac = batch_jacobian(cfun, yf)
    eps = torch.finfo(yf.dtype).eps
    tiny = torch.finfo(yf.dtype).tiny
    gnorm = jac.norm(dim=-1)  # (b, r)
    vanishing_i = gnorm <= tiny
    if bool((gnorm < 1e-3).any()):
        # only small gradients can vanish relative to their curvature along y, (grad^2 c_i) y: one forward-mode
        # product of the Jacobian, skipped when no gradient is small
        yc = yf.detach()
        curv = batch_jacobian(lambda t: (batch_jacobian(cfun, t)[1] @ yc.unsqueeze(-1)).squeeze(-1), yf)[1]
        curv = curv.norm(dim=-1)  # (b, r): rows (grad^2 c_i) y, by reverse-over-reverse (thread safe)
        vanishing_i = vanishing_i | (gnorm <= eps ** 0.5 * curv)
    cscale = torch.where(vanishing_i, torch.ones_like(gnorm), 1.0 / gnorm.clamp_min(tiny)).detach()
    cval_s, jac_s = cval * cscale, jac * cscale[..., None]
    gnorm_s = torch.where(vanishing_i, gnorm, torch.ones_like(gnorm))
    ynorm = yf.norm(dim=-1, keepdim=True)
    mask = torch.ones_like(cval, dtype=torch.bool)
    if r > p:
        ineq_active = cval_s[:, p:] >= -tol * (1 + ynorm)
        mask = torch.cat([mask[:, :p], ineq_active], -1)
    maskf = mask.to(yf.dtype)
    jm = jac_s * maskf[..., None]
    gram = jm @ jm.transpose(-1, -2)
    gf = batch_grad(lambda t: bp.f(tensors, t), yf) if (nu is None or r > p) else None
    if nu is None:
        rhs = (jm @ gf.unsqueeze(-1)).squeeze(-1)
        gram_reg = gram + torch.diag_embed(1 - maskf)
        nu_s = (torch.linalg.pinv(gram_reg, hermitian=True, rtol=1e-10 if yf.dtype == torch.float64 else 1e-5)
                @ rhs.unsqueeze(-1)).squeeze(-1)
    else:
        nu_s = nu.reshape(yf.shape[0], r).to(yf.dtype) / cscale
    nu_s = nu_s * maskf
    vanishing = (vanishing_i & mask).any(-1)
    evals = torch.linalg.eigvalsh(gram + torch.diag_embed(1 - maskf))
    dependent = (evals.amin(-1) <= r * 100 * eps) & ~vanishing
    weak = torch.zeros_like(vanishing)
    dual_infeasible = torch.zeros(yf.shape[0], dtype=yf.dtype, device=yf.device)
    if r > p:
        nu_ineq = nu_s[:, p:]
        size = torch.maximum(gf.norm(dim=-1), nu_s.abs().amax(-1)).clamp_min(tiny)[:, None]
        weak_tol = 1e-8 if yf.dtype == torch.float64 else 1e-4
        weak = ((nu_ineq.abs() * gnorm_s[:, p:] <= weak_tol * size) & mask[:, p:]).any(-1)
        dual_infeasible = nu_ineq.clamp_min(0).norm(dim=-1)
    return ConstraintState(cval, jac, mask, nu_s * cscale, vanishing, dependent, weak, dual_infeasible, cscale)


class ImplicitSolve(torch.autograd.Function):
    """``z = K(y, nu, x)^{-1} rhs`` for the symmetric KKT operator of a :class:`BoundProblem`.

    Differentiable in every argument by the implicit rule ``d z = K^-1 (d rhs - dK z)``, itself computed with
    another :class:`ImplicitSolve`, so derivatives of any order are exact. Under ``torch.func.vmap`` the vmapped
    dimension is folded into the batch (elements are independent).
    """

    @staticmethod
    def forward(bp: BoundProblem, rhs: Tensor, yf: Tensor, nu: Optional[Tensor], mask: Optional[Tensor],
                *tensors: Tensor) -> Tensor:
        z, info = _solve_kkt(bp, rhs, yf, nu, mask, tensors)
        bp.infos.append(info)
        return z

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        bp, rhs, yf, nu, mask, *tensors = inputs
        ctx.bp = bp
        ctx.has_nu, ctx.has_mask = nu is not None, mask is not None
        ctx.save_for_backward(output, yf, nu if nu is not None else yf.new_zeros(0),
                              mask if mask is not None else yf.new_zeros(0, dtype=torch.bool), *tensors)

    @staticmethod
    def backward(ctx: Any, zbar: Tensor) -> tuple:
        z, yf, nu, mask, *tensors = ctx.saved_tensors
        bp: BoundProblem = ctx.bp
        nu = nu if ctx.has_nu else None
        mask = mask if ctx.has_mask else None
        a = ImplicitSolve.apply(bp, zbar, yf, nu, mask, *tensors)
        need = ctx.needs_input_grad
        grads: list = [None, a if need[1] else None, None, None, None] + [None] * len(tensors)
        diff_idx = [i for i in range(2, 5 + len(tensors)) if need[i] and i != 4]
        if diff_idx:
            args = [None, None, yf, nu, mask, *tensors]

            def kz(*diff_args: Tensor) -> Tensor:
                full = list(args)
                for i, val in zip(diff_idx, diff_args):
                    full[i] = val
                return bp.kkt_matvec(full[5:], full[2], full[3], full[4], z)

            _, vjp_fn = vjp(kz, *[args[i] for i in diff_idx])
            for i, g in zip(diff_idx, vjp_fn(a)):
                grads[i] = -g
        return tuple(grads)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, bp: BoundProblem, *args: Any) -> tuple:
        return fold_vmap(lambda *a: ImplicitSolve.apply(bp, *a), info, in_dims[1:], args)


def fold_vmap(apply: Any, info: Any, in_dims: Sequence[Optional[int]], args: Sequence[Any],
              keep: frozenset = frozenset()) -> tuple:
    """A vmap rule for batched autograd Functions: fold the vmapped dimension into the leading batch dimension.

    Every tensor argument has the node's batch dimension first; the vmapped dimension is moved to the front (or
    expanded when absent) and merged with it, the function runs once on ``B * b`` elements, and outputs are split.
    Arguments at the positions in ``keep`` (inputs shared by the whole batch) are passed unchanged; they must not
    be vmapped.
    """
    size = info.batch_size
    folded = []
    for i, (a, d) in enumerate(zip(args, in_dims)):
        if i in keep and isinstance(a, Tensor):
            if d is not None:
                raise DDNError(f"torch.func.vmap over input {i}, which the node shares across its batch, is not "
                               f"supported; give it a batch dimension instead")
            folded.append(a)
            continue
        if isinstance(a, Tensor):
            a = a.movedim(d, 0) if d is not None else a.unsqueeze(0).expand(size, *a.shape)
            a = a.reshape(size * a.shape[1], *a.shape[2:]) if a.dim() > 1 else a.reshape(-1)
        folded.append(a)
    out = apply(*folded)

    def unfold(t: Tensor) -> Tensor:
        return t.reshape(size, t.shape[0] // size, *t.shape[1:])

    if isinstance(out, tuple):
        return tuple(unfold(t) for t in out), tuple(0 for _ in out)
    return unfold(out), 0


def cached_kkt_matvec(bp: BoundProblem, tensors: Sequence[Tensor], yf: Tensor, nu: Optional[Tensor],
                      mask: Optional[Tensor]) -> Callable[[Tensor], Tensor]:
    """``z -> K z`` at fixed ``(x, y, nu)``, with the work that does not depend on ``z`` done once.

    The Hessian-vector product is a VJP of the gradient whose graph is built once (reverse-over-reverse with
    reuse: about a third of the cost of recomputing forward-over-reverse each time), and the constraint Jacobian
    is formed once (``r`` VJPs) so that ``J z`` and ``J^T w`` are small matrix products.
    """
    m, r = yf.shape[-1], bp.num_constraints
    hess = _hessian_only(bp, tensors, yf, nu)
    if not r:
        return hess
    maskf = mask.to(yf.dtype)
    _, jac = batch_jacobian(lambda t: bp.c(tensors, t), yf)
    jm = jac * maskf[..., None]

    def matvec(z: Tensor) -> Tensor:
        zu, zw = z[..., :m], z[..., m:]
        top = hess(zu) + (jm.transpose(-1, -2) @ zw.unsqueeze(-1)).squeeze(-1)
        bottom = (jm @ zu.unsqueeze(-1)).squeeze(-1) - (maskf == 0).to(yf.dtype) * zw
        return torch.cat([top, bottom], -1)

    return matvec


def _hessian_only(bp: BoundProblem, tensors: Sequence[Tensor], yf: Tensor, nu: Optional[Tensor]
                  ) -> Callable[[Tensor], Tensor]:
    """``z -> (H + gamma I) z`` for the Lagrangian at fixed ``(x, y, nu)`` (graph built once for ``"exact"``)."""
    gamma = bp.gamma
    if bp.hess_mode == "exact":
        _, hvp_fn = vjp(lambda u: batch_grad(lambda t: bp.lagrangian(tensors, t, nu), u), yf)
        hess = lambda z: hvp_fn(z)[0]  # noqa: E731  (H is symmetric: its VJP is its product)
    elif bp.hess_mode == "identity":
        hess = lambda z: z  # noqa: E731
    elif bp.hess_mode == "diagonal":
        hess = lambda z: bp.hess_diag * z  # noqa: E731
    else:
        raise ValueError(f"unknown Hessian mode {bp.hess_mode!r}")
    return (lambda z: hess(z) + gamma * z) if gamma else hess


def _solve_kkt(bp: BoundProblem, rhs: Tensor, yf: Tensor, nu: Optional[Tensor], mask: Optional[Tensor],
               tensors: Sequence[Tensor]) -> tuple[Tensor, linalg.LinearSolveInfo]:
    m, r = yf.shape[-1], bp.num_constraints
    psd = r == 0 and bp.hess_mode in ("exact", "identity", "diagonal")
    matvec = cached_kkt_matvec(bp, tensors, yf, nu, mask)
    method = bp.method
    diagonal = None
    if r == 0 and bp.hess_mode == "identity":
        diagonal = torch.full_like(yf, 1.0 + bp.gamma)
    elif r == 0 and bp.hess_mode == "diagonal":
        diagonal = bp.hess_diag + bp.gamma
    elif r == 0 and callable(getattr(bp.node, "hessian_diagonal", None)):
        diagonal = lambda: _user_hessian_diagonal(bp, tensors, yf)  # noqa: E731
    elif r == 0 and getattr(method, "precond", None) == "jacobi":
        diagonal = lambda: _exact_hessian_diagonal(matvec, yf)  # noqa: E731  (asked for: m products)
    op = linalg.LinearOperator(matvec, m + r, symmetric=True, psd=psd, diagonal=diagonal)
    if isinstance(method, str) and method == "auto":
        method = "dense" if m + r <= bp.dense_max else ("cg" if psd else "minres")
    if r > 0 and ((isinstance(method, str) and method == "cg") or isinstance(method, linalg.CG)):
        return _schur_cg(bp, rhs, yf, nu, mask, tensors, method)
    if isinstance(method, str) and method == "cg" and diagonal is not None:
        method = linalg.CG(precond="jacobi")  # the default CG is preconditioned with the Hessian's diagonal
    return linalg.solve(op, rhs, method, bp.tol, bp.max_iter, bp.dense_max)


def _user_hessian_diagonal(bp: BoundProblem, tensors: Sequence[Tensor], yf: Tensor) -> Tensor:
    """The node's ``hessian_diagonal(*xs, y) -> (b, *y.shape[1:])`` hook, flattened, plus ``gamma``."""
    d = bp.node.hessian_diagonal(*bp.inputs(tensors), y=bp.unflatten(yf))
    return d.reshape(yf.shape) + bp.gamma


def _exact_hessian_diagonal(matvec: Callable[[Tensor], Tensor], yf: Tensor, chunk: int = 64) -> Tensor:
    """The exact diagonal of ``H`` from ``m`` Hessian-vector products, vmapped in chunks (asked for explicitly by
    ``precond="jacobi"`` on a node without a ``hessian_diagonal`` hook; costs about one dense assembly)."""
    b, m = yf.shape
    out = []
    for start in range(0, m, chunk):
        idx = torch.arange(start, min(start + chunk, m), device=yf.device)
        basis = torch.zeros(len(idx), b, m, dtype=yf.dtype, device=yf.device)
        basis[torch.arange(len(idx)), :, idx] = 1.0
        cols = torch.vmap(matvec)(basis)  # (k, b, m)
        out.append(cols[torch.arange(len(idx)), :, idx].transpose(0, 1))
    return torch.cat(out, 1)


def _schur_cg(bp: BoundProblem, rhs: Tensor, yf: Tensor, nu: Optional[Tensor], mask: Tensor,
              tensors: Sequence[Tensor], solver: Any = "cg") -> tuple[Tensor, linalg.LinearSolveInfo]:
    """Constrained solve with CG on ``H`` only: ``(J_M H^-1 J_M^T + (I - M)) w = J_M H^-1 a - c``,
    ``u = H^-1 (a - J_M^T w)``, with the ``r + 1`` CG solves batched together."""
    m, r = yf.shape[-1], bp.num_constraints
    a, cc = rhs[..., :m], rhs[..., m:]
    maskf = mask.to(yf.dtype)
    _, jac = batch_jacobian(lambda t: bp.c(tensors, t), yf)
    jm = jac * maskf[..., None]  # (b, r, m)
    hmv = _hessian_only(bp, tensors, yf, nu)
    rhs_all = torch.cat([a.unsqueeze(0), jm.transpose(0, 1)], 0)  # (r + 1, b, m)
    sol, info = linalg.solve(linalg.LinearOperator(torch.vmap(hmv), m, True, True), rhs_all, solver, bp.tol,
                             bp.max_iter)
    if bool(info.indefinite.any()):
        op = linalg.LinearOperator(cached_kkt_matvec(bp, tensors, yf, nu, mask), m + r, True, False)
        return linalg.solve(op, rhs, "minres", bp.tol, bp.max_iter)
    hinv_a, hinv_jt = sol[0], sol[1:].transpose(0, 1)  # (b, m), (b, r, m)
    schur = jm @ hinv_jt.transpose(-1, -2) + torch.diag_embed((maskf == 0).to(yf.dtype))
    srhs = (jm @ hinv_a.unsqueeze(-1)).squeeze(-1) - cc
    w, singular, _ = linalg.pinv_solve_symmetric(schur, srhs)
    u = hinv_a - (hinv_jt.transpose(-1, -2) @ w.unsqueeze(-1)).squeeze(-1)
    z = torch.cat([u, w], -1)
    res = (bp.kkt_matvec(tensors, yf, nu, mask, z) - rhs).norm(dim=-1) / rhs.norm(dim=-1).clamp_min(
        torch.finfo(rhs.dtype).tiny)
    its = info.iterations.amax(0)
    return z, linalg.LinearSolveInfo(res, its, singular, info.indefinite.any(0), "cg")


def implicit_vjp(bp: BoundProblem, tensors: Sequence[Tensor], need: Sequence[bool], yf: Tensor, vf: Tensor,
                 state: Optional[ConstraintState], cache: Optional["ImplicitCache"] = None,
                 key: Optional[Tensor] = None) -> list[Optional[Tensor]]:
    """Vector-Jacobian products ``v^T dy/dx_k`` for each tensor input ``k`` with ``need[k]``.

    Cost: one KKT solve (dense: ``m + r`` vmapped Hessian-vector products and an ``O((m + r)^3)`` factorisation;
    matrix-free: one Hessian-vector product per CG/MINRES iteration) plus one mixed second-derivative product.
    """
    r = bp.num_constraints
    nu = state.nu if state is not None else None
    mask = state.weights if state is not None else None
    z = cache.get(key) if cache is not None else None
    if z is None:
        rhs = vf if r == 0 else torch.cat([vf, vf.new_zeros(vf.shape[0], r)], -1)
        z = ImplicitSolve.apply(bp, rhs, yf, nu, mask, *tensors)
        if cache is not None:
            cache.put(key, z)
    m = yf.shape[-1]
    u, w = z[:, :m], z[:, m:]
    idx = [k for k, n in enumerate(need) if n]
    if not idx:
        return [None] * len(tensors)

    def phi(*diff: Tensor) -> Tensor:
        ts = list(tensors)
        for k, t in zip(idx, diff):
            ts[k] = t
        gl = grad(lambda t: bp.lagrangian(ts, t, nu).sum())(yf)
        val = (gl * u).sum()
        if r:
            val = val + (bp.c(ts, yf) * mask.to(yf.dtype) * w).sum()
        return val

    grads = grad(phi, argnums=tuple(range(len(idx))))(*[tensors[k] for k in idx])
    out: list[Optional[Tensor]] = [None] * len(tensors)
    for k, g in zip(idx, grads):
        out[k] = -g
    return out


def warn_nonregular(node_name: str, nonregular: Tensor, state: Optional[ConstraintState],
                    indefinite: Optional[Tensor] = None) -> None:
    """Warn, naming the condition and the elements, where the backward used the minimum-norm policy."""
    conditions = []
    if state is not None:
        for flag, text in ((state.vanishing, "a vanishing constraint gradient"),
                           (state.dependent, "linearly dependent active constraints"),
                           (state.weak, "weakly active inequality constraints (zero multiplier): the gradient does "
                                        "not exist there; the one-sided gradient with the constraint held active "
                                        "is returned")):
            if bool(flag.any()):
                conditions.append(f"{text} at elements {element_list(flag)}")
    other = nonregular
    if state is not None:
        other = nonregular & ~(state.vanishing | state.dependent)
    if indefinite is not None and bool(indefinite.any()):
        conditions.append(f"an indefinite Hessian (y may not be a local minimum) at elements {element_list(indefinite)}")
        other = other & ~indefinite
    if bool(other.any()):
        conditions.append(f"a singular Hessian (or KKT matrix) at elements {element_list(other)}")
    if conditions:
        warnings.warn(f"{node_name}: non-regular solution: " + "; ".join(conditions)
                      + ". Returning the minimum-norm (pseudo-inverse) gradient.", NonRegularWarning, stacklevel=4)


# ---------------------------------------------------------------------------------------------------------------
# Gradients for every tensor a node depends on: the implicit rule attached by ordinary autograd
# ---------------------------------------------------------------------------------------------------------------

class ImplicitRule:
    """The implicit rule of a node at its solution, for tensors that autograd reaches only through its functions.

    A node's solution ``y*`` satisfies an optimality condition ``q(theta, z*) = 0`` (``z* = y*``, or ``(y*, nu*)``
    for constrained problems) whose Jacobian ``A = dq/dz`` is invertible. For any tensor ``theta`` the node's
    functions use -- a node's ``nn.Parameter``, a buffer, a tensor captured by a closure, an input shared by the
    whole batch -- the implicit function theorem gives ``dz = -A^{-1} (dq/dtheta) dtheta``. The node evaluates
    ``q`` once at the solution *with* autograd (``theta`` live, the solution and the batched inputs constant) and
    returns ``y* + AttachImplicit(rule, q - q.detach())``: the added term is zero in value, and its backward maps
    the incoming ``v`` to ``q_bar = -A^{-T} E v`` (``E`` embeds ``v`` into ``z``'s space), after which ordinary
    autograd computes ``theta_bar = (dq/dtheta)^T q_bar`` for every such tensor at once. Shared tensors are thus
    never expanded to the batch: their gradient is one reduction and costs ``O(size of theta)`` memory.

    Subclasses implement :meth:`adjoint` (``v -> q_bar``), :meth:`tangent` (``dq -> dy``, forward mode) and
    :meth:`fold` (repeat the rule's per-element data ``k`` times, for ``torch.func.vmap``).
    """

    yshape: torch.Size

    def adjoint(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def tangent(self, dq: Tensor) -> Tensor:
        raise NotImplementedError

    def fold(self, k: int) -> "ImplicitRule":
        raise NotImplementedError


class AttachImplicit(torch.autograd.Function):
    """``AttachImplicit.apply(rule, dq) -> 0`` of the solution's shape; backward ``v -> rule.adjoint(v)``, forward
    mode ``dq -> rule.tangent(dq)`` (see :class:`ImplicitRule`)."""

    @staticmethod
    def forward(rule: ImplicitRule, dq: Tensor) -> Tensor:
        return dq.new_zeros(rule.yshape)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple, output: Tensor) -> None:
        ctx.rule = inputs[0]

    @staticmethod
    def backward(ctx: Any, v: Tensor) -> tuple:
        return None, ctx.rule.adjoint(v)

    @staticmethod
    def jvp(ctx: Any, rule_t: Any, dq: Tensor) -> Tensor:
        return ctx.rule.tangent(dq)

    @staticmethod
    def vmap(info: Any, in_dims: tuple, rule: ImplicitRule, dq: Tensor) -> tuple:
        size = info.batch_size
        d = in_dims[1]
        dq = dq.movedim(d, 0) if d is not None else dq.unsqueeze(0).expand(size, *dq.shape)
        out = AttachImplicit.apply(rule.fold(size), dq.reshape(size * dq.shape[1], *dq.shape[2:]))
        return out.reshape(size, out.shape[0] // size, *out.shape[1:]), 0


def is_live(t: Any) -> bool:
    """Whether ``t`` carries a derivative of any kind: autograd (``requires_grad``), a forward-mode dual, or a
    ``torch.func`` gradient/JVP level."""
    if not isinstance(t, Tensor):
        return False
    if t.requires_grad:
        return True
    ft = torch._C._functorch
    while ft.is_functorch_wrapped_tensor(t):
        if ft.is_gradtrackingtensor(t):
            return True
        t = ft.get_unwrapped(t)
    if t.requires_grad:
        return True
    return torch.autograd.forward_ad.unpack_dual(t).tangent is not None


def shared_positions(xs: Sequence[Any]) -> frozenset:
    """Positions of tensor inputs without the batch dimension: 0-d tensors, and tensors whose leading size differs
    from that of the first tensor input with at least one dimension."""
    b = next((x.shape[0] for x in xs if isinstance(x, Tensor) and x.dim() > 0), None)
    return frozenset(i for i, x in enumerate(xs)
                     if isinstance(x, Tensor) and (x.dim() == 0 or x.shape[0] != b))


class ImplicitCache:
    """Shares one adjoint solve between the explicit-input backward and the attached rule of the same call: both
    receive the same incoming gradient object."""

    __slots__ = ("v", "version", "value")

    def __init__(self) -> None:
        self.v: Optional[Tensor] = None
        self.version = -1
        self.value: Optional[Tensor] = None

    def get(self, v: Optional[Tensor]) -> Optional[Tensor]:
        if v is None or self.v is None:
            return None
        if self.v is v and self.version == v._version:
            return self.value
        # autograd may hand the two branches equal gradients in different tensors (e.g. made contiguous)
        if self.v.shape == v.shape and self.v.dtype == v.dtype and self.v.device == v.device and \
                bool(torch.equal(self.v, v)):
            return self.value
        return None

    def put(self, v: Optional[Tensor], value: Tensor) -> None:
        if v is not None:
            self.v, self.version, self.value = v.detach().clone(), v._version, value


class KKTRule(ImplicitRule):
    """:class:`ImplicitRule` of an optimisation node: ``q = [grad_y L; M c]`` and ``A = K``, the masked KKT matrix
    of :class:`ImplicitSolve` (Props. 4.4-4.6), so ``q_bar = -K^{-1} [v; 0]`` and ``dy = -[K^{-1} dq]_y``."""

    def __init__(self, node: Any, bp: BoundProblem, tensors: Sequence[Tensor], yf: Tensor,
                 state: Optional[ConstraintState], yshape: torch.Size, cache: Optional[ImplicitCache]) -> None:
        self.node, self.bp, self.tensors, self.yf, self.state = node, bp, list(tensors), yf, state
        self.yshape, self.cache = torch.Size(yshape), cache

    def _solve(self, rhs: Tensor) -> Tensor:
        st = self.state
        return ImplicitSolve.apply(self.bp, rhs, self.yf, None if st is None else st.nu,
                                   None if st is None else st.weights, *self.tensors)

    def adjoint(self, v: Tensor) -> Tensor:
        z = self.cache.get(v) if self.cache is not None else None
        if z is None:
            b = self.yf.shape[0]
            vf = v.reshape(b, -1).to(self.yf.dtype)
            r = self.bp.num_constraints
            rhs = vf if r == 0 else torch.cat([vf, vf.new_zeros(b, r)], -1)
            z = self._solve(rhs)
            self.node._record_backward(self.bp, self.state, b)
            if self.cache is not None:
                self.cache.put(v, z)
        return -z

    def tangent(self, dq: Tensor) -> Tensor:
        z = self._solve(dq.to(self.yf.dtype))
        return -z[:, :self.yf.shape[1]].reshape(self.yshape)

    def fold(self, k: int) -> "KKTRule":
        st = self.state
        rep = lambda t: t.repeat(k, *([1] * (t.dim() - 1)))  # noqa: E731
        if st is not None:
            st = ConstraintState(*(rep(getattr(st, f)) for f in ConstraintState.__dataclass_fields__))
        return KKTRule(self.node, self.bp, [rep(t) for t in self.tensors], rep(self.yf), st,
                       torch.Size((k * self.yshape[0], *self.yshape[1:])), None)


def kkt_residual_live(bp: BoundProblem, tensors: Sequence[Tensor], yf: Tensor, state: Optional[ConstraintState]
                      ) -> Tensor:
    """``q = [grad_y L(x, y, nu); M c(x, y)]`` at a constant ``y``, differentiable in every tensor the node's
    functions use except ``y`` (``torch.func.grad`` keeps the outer autograd graph of captured tensors)."""
    nu = state.nu if state is not None else None
    gl = grad(lambda t: bp.lagrangian(tensors, t, nu).sum())(yf)
    if not bp.num_constraints:
        return gl
    return torch.cat([gl, bp.c(tensors, yf) * state.weights], -1)
