"""Tagged batched linear operators: general (matrix-free), diagonal, tridiagonal and dense.

Every operator acts on the last dimension of ``(*batch, n)`` tensors, one matrix per batch element. Tags
(``symmetric``, ``psd``) and the structure (``kind``) let :class:`torchddn.linalg.Auto` pick a method; ``.T`` is
the transposed operator, ``materialize(like)`` the dense ``(*batch, n, n)`` matrix, ``diag(like)`` the diagonal
when it is cheap to know (``None`` otherwise).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Optional, Union

import torch
from torch import Tensor
from torch.func import vjp, vmap

from torchddn.diagnostics import DDNError
from torchddn.linalg._common import LinearSolveInfo, MatVec
from torchddn.linalg.dense import (dense_solve, dense_solve_general, diagonal_solve, tridiagonal_dense,
                                   tridiagonal_matvec, tridiagonal_solve)

__all__ = ["LinearOperator", "DiagonalOperator", "TridiagonalOperator", "DenseOperator"]

Diagonal = Union[Tensor, Callable[[], Tensor], None]


@dataclass(repr=False, eq=False)
class LinearOperator:
    """A batched square linear operator ``z -> A z`` acting on the last dimension of ``(*batch, n)`` tensors.

    Args:
        matvec: the product; it must accept extra leading dimensions (it is vmapped for multiple right-hand sides
            and by :meth:`materialize`).
        n: size of each system.
        symmetric: ``A = Aᵀ`` for every element (then the transpose product is ``matvec`` itself).
        psd: ``A`` is positive (semi-)definite for every element (enables Cholesky and CG).
        rmatvec: the transpose product ``z -> Aᵀ z`` of a non-symmetric operator. If omitted it is obtained by
            autograd, one VJP of ``matvec`` (about twice a ``matvec``) per product.
        diagonal: the ``(*batch, n)`` diagonal of ``A``, as a tensor or a zero-argument callable (evaluated when a
            Jacobi preconditioner asks for it), e.g. the Hessian's diagonal.
    """

    matvec: MatVec
    n: int
    symmetric: bool = True
    psd: bool = False
    rmatvec: Optional[MatVec] = None
    diagonal: Diagonal = None

    kind: ClassVar[str] = "general"

    # ---- products ---------------------------------------------------------------------------------------------
    def mv(self, z: Tensor) -> Tensor:
        """``A z`` for ``z`` of shape ``(*batch, n)``."""
        return self.matvec(z)

    def rmv(self, z: Tensor) -> Tensor:
        """``Aᵀ z``: ``matvec`` for symmetric operators, else ``rmatvec``, else one VJP of ``matvec``."""
        if self.symmetric:
            return self.matvec(z)
        if self.rmatvec is not None:
            return self.rmatvec(z)
        _, pullback = vjp(self.matvec, torch.zeros_like(z))
        return pullback(z)[0]

    @property
    def T(self) -> "LinearOperator":  # noqa: N802
        """The transposed operator (``self`` when symmetric)."""
        if self.symmetric:
            return self
        return LinearOperator(self.rmv, self.n, False, self.psd, self.matvec, self.diagonal)

    # ---- structure --------------------------------------------------------------------------------------------
    @property
    def tags(self) -> tuple[str, ...]:
        """Structure and tags, e.g. ``("tridiagonal", "symmetric")`` or ``("general", "symmetric", "psd")``."""
        return (self.kind,) + (("symmetric",) if self.symmetric else ()) + (("psd",) if self.psd else ())

    def diag(self, like: Optional[Tensor] = None) -> Optional[Tensor]:
        """The diagonal ``(*batch, n)`` if known cheaply (``None`` otherwise), in ``like``'s dtype."""
        d = self.diagonal
        if d is None:
            return None
        if not isinstance(d, Tensor):
            d = d()
            if not isinstance(d, Tensor) or d.shape[-1:] != (self.n,):
                raise DDNError(f"LinearOperator: diagonal() must return a tensor of shape (*batch, {self.n}), got "
                               f"{tuple(d.shape) if isinstance(d, Tensor) else type(d).__name__}")
        return d if like is None else d.to(dtype=like.dtype, device=like.device)

    def materialize(self, like: Tensor) -> Tensor:
        """Dense ``(*batch, n, n)`` matrix built from ``n`` vmapped products with the unit vectors (``like``:
        a ``(*batch, n)`` tensor giving batch shape, dtype and device). Cost ``n`` products, ``O(b n^2)`` memory."""
        eye = torch.eye(self.n, dtype=like.dtype, device=like.device)
        shape = like.shape
        cols = vmap(lambda e: self.matvec(e.expand(shape)))(eye)  # (n, *batch, n): cols[j] = A e_j
        return cols.movedim(0, -1)

    def direct_solve(self, b: Tensor) -> Optional[tuple[Tensor, LinearSolveInfo]]:
        """A structure-specific direct solve, or ``None`` (then :class:`~torchddn.linalg.Dense` materializes)."""
        return None

    def __repr__(self) -> str:
        extra = (", rmatvec" if self.rmatvec is not None else "") + (", diagonal" if self.diagonal is not None
                                                                      else "")
        return (f"{type(self).__name__}(n={self.n}, symmetric={self.symmetric}, psd={self.psd}{extra})")


