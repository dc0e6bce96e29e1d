"""Eigenvectors as a layer: exact gradients, and what happens at repeated eigenvalues.

``torchddn.nodes.eigenvectors(X, top_k=None, return_eigenvalues=False)`` returns the eigenvectors of symmetric
matrices X as columns, ordered by ascending eigenvalue. Declaratively, the top eigenvector solves

    y = argmax_{||u|| = 1}  u^T X u,

an equality-constrained problem whose implicit gradient is the classical formula
dX = V (F o (V^T dV)) V^T with F_ij = 1 / (lambda_j - lambda_i). When two eigenvalues coincide, F blows up: the
gradient of an individual eigenvector inside a repeated eigenspace does not exist. torchddn masks those terms (no
NaN), warns with NonRegularWarning, and stays exact for losses that only depend on the eigenspace (or are
invariant to the eigenvector's sign).

This script
1. checks the gradient of a sign-invariant loss with gradcheck and against autograd through torch.linalg.eigh;
2. shows the behaviour at a repeated eigenvalue;
3. learns a symmetric matrix whose top eigenvector points in a target direction, and plots the alignment.
"""
import os
import warnings

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from torchddn.diagnostics import NonRegularWarning
from torchddn.nodes import eigenvectors

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64

# 1. A sign-invariant loss on the top eigenvector: (a^T v)^2 does not change when v -> -v.
n = 5
A = torch.randn(3, n, n, dtype=dtype)
X = (A + A.transpose(1, 2)).requires_grad_(True)
a = torch.randn(n, dtype=dtype)


def loss_ddn(X):
    v = eigenvectors(X, top_k=1)[..., 0]                   # (b, n)
    return ((v @ a) ** 2).sum()


def loss_eigh(X):
    v = torch.linalg.eigh(X)[1][..., -1]
    return ((v @ a) ** 2).sum()


assert torch.autograd.gradcheck(lambda X: eigenvectors(0.5 * (X + X.transpose(1, 2)), top_k=2), (X,))
(g_ddn,) = torch.autograd.grad(loss_ddn(X), X)
(g_ref,) = torch.autograd.grad(loss_eigh(X), X)
g_ref = 0.5 * (g_ref + g_ref.transpose(1, 2))              # compare on symmetric perturbations
print("max |torchddn - eigh autograd| =", (g_ddn - g_ref).abs().max().item())
assert torch.allclose(g_ddn, g_ref, atol=1e-10)

# 2. A repeated eigenvalue: X = diag(1, 2, 2). The eigenvectors of the eigenvalue 2 are not unique.
Xr = torch.diag(torch.tensor([1.0, 2.0, 2.0], dtype=dtype)).requires_grad_(True)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    V = eigenvectors(Xr)
    (g,) = torch.autograd.grad(V[:, 2].sum(), Xr)          # depends on the choice inside the eigenspace
print("gradient finite:", bool(torch.isfinite(g).all()),
      "| warnings:", [w.category.__name__ for w in caught])
assert torch.isfinite(g).all()
# The projector onto the repeated eigenspace is well defined, and its gradient is exact.
with warnings.catch_warnings():
    warnings.simplefilter("ignore", NonRegularWarning)
    V = eigenvectors(Xr)
    P = V[:, 1:] @ V[:, 1:].T
    (g,) = torch.autograd.grad((P * torch.randn(3, 3, dtype=dtype)).sum(), Xr)
print("projector gradient finite:", bool(torch.isfinite(g).all()))

# 3. Learn X = B + B^T so that its top eigenvector aligns with a target direction.
n = 8
target = torch.randn(n, dtype=dtype)
target = target / target.norm()
B = torch.randn(n, n, dtype=dtype, requires_grad=True)
opt = torch.optim.Adam([B], lr=0.05)
alignment = []
for step in range(40 if QUICK else 200):
    v = eigenvectors(B + B.T, top_k=1)[:, 0]
    cos2 = (v @ target) ** 2                                 # sign-invariant
    opt.zero_grad()
    (-cos2).backward()
    opt.step()
    alignment.append(cos2.item())
print(f"alignment cos^2: {alignment[0]:.3f} -> {alignment[-1]:.3f}")
assert alignment[-1] > 0.9

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(alignment)
ax.set_xlabel("step")
ax.set_ylabel("cos^2(top eigenvector, target)")
ax.set_ylim(0, 1.05)
ax.set_title("learning a matrix through its eigenvector")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "eigenvectors_alignment.png"))
plt.close(fig)
print("saved plot to", OUT)
