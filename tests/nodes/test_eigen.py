"""Symmetric eigenvectors: ordering, top_k, gradcheck on sign-invariant losses, repeated eigenvalues, warnings."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch.autograd import gradcheck

from torchddn.diagnostics import DDNError, NonRegularWarning
from torchddn.nodes.eigen import Eigenvectors, eigenvectors

D = torch.float64


def sym(b=2, n=5, seed=0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(b, n, n, generator=g, dtype=dtype)
    return X + X.mT


def with_spectrum(lam, seed=0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(len(lam), len(lam), generator=g, dtype=D))
    return (Q @ torch.diag(torch.tensor(lam, dtype=D)) @ Q.T)[None]


def projector(V):
    return V @ V.mT


def test_forward_ordering_top_k_and_eigenvalues():
    X = sym()
    V, lam = eigenvectors(X, return_eigenvalues=True)
    assert torch.all(lam[:, 1:] >= lam[:, :-1])
    assert torch.allclose(X @ V, V * lam[:, None, :], atol=1e-12)
    Vk, lamk = eigenvectors(X, top_k=2, return_eigenvalues=True)
    assert torch.allclose(Vk, V[..., -2:]) and torch.allclose(lamk, lam[:, -2:])
    assert eigenvectors(X[0]).shape == (5, 5)
    assert Eigenvectors(top_k=1)(X).shape == (2, 5, 1)


@pytest.mark.parametrize("top_k", [None, 1, 3])
def test_gradcheck_sign_invariant_losses(top_k):
    X = sym(seed=1).requires_grad_()
    a = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(2))
    C = sym(1, 5, seed=3)[0]

    def loss(X):
        V = eigenvectors(X, top_k=top_k)
        # squared projections and projector entries: invariant to the sign of every column
        return torch.cat([((V.mT @ a) ** 2).flatten(1), (projector(V) * C).flatten(1)], 1)

    assert gradcheck(loss, (X,))


def test_gradcheck_eigenvalues_and_sign_fixed_vectors():
    X = sym(seed=4).requires_grad_()

    def fixed(X):
        V, lam = eigenvectors(X, return_eigenvalues=True)
        s = torch.sign(V[:, :1, :])  # fix each column's sign by its first entry (non-zero for random X)
        return torch.cat([(V * s).flatten(1), lam], 1)

    assert gradcheck(fixed, (X,))


def test_matches_autograd_of_torch_eigh():
    X = sym(seed=5)
    X1, X2 = X.clone().requires_grad_(), X.clone().requires_grad_()
    C = sym(1, 5, seed=6)[0]
    g = torch.autograd.grad((projector(eigenvectors(X1, top_k=2)) * C).sum(), X1)[0]
    V = torch.linalg.eigh(0.5 * (X2 + X2.mT))[1][..., -2:]
    g_ref = torch.autograd.grad((projector(V) * C).sum(), X2)[0]
    assert torch.allclose(g, g_ref, atol=1e-10)


def test_repeated_eigenvalues_subspace_invariant_loss_is_exact():
    # eigenvalues (0, 1, 2, 3, 3): the top-2 eigenspace is degenerate inside but separated from the rest
    X = with_spectrum([0.0, 1.0, 2.0, 3.0, 3.0]).requires_grad_()
    C = sym(1, 5, seed=7)[0]
    loss = lambda X: (projector(eigenvectors(X, top_k=2)) * C).sum()  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.autograd.grad(loss(X), X)[0]
    assert torch.isfinite(g).all()
    # closed form of the projector derivative: dP = sum_{i in S, j notin S} (v_j v_j^T dX v_i v_i^T + t.) / (l_i - l_j)
    lam, V = torch.linalg.eigh(X.detach()[0])
    G = torch.zeros(5, 5, dtype=D)
    for i in (3, 4):
        for j in (0, 1, 2):
            vi, vj = V[:, i:i + 1], V[:, j:j + 1]
            G += (vj @ vj.T @ (C + C.T) @ vi @ vi.T) / (lam[i] - lam[j])
    assert torch.allclose(g[0], 0.5 * (G + G.T), atol=1e-10)
    # and finite differences of re-solves with symmetric perturbations
    E = sym(1, 5, seed=8)
    h = 1e-6
    fd = (loss(X.detach() + h * E) - loss(X.detach() - h * E)) / (2 * h)
    assert torch.allclose((g * E).sum(), fd, atol=1e-7)
    assert gradcheck(loss, (X,))


def test_repeated_eigenvalues_basis_dependent_loss_warns_without_nan():
    X = with_spectrum([0.0, 1.0, 2.0, 3.0, 3.0]).requires_grad_()
    with pytest.warns(NonRegularWarning, match=r"repeated eigenvalues.*\[0\]"):
        g = torch.autograd.grad(eigenvectors(X)[0, 0, 4], X)[0]
    assert torch.isfinite(g).all()
    # a degenerate pair split by top_k: the top-1 "subspace" itself is not defined
    with pytest.warns(NonRegularWarning):
        torch.autograd.grad((projector(eigenvectors(X, top_k=1)) * sym(1, 5)[0]).sum(), X)
    # eigenvalue sums are smooth: no warning, exact
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        g = torch.autograd.grad(eigenvectors(X, top_k=2, return_eigenvalues=True)[1].sum(), X)[0]
    V = torch.linalg.eigh(X.detach()[0])[1][:, 3:]
    assert torch.allclose(g[0], V @ V.T, atol=1e-10)


def test_mixed_batch_warns_only_degenerate_element():
    X = torch.cat([with_spectrum([0.0, 1.0, 1.0]), sym(1, 3, seed=9)]).requires_grad_()
    with pytest.warns(NonRegularWarning, match=r"elements \[0\];"):
        g = torch.autograd.grad(eigenvectors(X)[:, 1, 1].sum(), X)[0]
    assert torch.isfinite(g).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    X = sym(dtype=dtype).requires_grad_()
    V = eigenvectors(X, top_k=2)
    (projector(V) ** 2).sum().backward()
    assert V.dtype == dtype and torch.isfinite(X.grad).all()


def test_bad_input():
    with pytest.raises(DDNError, match="shape"):
        eigenvectors(torch.randn(2, 3, 4, dtype=D))
    X = sym()
    X[1, 0, 0] = float("nan")
    with pytest.raises(DDNError, match=r"NaN or Inf at batch elements \[1\]"):
        eigenvectors(X)
    with pytest.raises(DDNError, match="top_k"):
        eigenvectors(sym(), top_k=6)


def test_top_eigenvector_matches_generic_core_node():
    import torchddn as ddn

    class TopEigenvector(ddn.EqConstDeclarativeNode):
        """min_y -y^T X y  s.t.  y^T y = 1; solve() returns our forward so the generic backward is compared."""

        def __init__(self):
            super().__init__(backward="dense")

        def objective(self, X, y):
            return -(y * (X @ y[..., None])[..., 0]).sum(-1)

        def equality_constraints(self, X, y):
            return (y * y).sum(-1) - 1

        def solve(self, X):
            V, lam = eigenvectors(X.detach(), top_k=1, return_eigenvalues=True)
            return V[..., 0], {"nu": -lam}  # grad f = -2 X y = nu * 2 y

    X = sym(3, 5, seed=10)
    X1, X2 = X.clone().requires_grad_(), X.clone().requires_grad_()
    a = torch.randn(5, dtype=D, generator=torch.Generator().manual_seed(11))
    y = eigenvectors(X1, top_k=1)[..., 0]
    y_ref = ddn.DeclarativeLayer(TopEigenvector())(X2)
    assert torch.allclose(y, y_ref)
    g = torch.autograd.grad(((y @ a) ** 2).sum(), X1)[0]
    g_ref = torch.autograd.grad(((y_ref @ a) ** 2).sum(), X2)[0]
    assert torch.allclose(g, 0.5 * (g_ref + g_ref.mT), atol=1e-10)
