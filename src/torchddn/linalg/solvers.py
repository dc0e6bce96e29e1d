"""Linear solvers as values: ``solver(op, b) -> (x, LinearSolveInfo)``.

A solver value is a small frozen dataclass holding its options (:class:`Dense`, :class:`CG`, :class:`MINRES`,
:class:`GMRES`, :class:`BiCGStab`, :class:`Neumann`, :class:`Auto`, :class:`UserSolver`); calling it on a tagged
:class:`~torchddn.linalg.LinearOperator` and right-hand sides ``b`` of shape ``(*batch, n)`` solves every element,
each converging independently, and reports true residuals. Singular elements get the minimum-norm
(least-squares) solution and are flagged ``nonregular``; no solver returns NaN for finite input.
:func:`as_solver` turns the string shorthands (and user callables ``fn(matvec, b) -> x``) into values;
:func:`solve` and :func:`transpose_solve` are the entry points.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Callable, ClassVar, Optional, Union

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError, element_list
from torchddn.linalg._common import LinearSolveInfo, _flags, _merge, _relres_mv, default_tol
from torchddn.linalg.dense import dense_solve, dense_solve_general
from torchddn.linalg.krylov import bicgstab, cg, cgls, gmres, minres, neumann
from torchddn.linalg.operators import LinearOperator

__all__ = ["LinearSolver", "Dense", "CG", "MINRES", "GMRES", "BiCGStab", "Neumann", "Auto", "UserSolver",
           "as_solver", "solve", "transpose_solve", "SOLVER_NAMES", "Precond"]

#: A preconditioner: a callable ``(*batch, n) -> (*batch, n)`` applying ``M^{-1}``, a :class:`LinearOperator`
#: applying ``M^{-1}``, a tensor ``(*batch, n)`` of diagonal ``M^{-1}`` entries, or ``"jacobi"``
#: (``M = |diag(A)|`` from the operator's ``diagonal``; zero entries count as one).
Precond = Union[None, str, Tensor, LinearOperator, Callable[[Tensor], Tensor]]


def _name(v: Any) -> str:
    if isinstance(v, (str, int, float, bool)) or v is None:
        return repr(v)
    if isinstance(v, Tensor):
        return f"tensor{tuple(v.shape)}"
    return getattr(v, "__name__", None) or repr(v)


class LinearSolver:
    """Base class of the solver values. A subclass defines ``__call__(op, b) -> (x, LinearSolveInfo)``; the
    ``repr`` lists the options that differ from their defaults, e.g. ``CG(precond='jacobi')``."""

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        raise NotImplementedError

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if v is not f.default and not (isinstance(v, (str, int, float)) and v == f.default):
                parts.append(f"{f.name}={_name(v)}")
        return f"{type(self).__name__}({', '.join(parts)})"


def _check(op: Any, b: Any, who: str) -> None:
    if not isinstance(op, LinearOperator):
        raise DDNError(f"{who}: op must be a torchddn.linalg.LinearOperator, got {type(op).__name__}")
    if not isinstance(b, Tensor) or not b.is_floating_point() or b.dim() < 1 or b.shape[-1] != op.n:
        got = f"shape {tuple(b.shape)}, dtype {b.dtype}" if isinstance(b, Tensor) else type(b).__name__
        raise DDNError(f"{who}: b must be a floating point tensor of shape (*batch, {op.n}), got {got}")


def _need_symmetric(op: LinearOperator, who: str) -> None:
    if not op.symmetric:
        raise DDNError(f"{who} needs a symmetric operator but op is tagged symmetric=False; use GMRES(), "
                       f"BiCGStab() or Dense()")


def _resolve_precond(precond: Precond, op: LinearOperator, b: Tensor, who: str
                     ) -> Optional[Callable[[Tensor], Tensor]]:
    """The callable ``r -> M^{-1} r`` for a preconditioner spec (``None`` for none)."""
    if precond is None:
        return None
    if isinstance(precond, str):
        if precond != "jacobi":
            raise DDNError(f"{who}: precond must be 'jacobi', a callable, a LinearOperator or a tensor, got "
                           f"{precond!r}")
        d = op.diag(b)
        if d is None:
            raise DDNError(f"{who}: precond='jacobi' needs the operator's diagonal; build the operator with "
                           f"LinearOperator(..., diagonal=d) or pass a callable preconditioner")
        return _jacobi(d)
    if isinstance(precond, LinearOperator):
        return precond.matvec
    if isinstance(precond, Tensor):
        minv = precond.to(dtype=b.dtype, device=b.device)
        return lambda r: minv * r
    if callable(precond):
        return precond
    raise DDNError(f"{who}: precond must be 'jacobi', a callable, a LinearOperator or a tensor, got "
                   f"{type(precond).__name__}")


def _jacobi(d: Tensor) -> Callable[[Tensor], Tensor]:
    ad = d.abs()
    ok = (ad > torch.finfo(d.dtype).tiny) & torch.isfinite(ad)
    minv = torch.where(ok, 1.0 / torch.where(ok, ad, torch.ones_like(ad)), torch.ones_like(ad))
    return lambda r: minv * r


def _flat(matvec: Callable[[Tensor], Tensor], b: Tensor) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """View ``(*batch, n)`` systems as ``(B, n)`` for the solvers written on 2-D batches."""
    if b.dim() == 2:
        return matvec, b
    shape, n = b.shape, b.shape[-1]
    return (lambda z: matvec(z.reshape(shape)).reshape(-1, n)), b.reshape(-1, n)


def _unflat(x: Tensor, info: LinearSolveInfo, shape: torch.Size) -> tuple[Tensor, LinearSolveInfo]:
    if len(shape) == 2:
        return x, info
    bs = shape[:-1]
    conv = None if info.converged is None else info.converged.reshape(bs)
    return x.reshape(shape), LinearSolveInfo(info.residual.reshape(bs), info.iterations.reshape(bs),
                                             info.nonregular.reshape(bs), info.indefinite.reshape(bs), info.method,
                                             conv)


def _finish(info: LinearSolveInfo, tol: float, method: Optional[str] = None) -> LinearSolveInfo:
    conv = (info.residual <= 10 * tol) | info.nonregular
    return LinearSolveInfo(info.residual, info.iterations, info.nonregular, info.indefinite,
                           info.method if method is None else method, conv)


def _minres_refined(op: LinearOperator, b: Tensor, tol: float, max_iter: Optional[int],
                    M: Optional[Callable[[Tensor], Tensor]], rounds: int = 3) -> tuple[Tensor, LinearSolveInfo]:
    """MINRES; with a preconditioner its stopping test is in the ``M^{-1}``-norm, so elements whose true
    residual is still above ``tol`` are refined by up to ``rounds`` restarts on the residual equation
    ``A dx = b - A x`` (taken only where they reduce the residual)."""
    x, info = minres(op.matvec, b, tol, max_iter, M)
    if M is None:
        return x, info
    for _ in range(rounds):
        need = (info.residual > tol) & torch.isfinite(info.residual)
        if not bool(need.any()):
            break
        r = torch.where(need[..., None], b - op.matvec(x), torch.zeros_like(b))
        # the correction's tolerance is relative to ||r||: ask for tol ||b|| overall
        rel = (tol * b.norm(dim=-1) / r.norm(dim=-1).clamp_min(torch.finfo(b.dtype).tiny)).clamp(max=0.5)
        dx, info2 = minres(op.matvec, r, float(rel[need].min()), max_iter, M)
        x_new = x + dx
        res_new = _relres_mv(op.matvec, x_new, b)
        better = need & (res_new < info.residual)
        x = torch.where(better[..., None], x_new, x)
        info = LinearSolveInfo(torch.where(better, res_new, info.residual),
                               info.iterations + torch.where(need, info2.iterations + 1,
                                                             torch.zeros_like(info2.iterations)),
                               info.nonregular, info.indefinite, info.method)
        if not bool(better.any()):
            break
    return x, info


def _symmetric_fallbacks(op: LinearOperator, b: Tensor, x: Tensor, info: LinearSolveInfo, tol: float,
                         max_iter: Optional[int], M: Optional[Callable[[Tensor], Tensor]], from_cg: bool
                         ) -> tuple[Tensor, LinearSolveInfo]:
    """CG elements with bad curvature or no convergence are re-solved by MINRES; elements still above ``10 tol``
    (singular and inconsistent, or out of iterations) by MINRES on ``A² x = A b``, which stays in ``range(A)`` and
    so returns the minimum-norm least-squares solution (taken, flagged ``nonregular``, where it converges)."""
    if from_cg:
        failed = info.indefinite | info.nonregular | (info.residual > 10 * tol)
        if bool(failed.any()):
            x2, info2 = _minres_refined(op, b, tol, max_iter, M)
            x, info = _merge(failed, x, info, x2, info2, "cg+minres")
    inconsistent = info.residual > 10 * tol
    if bool(inconsistent.any()):
        x3, info3 = minres(lambda z: op.matvec(op.matvec(z)), op.matvec(b), tol, max_iter)
        res3 = _relres_mv(op.matvec, x3, b)
        # where the normal equations are solved, the system is singular and inconsistent (non-regular); where
        # they are not, the iteration limit was hit: keep whichever answer has the smaller residual
        singular = inconsistent & (info3.residual <= 10 * tol)
        take = singular | (inconsistent & (res3 < info.residual))
        info3 = LinearSolveInfo(res3, 2 * info3.iterations, singular, info.indefinite, info3.method)
        x, info = _merge(take, x, info, x3, info3, info.method + "+lstsq")
    return x, _finish(info, tol)


def _general_fallbacks(op: LinearOperator, b: Tensor, x: Tensor, info: LinearSolveInfo, tol: float,
                       max_iter: Optional[int]) -> tuple[Tensor, LinearSolveInfo]:
    """Elements flagged singular or above ``10 tol`` are re-solved by CGLS (minimum-norm least squares, with
    ``Aᵀ`` from ``op.rmv``); its answer is taken where it is flagged singular-inconsistent or has a smaller
    residual."""
    failed = info.nonregular | (info.residual > 10 * tol)
    if bool(failed.any()):
        x2, info2 = cgls(op.matvec, op.rmv, b, tol, max_iter)
        take = failed & (info2.nonregular | (info2.residual < info.residual))
        x, info = _merge(take, x, info, x2, info2, info.method + "+lstsq")
    return x, _finish(info, tol)


@dataclass(frozen=True, repr=False)
class Dense(LinearSolver):
    """Direct solve. Structured operators use their own direct solve (diagonal ``O(n)``, tridiagonal with
    pivoting ``O(n)``); others are materialized (``n`` products): symmetric PSD by Cholesky, symmetric indefinite
    by eigendecomposition, general by LU; singular elements get the pseudo-inverse solution (flagged
    ``nonregular``). Cost ``O(n^3)`` per element for the dense cases."""

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "Dense")
        out = op.direct_solve(b)
        if out is not None:
            return out
        A = op.materialize(b)
        return dense_solve(A, b, op.psd) if op.symmetric else dense_solve_general(A, b)


@dataclass(frozen=True, repr=False)
class CG(LinearSolver):
    """Preconditioned conjugate gradients for symmetric positive (semi-)definite operators.

    Args:
        tol: relative residual tolerance (default :func:`default_tol`).
        max_iter: default ``10 n + 50``.
        precond: see :data:`Precond`; ``"jacobi"`` uses the operator's diagonal.

    Elements that meet negative or zero curvature, or do not converge, are re-solved by MINRES (flagged
    ``indefinite`` for negative curvature); singular inconsistent ones get the minimum-norm least-squares
    solution. Without a preconditioner a singular consistent system gets its minimum-norm solution (with one,
    the minimum ``M``-norm solution). Cost: one product per iteration for the whole batch.
    """

    tol: Optional[float] = None
    max_iter: Optional[int] = None
    precond: Precond = None

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "CG")
        _need_symmetric(op, "CG")
        tol = default_tol(b.dtype) if self.tol is None else float(self.tol)
        M = _resolve_precond(self.precond, op, b, "CG")
        x, info = cg(op.matvec, b, tol, self.max_iter, M)
        return _symmetric_fallbacks(op, b, x, info, tol, self.max_iter, M, True)


@dataclass(frozen=True, repr=False)
class MINRES(LinearSolver):
    """MINRES for symmetric (possibly indefinite or singular) operators; ``precond`` must be positive definite
    (``"jacobi"`` uses ``|diag(A)|``). Singular consistent systems get the minimum-norm solution (without a
    preconditioner), inconsistent ones the minimum-norm least-squares solution (flagged ``nonregular``).
    Cost: one product per iteration for the whole batch."""

    tol: Optional[float] = None
    max_iter: Optional[int] = None
    precond: Precond = None

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "MINRES")
        _need_symmetric(op, "MINRES")
        tol = default_tol(b.dtype) if self.tol is None else float(self.tol)
        M = _resolve_precond(self.precond, op, b, "MINRES")
        x, info = _minres_refined(op, b, tol, self.max_iter, M)
        return _symmetric_fallbacks(op, b, x, info, tol, self.max_iter, M, False)


def _right_preconditioned(solver: Callable[..., tuple[Tensor, LinearSolveInfo]], op: LinearOperator, b: Tensor,
                          M: Optional[Callable[[Tensor], Tensor]], **kw: Any) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``A M^{-1} u = b``, ``x = M^{-1} u`` (the residual is that of ``A x = b``), on a 2-D view."""
    mv = op.matvec if M is None else (lambda z: op.matvec(M(z)))
    mv2, b2 = _flat(mv, b)
    u, info = solver(mv2, b2, **kw)
    x, info = _unflat(u, info, b.shape)
    if M is not None:
        x = M(x)
        info = LinearSolveInfo(_relres_mv(op.matvec, x, b), info.iterations, info.nonregular, info.indefinite,
                               info.method)
    return x, info


