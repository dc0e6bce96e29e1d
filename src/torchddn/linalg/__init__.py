"""Batched linear operators and linear solves (as values) for implicit differentiation.

Every solve works on a batch of independent systems ``A x = b``: vectors have shape ``(*batch, n)`` and the
operator acts on each row independently. In the spirit of Lineax, operators are tagged and solvers are values:

* Operators (:mod:`torchddn.linalg.operators`): :class:`LinearOperator` ``(matvec, n, symmetric, psd, rmatvec,
  diagonal)`` (matrix-free), :class:`DiagonalOperator`, :class:`TridiagonalOperator` and :class:`DenseOperator`;
  each has ``.T``, ``materialize(like)``, ``diag(like)`` and ``tags``.
* Solvers (:mod:`torchddn.linalg.solvers`): :class:`Dense` (Cholesky / eigendecomposition / LU / structured, with
  the pseudo-inverse at singular elements), :class:`CG`, :class:`MINRES`, :class:`GMRES`, :class:`BiCGStab`,
  :class:`Neumann`, :class:`Auto` and :class:`UserSolver`. Each is called as ``solver(op, b) -> (x, info)``;
  the Krylov solvers take a preconditioner (a callable applying ``M^{-1}``, or ``"jacobi"``).
* :func:`solve` / :func:`transpose_solve` accept a string shorthand (``"auto"``, ``"dense"``, ``"cg"``,
  ``"minres"``, ``"gmres"``, ``"bicgstab"``, ``"neumann"``), a solver value, or a callable ``fn(matvec, b) -> x``.

Each solve returns a :class:`LinearSolveInfo` with per-element true residuals, iteration counts and flags:
``nonregular`` marks elements where the matrix is singular (or, for PSD-tagged dense solves, indefinite) and the
minimum-norm (pseudo-inverse / least-squares) solution was returned, never NaN; ``indefinite`` marks negative
curvature of a PSD-tagged operator; ``converged`` whether the element met its stopping test.
The functional solvers :func:`cg`, :func:`minres`, :func:`gmres`, :func:`bicgstab`, :func:`cgls`,
:func:`neumann`, :func:`dense_solve`, :func:`dense_solve_general`, :func:`tridiagonal_solve` and
:func:`pinv_solve_symmetric` are available too.
"""
from torchddn.linalg._common import LinearSolveInfo, MatVec, default_tol
from torchddn.linalg.dense import (dense_solve, dense_solve_general, diagonal_solve, pinv_solve_symmetric,
                                   tridiagonal_matvec, tridiagonal_solve)
from torchddn.linalg.krylov import bicgstab, cg, cgls, gmres, minres, neumann
from torchddn.linalg.operators import DenseOperator, DiagonalOperator, LinearOperator, TridiagonalOperator
from torchddn.linalg.solvers import (CG, GMRES, MINRES, SOLVER_NAMES, Auto, BiCGStab, Dense, LinearSolver, Neumann,
                                     Precond, UserSolver, as_solver, solve, transpose_solve)

__all__ = [
    "LinearOperator", "DiagonalOperator", "TridiagonalOperator", "DenseOperator",
    "LinearSolver", "Dense", "CG", "MINRES", "GMRES", "BiCGStab", "Neumann", "Auto", "UserSolver", "Precond",
    "SOLVER_NAMES", "as_solver", "solve", "transpose_solve", "LinearSolveInfo", "MatVec", "default_tol",
    "cg", "minres", "gmres", "bicgstab", "cgls", "neumann", "dense_solve", "dense_solve_general", "diagonal_solve",
    "pinv_solve_symmetric", "tridiagonal_solve", "tridiagonal_matvec",
]
