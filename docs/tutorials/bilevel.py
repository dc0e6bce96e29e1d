"""A bilevel problem: choose a regularisation weight by gradient descent on the validation loss.

The lower-level problem is ridge regression on the training data,

    w(beta) = argmin_w  ||A w - b||^2 + beta ||w||^2,

and the upper-level problem chooses beta to minimise the validation error ||A_val w(beta) - b_val||^2. A
declarative node makes w(beta) a differentiable layer, so the upper level is plain gradient descent: the gradient
d w / d beta comes from the implicit function theorem, not from unrolling the solver.

This script
1. declares the lower-level problem as a ``DeclarativeNode`` (inputs A, b and log beta);
2. checks d w / d log(beta) against the closed-form ridge gradient, and against torchddn's
   ``weighted_least_squares`` node (an independent implementation);
3. descends on log(beta) and plots the validation loss along the way, over the exact curve.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import torchddn as ddn
from torchddn.nodes import weighted_least_squares

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64


class Ridge(ddn.DeclarativeNode):
    """w = argmin ||A w - b||^2 + exp(log_beta) ||w||^2; A (1, n, p), b (1, n), log_beta (1, 1) -> w (1, p)."""

    def initial_guess(self, A, b, log_beta):
        return torch.zeros(A.shape[0], A.shape[2], dtype=A.dtype, device=A.device)

    def objective(self, A, b, log_beta, y):
        residual = torch.einsum("bnp,bp->bn", A, y) - b
        return (residual**2).sum(1) + log_beta.exp()[:, 0] * (y**2).sum(1)


# Data: few noisy training samples, many features, so that some regularisation helps.
n_train, n_val, p = 30, 200, 20
w_true = torch.randn(p, dtype=dtype)
A, A_val = torch.randn(1, n_train, p, dtype=dtype), torch.randn(1, n_val, p, dtype=dtype)
b = A @ w_true + 2.0 * torch.randn(1, n_train, dtype=dtype)
b_val = A_val @ w_true + 2.0 * torch.randn(1, n_val, dtype=dtype)

ridge = ddn.DeclarativeLayer(Ridge())


def ridge_closed_form(log_beta):
    H = A[0].T @ A[0] + log_beta.exp() * torch.eye(p, dtype=dtype)
    return torch.linalg.solve(H, A[0].T @ b[0])


def validation_loss(w):
    return ((A_val[0] @ w.reshape(-1) - b_val[0]) ** 2).mean()


# 2. Check the hypergradient three ways.
log_beta = torch.tensor([[1.0]], dtype=dtype, requires_grad=True)
(g_ddn,) = torch.autograd.grad(validation_loss(ridge(A, b, log_beta)), log_beta)
lb = log_beta.detach()[0, 0].clone().requires_grad_(True)
(g_closed,) = torch.autograd.grad(validation_loss(ridge_closed_form(lb)), lb)
lb2 = log_beta.detach()[0].clone().requires_grad_(True)
(g_wls,) = torch.autograd.grad(validation_loss(weighted_least_squares(A, b, beta=lb2.exp())), lb2)
print(f"d val / d log beta: declarative {g_ddn.item():.8f}, closed form {g_closed.item():.8f}, "
      f"weighted_least_squares {g_wls.item():.8f}")
assert torch.allclose(g_ddn.reshape(()), g_closed, rtol=1e-6)
assert torch.allclose(g_ddn.reshape(()), g_wls.reshape(()), rtol=1e-6)
assert torch.autograd.gradcheck(lambda lb: ridge(A, b, lb), (log_beta,))

# 3. Gradient descent on log beta (the upper level).
log_beta = torch.tensor([[-2.0]], dtype=dtype, requires_grad=True)
opt = torch.optim.Adam([log_beta], lr=0.3)
path = []
for step in range(15 if QUICK else 60):
    loss = validation_loss(ridge(A, b, log_beta))
    path.append((log_beta.item(), loss.item()))
    opt.zero_grad()
    loss.backward()
    opt.step()
print(f"log beta {path[0][0]:.2f} -> {path[-1][0]:.2f}; validation loss {path[0][1]:.4f} -> {path[-1][1]:.4f}")
assert path[-1][1] < path[0][1]

grid = torch.linspace(-3, 6, 60, dtype=dtype)
curve = [validation_loss(ridge_closed_form(t)).item() for t in grid]
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(grid, curve, label="validation loss (closed form)")
ax.plot([q for q, _ in path], [v for _, v in path], "o-", ms=3, label="gradient descent through the node")
ax.set_xlabel("log beta")
ax.set_ylabel("validation MSE")
ax.set_title("bilevel: tuning ridge regularisation")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "bilevel_validation.png"))
plt.close(fig)
print("saved plot to", OUT)