@dataclass(frozen=True, repr=False)
class GMRES(LinearSolver):
    """Restarted GMRES for general (non-symmetric) operators, right-preconditioned by ``precond``.

    Args:
        tol, max_iter: as :func:`~torchddn.linalg.gmres` (``max_iter`` default ``max(10 n, 100)``, at most 2000).
        precond: see :data:`Precond`.
        restart: Krylov dimension per cycle (default ``min(n, 30)``).

    Elements that break down before converging (singular, inconsistent) or stagnate are re-solved by CGLS, the
    minimum-norm least-squares solution (flagged ``nonregular`` when inconsistent). A singular *consistent*
    non-symmetric system gets a solution, not necessarily the minimum-norm one (use :class:`Dense` for that).
    Cost: one product per iteration plus ``O(b n restart)``; memory ``O(b n restart)``.
    """

    tol: Optional[float] = None
    max_iter: Optional[int] = None
    precond: Precond = None
    restart: Optional[int] = None

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "GMRES")
        tol = default_tol(b.dtype) if self.tol is None else float(self.tol)
        M = _resolve_precond(self.precond, op, b, "GMRES")
        x, info = _right_preconditioned(gmres, op, b, M, tol=tol, restart=self.restart, max_iter=self.max_iter)
        return _general_fallbacks(op, b, x, info, tol, self.max_iter)


