"""How a node differentiates its solution: one vocabulary of values for every node kind.

Every node takes ``backward=`` as one of these values (or a string shorthand):

* :class:`Implicit` ``(solver)``: the exact implicit gradient. ``solver`` is the linear solve with the node's
  operator (the KKT matrix of Props. 4.4-4.6, ``I - dT/dy`` for fixed points, ``dF/dy`` for roots): any
  :mod:`torchddn.linalg` solver value (``Dense()``, ``CG(precond="jacobi")``, ``MINRES()``, ``GMRES()``,
  ``BiCGStab()``, ``Neumann()``, ``Auto()``), a string (``"auto"``, ``"dense"``, ``"cg"``, ``"minres"``,
  ``"gmres"``, ``"bicgstab"``, ``"neumann"``) or a user callable ``fn(matvec, b) -> x``.
* :class:`Unrolled` ``(steps)``: autograd through ``steps`` differentiable solver iterations from the initial guess.
* :class:`Truncated` ``(steps)``: autograd through the last ``steps`` iterations, started at the solution.
* :class:`JacobianFree` ``()``: the operator replaced by the identity (or, for optimisation nodes, the Hessian's
  diagonal): a cheap descent direction, not the exact gradient.
* :class:`Phantom` ``(steps, damping)``: ``steps`` damped Neumann steps on the adjoint system (Geng et al., 2021),
  the exact gradient of ``steps`` damped unrolled iterations started at the solution.

Strings are shorthands: ``"auto"`` and the linear-solver names mean ``Implicit(name)``, ``"unrolled"``,
``"truncated"``, ``"jacobian_free"`` and ``"phantom"`` the other values with their defaults.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

from torchddn.diagnostics import DDNError

__all__ = ["Implicit", "Unrolled", "Truncated", "JacobianFree", "Phantom", "BackwardRule", "as_backward",
           "LINEAR_SOLVER_NAMES"]

#: string shorthands for ``Implicit(name)``
LINEAR_SOLVER_NAMES = ("auto", "dense", "cg", "minres", "gmres", "bicgstab", "neumann", "fixed_point")


@dataclass(frozen=True)
class Implicit:
    """The exact implicit gradient, with ``solver`` for the linear solve (see the module docstring)."""

    solver: Any = "auto"

    def __repr__(self) -> str:
        s = self.solver
        text = repr(s) if isinstance(s, str) or not callable(s) or hasattr(s, "__dataclass_fields__") else \
            getattr(s, "__name__", type(s).__name__)
        return f"Implicit({text})"


@dataclass(frozen=True)
class Unrolled:
    """Autograd through ``steps`` solver iterations from the initial guess (``None``: the node's default)."""

    steps: Optional[int] = None
    method: Optional[str] = None
    lr: Optional[float] = None


@dataclass(frozen=True)
class Truncated:
    """Autograd through ``steps`` solver iterations started at the solution."""

    steps: int = 10
    method: Optional[str] = None
    lr: Optional[float] = None


@dataclass(frozen=True)
class JacobianFree:
    """The operator replaced by the identity (``hessian="diagonal"``: by the Hessian's diagonal)."""

    hessian: str = "identity"

    def __post_init__(self) -> None:
        if self.hessian not in ("identity", "diagonal"):
            raise ValueError(f"JacobianFree(hessian=...) must be 'identity' or 'diagonal', got {self.hessian!r}")


@dataclass(frozen=True)
class Phantom:
    """``steps`` damped Neumann steps ``u <- (1 - damping) u + damping (v + J^T u)`` from ``u = 0``."""

    steps: int = 5
    damping: float = 1.0

    def __post_init__(self) -> None:
        if int(self.steps) != self.steps or self.steps < 1:
            raise ValueError(f"Phantom(steps=...) must be a positive integer, got {self.steps!r}")
        if not 0.0 < float(self.damping) <= 1.0:
            raise ValueError(f"Phantom(damping=...) must be in (0, 1], got {self.damping!r}")


BackwardRule = Union[Implicit, Unrolled, Truncated, JacobianFree, Phantom]


def as_backward(spec: Union[str, BackwardRule, Callable[..., Any], Any]) -> BackwardRule:
    """The backward value for a spec: a value above, a string shorthand, or a linear solver (value or callable),
    which means ``Implicit(solver)``."""
    if isinstance(spec, (Implicit, Unrolled, Truncated, JacobianFree, Phantom)):
        return spec
    if isinstance(spec, str):
        if spec in LINEAR_SOLVER_NAMES:
            return Implicit(spec)
        named = {"unrolled": Unrolled, "truncated": Truncated, "jacobian_free": JacobianFree, "phantom": Phantom,
                 "implicit": Implicit}
        if spec in named:
            return named[spec]()
        raise ValueError(f"backward must be one of {sorted(set(LINEAR_SOLVER_NAMES) | set(named))}, a "
                         f"torchddn.backward value (Implicit, Unrolled, Truncated, JacobianFree, Phantom) or a "
                         f"linear solver; got {spec!r}")
    from torchddn import linalg
    if isinstance(spec, linalg.LinearSolver) or callable(spec):
        return Implicit(spec)
    raise DDNError(f"backward must be a string, a torchddn.backward value or a linear solver, got "
                   f"{type(spec).__name__}")
