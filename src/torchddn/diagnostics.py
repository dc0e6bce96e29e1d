"""Warnings, errors and per-element diagnostics shared by every node."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field, fields
from typing import Optional

import torch
from torch import Tensor


class DDNWarning(UserWarning):
    """Base class of the warnings torchddn raises."""


class NonRegularWarning(DDNWarning):
    """The implicit function theorem's conditions fail at the solution (singular or indefinite Hessian,
    dependent constraints, vanishing constraint gradient, weakly active constraint). A minimum-norm
    (pseudo-inverse) gradient is returned instead, never NaN."""


class ConvergenceWarning(DDNWarning):
    """A forward solver or a backward linear solve did not reach its tolerance."""


class DDNError(ValueError):
    """Raised for bad input (shapes, NaN/Inf) or, with ``on_failure="raise"``, failed solves."""


class InfeasibleError(DDNError):
    """The constraints of some batch elements cannot be satisfied."""


def element_list(mask: Tensor, limit: int = 10) -> str:
    """Format the indices where ``mask`` is true, e.g. ``"[0, 3, 7]"`` (truncated after ``limit``)."""
    idx = torch.nonzero(mask.reshape(-1)).reshape(-1).tolist()
    text = ", ".join(str(i) for i in idx[:limit])
    if len(idx) > limit:
        text += f", ... ({len(idx)} in all)"
    return f"[{text}]"


def report(policy: str, message: str, category: type[Warning] = ConvergenceWarning, stacklevel: int = 3) -> None:
    """Apply an ``on_failure`` policy: ``"warn"`` warns, ``"raise"`` raises :class:`DDNError`, ``"ignore"`` passes."""
    if policy == "ignore":
        return
    if policy == "raise":
        raise DDNError(message)
    if policy != "warn":
        raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {policy!r}")
    warnings.warn(message, category, stacklevel=stacklevel)


@dataclass
class Diagnostics:
    """Per-batch-element diagnostics of the last forward (and backward) of a node.

    Every tensor has leading dimension ``b`` (the batch size). Fields that do not apply are ``None``.

    Attributes:
        residual: (b,) norm of the gradient of the Lagrangian at the returned y (first-order optimality).
        constraint_violation: (b,) max(|h|, max(g, 0)) over all constraints; zeros for unconstrained nodes.
        active: (b, q) bool, the inequality constraints treated as active by the backward.
        converged: (b,) bool, whether the forward solver met its tolerance (True for a user ``solve``).
        iterations: (b,) forward solver iterations (zeros for a user ``solve``).
        linear_residual: (b,) relative residual of the backward's linear solve (after backward).
        linear_iterations: (b,) iterations of the backward's linear solve (after backward; 0 for dense).
        nonregular: (b,) bool, elements at which the backward used the minimum-norm (pseudo-inverse) policy.
        backward_method: the linear-solve method the last backward used ("dense", "cg", "minres", ...).
    """

    residual: Optional[Tensor] = None
    constraint_violation: Optional[Tensor] = None
    active: Optional[Tensor] = None
    converged: Optional[Tensor] = None
    iterations: Optional[Tensor] = None
    linear_residual: Optional[Tensor] = None
    linear_iterations: Optional[Tensor] = None
    nonregular: Optional[Tensor] = None
    backward_method: Optional[str] = None
    messages: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __repr__(self) -> str:
        parts = []
        for f in fields(self):
            val = getattr(self, f.name)
            if val is None or (isinstance(val, list) and not val):
                continue
            if isinstance(val, Tensor):
                if val.dtype == torch.bool:
                    val = f"{int(val.sum())}/{val.numel()} true"
                elif val.numel() and val.is_floating_point():
                    val = f"max {float(val.abs().max()):.3g}"
                elif val.numel():
                    val = f"max {int(val.max())}"
            parts.append(f"{f.name}={val}")
        return "Diagnostics(" + ", ".join(parts) + ")"
