"""Penalty functions for robust pooling.

A penalty ``phi(z; alpha)`` is an even function of the residual ``z`` with scale ``alpha > 0``. Each class gives
the value and the derivatives the solvers and the closed-form backward need, both in the scalar residual ``z``
(1D pooling) and in the squared norm ``s = z^2`` (vector pooling, where ``z = ||u - x_i||``). The ``s`` form is
smooth at ``s = 0`` for every penalty, so vector pooling never divides by a zero norm.

=========================  ====================================================  ========
name                       phi(z; alpha)                                         convex
=========================  ====================================================  ========
``"quadratic"``            ``z^2 / 2``                                           yes
``"pseudo_huber"``         ``alpha^2 (sqrt(1 + (z/alpha)^2) - 1)``               yes
``"huber"``                ``z^2/2`` if ``|z| <= alpha`` else ``alpha(|z| - alpha/2)``  yes
``"welsch"``               ``1 - exp(-z^2 / (2 alpha^2))``                       no
``"truncated_quadratic"``  ``min(z^2/2, alpha^2/2)``                             no
=========================  ====================================================  ========

Notation (all elementwise, broadcasting ``z``/``s`` against ``alpha``):

* ``phi(z)``, ``dphi(z) = phi'(z)``, ``d2phi(z) = phi''(z)``, ``dphi_dalpha(z) = d phi'(z) / d alpha``;
* ``rho(s) = phi(sqrt(s))``, ``drho(s) = rho'(s)``, ``d2rho(s) = rho''(s)``, ``drho_dalpha(s) = d rho'(s)/d alpha``.

At the kinks of Huber (``|z| = alpha``) and truncated quadratic (``|z| = alpha``) the second derivative takes the
inlier value for Huber (``|z| <= alpha``) and the outlier value for truncated quadratic (``|z| >= alpha`` is
flat), the one-sided choices the backward documents.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

from torchddn.diagnostics import DDNError

__all__ = ["Penalty", "Quadratic", "PseudoHuber", "Huber", "Welsch", "TruncatedQuadratic", "get_penalty"]


def gauss(t2: Tensor) -> Tensor:
    """``exp(-t2 / 2)`` with the exponent clamped so the result never becomes subnormal (subnormal arithmetic is
    orders of magnitude slower on CPUs); the clamped values (``< 1e-33``) are negligible in every sum."""
    floor = 0.9 * math.log(torch.finfo(t2.dtype).tiny)
    return torch.exp((-0.5 * t2).clamp_min(floor))


class Penalty:
    """Base class of penalties ``phi(z; alpha)``; see the module docstring for the notation."""

    name: str = "penalty"
    convex: bool = True

    # scalar-residual form -------------------------------------------------------------------------------------
    def phi(self, z: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def dphi(self, z: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def d2phi(self, z: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def dphi_dalpha(self, z: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def dphi_d2phi(self, z: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``(phi'(z), phi''(z))`` together (subclasses share work between the two)."""
        return self.dphi(z, alpha), self.d2phi(z, alpha)

    # squared-norm form ------------------------------------------------------------------------------------------
    def rho(self, s: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def drho(self, s: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def d2rho(self, s: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def drho_dalpha(self, s: Tensor, alpha: Tensor) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Quadratic(Penalty):
    """``phi(z) = z^2 / 2``: pooling gives the mean (``alpha`` is ignored)."""

    name = "quadratic"
    convex = True

    def phi(self, z, alpha):
        return 0.5 * z * z

    def dphi(self, z, alpha):
        return z + 0 * alpha

    def d2phi(self, z, alpha):
        return torch.ones_like(z) + 0 * alpha

    def dphi_dalpha(self, z, alpha):
        return torch.zeros_like(z) + 0 * alpha

    def rho(self, s, alpha):
        return 0.5 * s + 0 * alpha

    def drho(self, s, alpha):
        return torch.full_like(s, 0.5) + 0 * alpha

    def d2rho(self, s, alpha):
        return torch.zeros_like(s) + 0 * alpha

    def drho_dalpha(self, s, alpha):
        return torch.zeros_like(s) + 0 * alpha


class PseudoHuber(Penalty):
    """``phi(z) = alpha^2 (sqrt(1 + (z/alpha)^2) - 1)``: smooth, strictly convex, quadratic near 0, linear far."""

    name = "pseudo_huber"
    convex = True

    def phi(self, z, alpha):
        return alpha * alpha * (torch.sqrt(1 + (z / alpha) ** 2) - 1)

    def dphi(self, z, alpha):
        return z * torch.rsqrt(1 + (z / alpha) ** 2)

    def d2phi(self, z, alpha):
        r = torch.rsqrt(1 + (z / alpha) ** 2)
        return r * r * r

    def dphi_d2phi(self, z, alpha):
        r = torch.rsqrt(1 + (z / alpha) ** 2)
        return z * r, r * r * r

    def dphi_dalpha(self, z, alpha):
        t = z / alpha
        return t ** 3 * (1 + t * t) ** -1.5

    def rho(self, s, alpha):
        a2 = alpha * alpha
        return a2 * (torch.sqrt(1 + s / a2) - 1)

    def drho(self, s, alpha):
        return 0.5 / torch.sqrt(1 + s / (alpha * alpha))

    def d2rho(self, s, alpha):
        a2 = alpha * alpha
        return -0.25 / a2 * (1 + s / a2) ** -1.5

    def drho_dalpha(self, s, alpha):
        a2 = alpha * alpha
        return 0.5 * s / (a2 * alpha) * (1 + s / a2) ** -1.5


class Huber(Penalty):
    """``phi(z) = z^2/2`` for ``|z| <= alpha`` else ``alpha (|z| - alpha/2)``: convex, ``C^1``."""

    name = "huber"
    convex = True

    def phi(self, z, alpha):
        a = z.abs()
        return torch.where(a <= alpha, 0.5 * z * z, alpha * (a - 0.5 * alpha))

    def dphi(self, z, alpha):
        return torch.maximum(torch.minimum(z, alpha), -alpha)

    def d2phi(self, z, alpha):
        return (z.abs() <= alpha).to(z.dtype)

    def dphi_dalpha(self, z, alpha):
        return torch.where(z.abs() > alpha, torch.sign(z), torch.zeros_like(z))

    def rho(self, s, alpha):
        inside = s <= alpha * alpha
        r = torch.sqrt(torch.where(inside, torch.ones_like(s), s))
        return torch.where(inside, 0.5 * s, alpha * (r - 0.5 * alpha))

    def drho(self, s, alpha):
        inside = s <= alpha * alpha
        r = torch.sqrt(torch.where(inside, torch.ones_like(s), s))
        return torch.where(inside, torch.full_like(s, 0.5), 0.5 * alpha / r)

    def d2rho(self, s, alpha):
        inside = s <= alpha * alpha
        ss = torch.where(inside, torch.ones_like(s), s)
        return torch.where(inside, torch.zeros_like(s), -0.25 * alpha * ss ** -1.5)

    def drho_dalpha(self, s, alpha):
        inside = s <= alpha * alpha
        r = torch.sqrt(torch.where(inside, torch.ones_like(s), s))
        return torch.where(inside, torch.zeros_like(s), 0.5 / r)


class Welsch(Penalty):
    """``phi(z) = 1 - exp(-z^2 / (2 alpha^2))``: smooth, bounded, nonconvex (redescending)."""

    name = "welsch"
    convex = False

    def phi(self, z, alpha):
        return 1 - gauss((z / alpha) ** 2)

    def dphi(self, z, alpha):
        return z / (alpha * alpha) * gauss((z / alpha) ** 2)

    def d2phi(self, z, alpha):
        t2 = (z / alpha) ** 2
        return (1 - t2) / (alpha * alpha) * gauss(t2)

    def dphi_dalpha(self, z, alpha):
        t2 = (z / alpha) ** 2
        return z / alpha ** 3 * gauss(t2) * (t2 - 2)

    def rho(self, s, alpha):
        return 1 - gauss(s / (alpha * alpha))

    def drho(self, s, alpha):
        a2 = alpha * alpha
        return 0.5 / a2 * gauss(s / a2)

    def d2rho(self, s, alpha):
        a2 = alpha * alpha
        return -0.25 / (a2 * a2) * gauss(s / a2)

    def drho_dalpha(self, s, alpha):
        a2 = alpha * alpha
        return gauss(s / a2) / alpha ** 3 * (0.5 * s / a2 - 1)


class TruncatedQuadratic(Penalty):
    """``phi(z) = min(z^2/2, alpha^2/2)``: nonconvex, discontinuous derivative at ``|z| = alpha``."""

    name = "truncated_quadratic"
    convex = False

    def phi(self, z, alpha):
        return 0.5 * torch.minimum(z * z, alpha * alpha)

    def dphi(self, z, alpha):
        return torch.where(z.abs() < alpha, z, torch.zeros_like(z))

    def d2phi(self, z, alpha):
        return (z.abs() < alpha).to(z.dtype)

    def dphi_dalpha(self, z, alpha):
        return torch.zeros_like(z) + 0 * alpha

    def rho(self, s, alpha):
        return 0.5 * torch.minimum(s, alpha * alpha)

    def drho(self, s, alpha):
        return 0.5 * (s < alpha * alpha).to(s.dtype)

    def d2rho(self, s, alpha):
        return torch.zeros_like(s) + 0 * alpha

    def drho_dalpha(self, s, alpha):
        return torch.zeros_like(s) + 0 * alpha


_PENALTIES = {cls.name: cls for cls in (Quadratic, PseudoHuber, Huber, Welsch, TruncatedQuadratic)}


def get_penalty(penalty: Union[str, Penalty]) -> Penalty:
    """Return the :class:`Penalty` named ``penalty`` (one of ``"quadratic"``, ``"pseudo_huber"``, ``"huber"``,
    ``"welsch"``, ``"truncated_quadratic"``), or ``penalty`` itself if it already is one."""
    if isinstance(penalty, Penalty):
        return penalty
    if isinstance(penalty, str) and penalty in _PENALTIES:
        return _PENALTIES[penalty]()
    raise DDNError(f"penalty must be one of {sorted(_PENALTIES)} or a Penalty instance, got {penalty!r}")
