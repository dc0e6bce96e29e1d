"""torchddn: deep declarative networks for PyTorch.

A declarative node's output is the solution of an optimisation problem ``y(x) in argmin_{u in C(x)} f(x, u)``;
its gradient comes from the implicit function theorem (Gould, Hartley & Campbell, "Deep Declarative Networks").
"""
from torchddn.backward import Implicit, JacobianFree, Phantom, Truncated, Unrolled
from torchddn.diagnostics import (ConvergenceWarning, DDNError, DDNWarning, Diagnostics, InfeasibleError,
                                  NonRegularWarning)
from torchddn.function import DeclarativeFunction, DeclarativeLayer
from torchddn.node import (AbstractDeclarativeNode, DeclarativeNode, EqConstDeclarativeNode,
                           IneqConstDeclarativeNode, LinEqConstDeclarativeNode)

__version__ = "0.1.0"

__all__ = [
    "AbstractDeclarativeNode", "DeclarativeNode", "EqConstDeclarativeNode", "IneqConstDeclarativeNode",
    "LinEqConstDeclarativeNode", "DeclarativeLayer", "DeclarativeFunction", "Diagnostics", "DDNError",
    "DDNWarning", "NonRegularWarning", "ConvergenceWarning", "InfeasibleError",
    "Implicit", "Unrolled", "Truncated", "JacobianFree", "Phantom",
]


def __getattr__(name: str):
    # fixed-point and root nodes live in their own modules
    if name == "FixedPointNode":
        from torchddn.fixed_point import FixedPointNode
        return FixedPointNode
    if name in ("RootNode", "custom_root"):
        from torchddn import root
        return getattr(root, name)
    raise AttributeError(f"module 'torchddn' has no attribute {name!r}")