@dataclass(frozen=True, repr=False)
class BiCGStab(LinearSolver):
    """BiCGStab for general (non-symmetric) operators, right-preconditioned by ``precond``: two products per
    iteration and ``O(n)`` memory per element (against GMRES's ``O(n restart)``). Elements that break down
    repeatedly or do not converge are re-solved by CGLS (minimum-norm least squares), as in :class:`GMRES`."""

    tol: Optional[float] = None
    max_iter: Optional[int] = None
    precond: Precond = None

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "BiCGStab")
        tol = default_tol(b.dtype) if self.tol is None else float(self.tol)
        M = _resolve_precond(self.precond, op, b, "BiCGStab")
        mv = op.matvec if M is None else (lambda z: op.matvec(M(z)))
        u, info = bicgstab(mv, b, tol, self.max_iter)
        x = u if M is None else M(u)
        if M is not None:
            info = LinearSolveInfo(_relres_mv(op.matvec, x, b), info.iterations, info.nonregular,
                                   info.indefinite, info.method)
        return _general_fallbacks(op, b, x, info, tol, self.max_iter)


@dataclass(frozen=True, repr=False)
class Neumann(LinearSolver):
    r"""Damped Neumann series (Richardson iteration) ``x <- x + damping (b - A x)`` from ``x = 0``.

    For a fixed-point system ``A = I - J`` this is ``x <- (1 - damping) x + damping (b + J x)``, the truncated
    series ``sum_k J^k b``. It converges when the spectral radius of ``I - damping A`` is below one.

    Args:
        steps: take exactly ``steps`` steps (the phantom gradient of Geng et al.), or iterate to ``tol``.
        damping: step size.
        tol: relative residual tolerance (default :func:`default_tol`); max_iter: default 500.

    No fallback: non-convergence shows in the residual and ``converged``; a diverging element returns zeros,
    flagged ``nonregular``, never NaN. Cost: one product per step.
    """

    steps: Optional[int] = None
    damping: float = 1.0
    tol: Optional[float] = None
    max_iter: Optional[int] = None

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "Neumann")
        tol = default_tol(b.dtype) if self.tol is None else float(self.tol)
        mv2, b2 = _flat(op.matvec, b)
        x, info = neumann(lambda z: z - mv2(z), b2, tol=tol, damping=self.damping, steps=self.steps,
                          max_iter=500 if self.max_iter is None else int(self.max_iter))
        x, info = _unflat(x, info, b.shape)
        method = "phantom" if self.steps is not None else "neumann"
        res = _relres_mv(op.matvec, x, b)
        return x, LinearSolveInfo(res, info.iterations, info.nonregular, info.indefinite, method,
                                  (res <= 10 * tol) & ~info.nonregular)