def _nearly_equal(a: Tensor, b: Tensor) -> bool:
    """``a == b`` up to ``10 n eps`` of the largest entry (symmetry inference; rounding in ``B Bᵀ`` is allowed)."""
    if a.shape != b.shape:
        return False
    scale = torch.maximum(a.abs().amax(), b.abs().amax()) if a.numel() else a.new_zeros(())
    tol = 10 * max(a.shape[-1], 1) * torch.finfo(a.dtype).eps * scale
    return bool(((a - b).abs() <= tol).all())


def _check_tensor(t: object, name: str, cls: str) -> Tensor:
    if not isinstance(t, Tensor) or not t.is_floating_point() or t.dim() < 1:
        raise DDNError(f"{cls}: {name} must be a floating point tensor of shape (*batch, n), got "
                       f"{tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__}")
    return t


class DiagonalOperator(LinearOperator):
    """``A = diag(d)``, ``d`` of shape ``(*batch, n)``; ``psd`` is inferred from the signs of ``d`` unless given.
    Direct solve ``O(n)``; its transpose is itself."""

    kind: ClassVar[str] = "diagonal"

    def __init__(self, d: Tensor, psd: Optional[bool] = None) -> None:
        d = _check_tensor(d, "d", "DiagonalOperator")
        self.d = d
        psd = bool((d >= 0).all()) if psd is None else bool(psd)
        super().__init__(self._mv, d.shape[-1], True, psd, None, d)

    def _mv(self, z: Tensor) -> Tensor:
        return self.d * z

    def materialize(self, like: Tensor) -> Tensor:
        return torch.diag_embed(self.d.to(like.dtype).expand(like.shape))

    def direct_solve(self, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        return diagonal_solve(self.d, b)


class TridiagonalOperator(LinearOperator):
    """Tridiagonal ``A`` with ``A[i+1, i] = lower[i]``, ``A[i, i] = diag[i]``, ``A[i, i+1] = upper[i]``.

    Args:
        lower, upper: ``(*batch, n-1)``; diag: ``(*batch, n)``.
        psd: tag (not checked); ``symmetric`` is inferred as ``lower == upper`` (to ``10 n eps`` of the largest
            entry) unless given.

    Products ``O(n)``, exact diagonal, transpose by swapping ``lower`` and ``upper``, direct solve by Gaussian
    elimination with partial pivoting (:func:`~torchddn.linalg.tridiagonal_solve`), ``O(n)`` per element.
    """

    kind: ClassVar[str] = "tridiagonal"

    def __init__(self, lower: Tensor, diag: Tensor, upper: Tensor, *, symmetric: Optional[bool] = None,
                 psd: bool = False) -> None:
        diag = _check_tensor(diag, "diag", "TridiagonalOperator")
        n = diag.shape[-1]
        for name, t in (("lower", lower), ("upper", upper)):
            if not isinstance(t, Tensor) or t.shape[-1:] != (n - 1,) or t.dtype != diag.dtype:
                got = f"{tuple(t.shape)}, {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
                raise DDNError(f"TridiagonalOperator: {name} must have shape (*batch, {n - 1}) and the dtype of "
                               f"diag ({tuple(diag.shape)}, {diag.dtype}), got {got}")
        self.lower, self.dvec, self.upper = lower, diag, upper
        if symmetric is None:
            symmetric = _nearly_equal(lower, upper)
        super().__init__(self._mv, n, bool(symmetric), bool(psd), self._rmv, diag)

    def _mv(self, z: Tensor) -> Tensor:
        return tridiagonal_matvec(self.lower, self.dvec, self.upper, z)

    def _rmv(self, z: Tensor) -> Tensor:
        return tridiagonal_matvec(self.upper, self.dvec, self.lower, z)

    @property
    def T(self) -> "TridiagonalOperator":  # noqa: N802
        if self.symmetric:
            return self
        return TridiagonalOperator(self.upper, self.dvec, self.lower, symmetric=False, psd=self.psd)

    def materialize(self, like: Tensor) -> Tensor:
        A = tridiagonal_dense(self.lower, self.dvec, self.upper).to(like.dtype)
        return A.expand(*like.shape, self.n)

    def direct_solve(self, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        return tridiagonal_solve(self.lower, self.dvec, self.upper, b)


class DenseOperator(LinearOperator):
    """An explicit matrix ``A`` of shape ``(*batch, n, n)``. ``symmetric`` is inferred (equality with ``Aᵀ`` to
    ``10 n eps`` of the largest entry) unless given; ``psd`` is a tag. Products ``O(n^2)``; direct solve by Cholesky / eigendecomposition
    (symmetric) or LU (general), with the pseudo-inverse at singular elements."""

    kind: ClassVar[str] = "dense"

    def __init__(self, A: Tensor, *, symmetric: Optional[bool] = None, psd: bool = False) -> None:
        A = _check_tensor(A, "A", "DenseOperator")
        if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
            raise DDNError(f"DenseOperator: A must have shape (*batch, n, n), got {tuple(A.shape)}")
        self.A = A
        if symmetric is None:
            symmetric = _nearly_equal(A, A.mT)
        super().__init__(self._mv, A.shape[-1], bool(symmetric), bool(psd), self._rmv,
                         torch.diagonal(A, dim1=-2, dim2=-1))

    def _mv(self, z: Tensor) -> Tensor:
        return (self.A @ z.unsqueeze(-1)).squeeze(-1)

    def _rmv(self, z: Tensor) -> Tensor:
        return (self.A.mT @ z.unsqueeze(-1)).squeeze(-1)

    @property
    def T(self) -> "DenseOperator":  # noqa: N802
        if self.symmetric:
            return self
        return DenseOperator(self.A.mT, symmetric=False, psd=self.psd)

    def materialize(self, like: Tensor) -> Tensor:
        return self.A.to(like.dtype).expand(*like.shape, self.n)

    def direct_solve(self, b: Tensor) -> tuple[Tensor, LinearSolveInfo]:
        batch = torch.broadcast_shapes(self.A.shape[:-2], b.shape[:-1])
        A = self.A.to(b.dtype).expand(*batch, self.n, self.n)
        b = b.expand(*batch, self.n)
        if self.symmetric:
            return dense_solve(A, b, self.psd)
        return dense_solve_general(A, b)
