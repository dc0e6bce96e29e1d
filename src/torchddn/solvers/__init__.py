"""Built-in batched forward solvers (pure torch, CPU and GPU) and adapters for external ones.

Every solver follows :class:`~torchddn.solvers.base.Problem` -> :class:`~torchddn.solvers.base.SolverResult`.
Pick one by name with :func:`get_solver`, or pass any callable with the same signature to a node's ``solver=``.
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Union

from torchddn.solvers.base import Problem, SolverResult, batch_grad, batch_hessian, batch_hvp, batch_jacobian

#: name -> (module, attribute)
SOLVERS: dict[str, tuple[str, str]] = {
    "newton": ("newton", "newton"),
    "newton_cg": ("newton", "newton_cg"),
    "lbfgs": ("lbfgs", "lbfgs"),
    "sqp": ("sqp", "sqp"),
    "interior_point": ("interior_point", "interior_point"),
    "augmented_lagrangian": ("augmented_lagrangian", "augmented_lagrangian"),
    "projected_newton": ("projected", "projected_newton"),
    "projected_gradient": ("projected", "projected_gradient"),
    "scipy": ("scipy_adapter", "ScipySolver"),
    "levenberg_marquardt": ("least_squares", "levenberg_marquardt"),
    "gauss_newton": ("least_squares", "gauss_newton"),
}

#: default solver for each problem class
DEFAULTS = {"unconstrained": "newton", "equality": "sqp", "inequality": "interior_point"}


def get_solver(solver: Union[str, Callable[..., SolverResult]]) -> Callable[..., SolverResult]:
    """Return the solver callable for a name in :data:`SOLVERS`, or ``solver`` itself if it is callable.

    ``"scipy"`` returns a :class:`~torchddn.solvers.scipy_adapter.ScipySolver` with its default method.
    """
    if callable(solver):
        return solver
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; choose one of {sorted(SOLVERS)} or pass a callable")
    module_name, attr = SOLVERS[solver]
    module = importlib.import_module(f"{__name__}.{module_name}")
    obj: Any = getattr(module, attr)
    return obj() if isinstance(obj, type) else obj


__all__ = ["Problem", "SolverResult", "get_solver", "SOLVERS", "DEFAULTS",
           "batch_grad", "batch_hessian", "batch_hvp", "batch_jacobian"]