@dataclass(frozen=True, repr=False)
class Auto(LinearSolver):
    """Choose by structure, size and tags: the direct solve for diagonal and tridiagonal operators and for
    ``n <= dense_max``; otherwise :class:`CG` for symmetric PSD operators (Jacobi-preconditioned when the
    operator knows its diagonal and ``precond="auto"``), :class:`MINRES` for symmetric indefinite ones and
    :class:`GMRES` for general ones. An explicit ``precond`` (``None`` for none) is passed to whichever iterative
    solver is chosen."""

    dense_max: int = 128
    tol: Optional[float] = None
    max_iter: Optional[int] = None
    precond: Precond = "auto"

    def choose(self, op: LinearOperator) -> LinearSolver:
        """The solver value ``Auto`` would use for ``op``."""
        if op.kind in ("diagonal", "tridiagonal") or op.n <= self.dense_max:
            return Dense()
        auto = isinstance(self.precond, str) and self.precond == "auto"
        if op.symmetric and op.psd:
            pc = ("jacobi" if op.diagonal is not None else None) if auto else self.precond
            return CG(self.tol, self.max_iter, pc)
        pc = None if auto else self.precond
        if op.symmetric:
            return MINRES(self.tol, self.max_iter, pc)
        return GMRES(self.tol, self.max_iter, pc)

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "Auto")
        return self.choose(op)(op, b)


