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

# Modules named like their function (robust_pool, pnp, qp, analytic_centre) are callable modules: the package
# attribute is the module, and calling it calls the function (see torchddn.nodes._callable).
from torchddn.nodes import analytic_centre, pnp, qp, robust_pool  # noqa: E402


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
