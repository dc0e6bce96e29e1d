"""Built-in batched forward solvers (pure torch, CPU and GPU) and adapters for external ones: one registry,
:data:`SOLVERS`, for every kind.

* kind ``"minimise"``: ``solver(problem: Problem, y0, *, tol, max_iter) -> SolverResult``; pick one by name with
  :func:`get_solver`, or pass any callable with the same signature to a node's ``solver=``.
* kind ``"fixed_point"``: ``solver(f, z0, *, tol, max_iter, ...) -> SolverResult`` for ``z = f(z)``
  (:mod:`torchddn.solvers.fixed_point`).
* kind ``"root"``: ``solver(F, y0, *, tol, max_iter, ...) -> SolverResult`` for ``F(y) = 0``
  (:mod:`torchddn.solvers.root`).

Every solver stops by a scale-free rule (see :mod:`torchddn.solvers._common` for the minimisers'; the
fixed-point and root modules document theirs), reports which algorithm ran in ``SolverResult.method`` and
raises :class:`~torchddn.diagnostics.DDNError` for a NaN/Inf start.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Optional, Union

from torchddn.solvers.base import Problem, SolverResult
from torchddn.autodiff import batch_grad, batch_hessian, batch_hvp, batch_jacobian

class SolverEntry(tuple):
    """``(module, attribute)`` of a registered solver, with its ``kind`` (``"minimise"``, ``"fixed_point"`` or
    ``"root"``). Unpacks as the 2-tuple ``(module, attribute)``."""

    kind: str

    def __new__(cls, module: str, attr: str, kind: str = "minimise") -> "SolverEntry":
        obj = super().__new__(cls, (module, attr))
        obj.kind = kind
        return obj


#: name -> (module, attribute) with ``.kind``: every built-in forward solver
SOLVERS: dict[str, SolverEntry] = {
    "newton": SolverEntry("newton", "newton"),
    "newton_cg": SolverEntry("newton", "newton_cg"),
    "lbfgs": SolverEntry("lbfgs", "lbfgs"),
    "sqp": SolverEntry("sqp", "sqp"),
    "interior_point": SolverEntry("interior_point", "interior_point"),
    "augmented_lagrangian": SolverEntry("augmented_lagrangian", "augmented_lagrangian"),
    "projected_newton": SolverEntry("projected", "projected_newton"),
    "projected_gradient": SolverEntry("projected", "projected_gradient"),
    "scipy": SolverEntry("scipy_adapter", "ScipySolver"),
    "levenberg_marquardt": SolverEntry("least_squares", "levenberg_marquardt"),
    "gauss_newton": SolverEntry("least_squares", "gauss_newton"),
    "anderson": SolverEntry("fixed_point", "anderson", "fixed_point"),
    "broyden": SolverEntry("fixed_point", "broyden", "fixed_point"),
    "picard": SolverEntry("fixed_point", "picard", "fixed_point"),
    "newton_root": SolverEntry("root", "newton_root", "root"),
}

KINDS = ("minimise", "fixed_point", "root")


def solver_kind(name: str) -> str:
    """The kind of a registered solver: ``"minimise"``, ``"fixed_point"`` or ``"root"``."""
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; choose one of {sorted(SOLVERS)}")
    return SOLVERS[name].kind


def solvers_of_kind(kind: str) -> list[str]:
    """The registered solver names of one kind, sorted."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return sorted(n for n, e in SOLVERS.items() if e.kind == kind)

#: default solver for each problem class
DEFAULTS = {"unconstrained": "newton", "equality": "sqp", "inequality": "interior_point"}


def get_solver(solver: Union[str, Callable[..., SolverResult]], kind: Optional[str] = None
               ) -> Callable[..., SolverResult]:
    """Return the solver callable for a name in :data:`SOLVERS`, or ``solver`` itself if it is callable.

    ``"scipy"`` returns a :class:`~torchddn.solvers.scipy_adapter.ScipySolver` with its default method. With
    ``kind`` given, a registered name of another kind is an error (a fixed-point solver cannot minimise).
    """
    if callable(solver):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)} or pass a callable")
    if kind is not None and SOLVERS[solver].kind != kind:
        raise ValueError(f"solver {solver!r} is a {SOLVERS[solver].kind} solver, not a {kind} one; choose one of "
                         f"{solvers_of_kind(kind)}")
    module_name, attr = SOLVERS[solver]
    module = importlib.import_module(f"{__name__}.{module_name}")
    obj: Any = getattr(module, attr)
    return obj() if isinstance(obj, type) else obj


__all__ = ["Problem", "SolverResult", "get_solver", "SOLVERS", "DEFAULTS", "KINDS", "solver_kind", "solvers_of_kind",
           "batch_grad", "batch_hessian", "batch_hvp", "batch_jacobian"]