@dataclass(frozen=True, repr=False)
class UserSolver(LinearSolver):
    """Wrap a user callable ``fn(matvec, b) -> x`` (or ``-> (x, anything)``) with ``b`` and ``x`` of shape
    ``(*batch, n)``. The residual is measured with one product; ``converged`` means ``residual <= 10 tol``.
    A wrong shape or NaN/Inf in ``x`` raises :class:`~torchddn.diagnostics.DDNError` naming the elements."""

    fn: Callable[..., Any]
    tol: Optional[float] = None

    def __call__(self, op: LinearOperator, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        _check(op, b, "UserSolver")
        name = _name(self.fn)
        out = self.fn(op.matvec, b)
        x = out[0] if isinstance(out, tuple) else out
        if not isinstance(x, Tensor) or x.shape != b.shape:
            got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise DDNError(f"user linear solver {name} must return x of the shape of b, {tuple(b.shape)}, got {got}")
        bad = ~torch.isfinite(x).all(dim=-1)
        if bool(bad.any()):
            raise DDNError(f"user linear solver {name} returned NaN or Inf at batch elements {element_list(bad)}")
        tol = default_tol(b.dtype) if self.tol is None else float(self.tol)
        res = _relres_mv(op.matvec, x, b)
        false = _flags(res.shape, b.device)
        return x, LinearSolveInfo(res, torch.zeros(res.shape, dtype=torch.long, device=b.device), false, false,
                                  f"user:{name}", res <= 10 * tol)


#: The string shorthands accepted by :func:`as_solver` and :func:`solve`.
SOLVER_NAMES = ("auto", "dense", "cg", "minres", "gmres", "bicgstab", "neumann")


def as_solver(spec: Union[None, str, LinearSolver, Callable[..., Any]] = None, *, tol: Optional[float] = None,
              max_iter: Optional[int] = None, dense_max: int = 128) -> LinearSolver:
    """The solver value for a spec.

    Args:
        spec: ``None`` or ``"auto"`` (:class:`Auto`), ``"dense"``, ``"cg"``, ``"minres"``, ``"gmres"``,
            ``"bicgstab"``, ``"neumann"`` (``"fixed_point"`` is an alias), a :class:`LinearSolver` value, or a
            user callable ``fn(matvec, b) -> x`` (wrapped in :class:`UserSolver`).
        tol, max_iter: fill the value's ``tol`` / ``max_iter`` where these are unset (``None``).
        dense_max: for ``"auto"``.
    """
    if spec is None:
        spec = "auto"
    if isinstance(spec, str):
        key = "neumann" if spec == "fixed_point" else spec
        if key == "auto":
            return Auto(dense_max, tol, max_iter)
        if key == "dense":
            return Dense()
        if key == "neumann":
            return Neumann(tol=tol, max_iter=max_iter)
        classes = {"cg": CG, "minres": MINRES, "gmres": GMRES, "bicgstab": BiCGStab}
        if key not in classes:
            raise DDNError(f"unknown linear solver {spec!r}; use one of {', '.join(map(repr, SOLVER_NAMES))}, a "
                           f"torchddn.linalg solver value such as CG(precond='jacobi'), or a callable "
                           f"fn(matvec, b) -> x")
        return classes[key](tol, max_iter)
    if isinstance(spec, LinearSolver):
        names = {f.name for f in fields(spec)}  # type: ignore[arg-type]
        upd = {k: v for k, v in (("tol", tol), ("max_iter", max_iter))
               if v is not None and k in names and getattr(spec, k) is None}
        return replace(spec, **upd) if upd else spec  # type: ignore[type-var]
    if callable(spec):
        return UserSolver(spec, tol)
    raise DDNError(f"a linear solver must be a name, a torchddn.linalg solver value or a callable, got "
                   f"{type(spec).__name__}")


def solve(op: LinearOperator, b: Tensor, method: Union[None, str, LinearSolver, Callable[..., Any]] = "auto",
          tol: Optional[float] = None, max_iter: Optional[int] = None, dense_max: int = 128
          ) -> tuple[Tensor, LinearSolveInfo]:
    """Solve ``A x = b`` for a batched :class:`LinearOperator` ``A`` and ``b`` of shape ``(*batch, n)``.

    Args:
        op: the operator (its tags choose the method for ``"auto"``).
        b: right-hand sides.
        method: a string shorthand, a solver value or a callable ``fn(matvec, b) -> x`` (see :func:`as_solver`).
        tol, max_iter: fill the solver's unset options; dense_max: for ``"auto"``.

    Returns:
        ``(x, info)``, ``x`` of ``b``'s shape and a per-element :class:`LinearSolveInfo`.
    """
    _check(op, b, "torchddn.linalg.solve")
    return as_solver(method, tol=tol, max_iter=max_iter, dense_max=dense_max)(op, b)


def transpose_solve(op: LinearOperator, b: Tensor, method: Union[None, str, LinearSolver, Callable[..., Any]] = "auto",
                    tol: Optional[float] = None, max_iter: Optional[int] = None, dense_max: int = 128
                    ) -> tuple[Tensor, LinearSolveInfo]:
    """Solve the adjoint system ``Aᵀ x = b`` (as :func:`solve` on ``op.T``), e.g. for vector-Jacobian products."""
    _check(op, b, "torchddn.linalg.transpose_solve")
    return solve(op.T, b, method, tol, max_iter, dense_max)
