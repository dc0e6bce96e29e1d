"""Ready-made declarative nodes with fast exact forwards and closed-form implicit backwards.

Each family lives in its own module; the names below are imported on first use.
"""
from __future__ import annotations

import importlib
from typing import Any

_LAZY: dict[str, str] = {
    # robust pooling (robust_pool.py)
    "robust_pool": "robust_pool", "RobustPool": "robust_pool",
    "robust_vector_pool": "robust_pool", "RobustVectorPool": "robust_pool",
    "Penalty": "penalties", "Quadratic": "penalties", "PseudoHuber": "penalties", "Huber": "penalties",
    "Welsch": "penalties", "TruncatedQuadratic": "penalties", "get_penalty": "penalties",
    # Euclidean projections (projections.py)
    "project": "projections", "EuclideanProjection": "projections",
    # least squares (least_squares.py)
    "weighted_least_squares": "least_squares", "WeightedLeastSquares": "least_squares",
    # optimal transport (optimal_transport.py)
    "sinkhorn": "optimal_transport", "Sinkhorn": "optimal_transport",
    # eigenvectors (eigen.py)
    "eigenvectors": "eigen", "Eigenvectors": "eigen",
    # perspective-n-point (pnp.py)
    "pnp": "pnp", "PnP": "pnp",
    # tridiagonal solves (tridiagonal.py)
    "tridiagonal_solve": "tridiagonal", "TridiagonalSolve": "tridiagonal",
    "block_tridiagonal_solve": "tridiagonal", "BlockTridiagonalSolve": "tridiagonal",
    # QP layer (qp.py)
    "qp": "qp", "QPLayer": "qp",
    # total variation (tv.py)
    "tv_denoise": "tv", "TVDenoise": "tv",
    # analytic centre (analytic_centre.py)
    "analytic_centre": "analytic_centre", "AnalyticCentre": "analytic_centre",
    # declarative attention (attention.py)
    "declarative_attention": "attention", "DeclarativeAttention": "attention",
}

__all__ = sorted(_LAZY)

# Modules named like their function: bind the function eagerly, since importing the submodule would otherwise set
# the package attribute to the module.
from torchddn.nodes.analytic_centre import analytic_centre  # noqa: E402
from torchddn.nodes.pnp import pnp  # noqa: E402
from torchddn.nodes.qp import qp  # noqa: E402
from torchddn.nodes.robust_pool import robust_pool  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
