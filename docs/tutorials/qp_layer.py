"""The QP layer: a batched, differentiable quadratic programme (OptNet).

``torchddn.nodes.qp(Q, p, G, h, A=None, b=None)`` solves, for every batch element,

    z = argmin_z  1/2 z^T Q z + p^T z   subject to   G z <= h,  A z = b,

with a batched primal-dual interior point method, and differentiates the solution with respect to all of
Q, p, G, h, A, b by the implicit function theorem (reusing the forward's factorisation). Parameters may be shared
across the batch (e.g. Q of shape (n, n) with p of shape (B, n)); their gradients are summed over the batch.

This script
1. solves a batch of box-constrained QPs and checks them against scipy;
2. checks the gradient with gradcheck and against the closed-form active-set gradient;
3. uses the QP as a layer: learns the linear term p so that the solution reaches a target, and plots the loss.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from scipy.optimize import minimize

from torchddn.nodes.qp import qp

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64

# 1. A batch of QPs sharing Q, G, h: minimise 1/2 z^T Q z + p^T z subject to -1 <= z <= 1.
n, batch = 4, 6
L = torch.randn(n, n, dtype=dtype)
Q = L @ L.T / n + torch.eye(n, dtype=dtype)                               # well conditioned, SPD
G = torch.cat([torch.eye(n, dtype=dtype), -torch.eye(n, dtype=dtype)])   # z <= 1 and -z <= 1
h = torch.ones(2 * n, dtype=dtype)
p = 3.0 * torch.randn(batch, n, dtype=dtype)                               # large p: some bounds are active
z = qp(Q, p, G, h)                                                         # (batch, n)

for i in range(batch):
    res = minimize(lambda u: 0.5 * u @ Q.numpy() @ u + p[i].numpy() @ u, np.zeros(n),
                   jac=lambda u: Q.numpy() @ u + p[i].numpy(), bounds=[(-1, 1)] * n, method="L-BFGS-B",
                   options={"ftol": 1e-15, "gtol": 1e-12})
    assert np.allclose(z[i].numpy(), res.x, atol=1e-5), (z[i], res.x)
active = (z.abs() > 1 - 1e-8)
print("solutions agree with scipy; active bounds per element:", active.sum(1).tolist())

# 2. Gradients. gradcheck with respect to Q, p and h on a small batch ...
Qg = Q.clone().requires_grad_(True)
pg = p[:2].clone().requires_grad_(True)
hg = h.clone().requires_grad_(True)
assert torch.autograd.gradcheck(lambda Q_, p_, h_: qp(0.5 * (Q_ + Q_.T), p_, G, h_), (Qg, pg, hg))

# ... and against the active-set formula: with the active bounds fixed, z_F = -Q_FF^{-1}(p_F + Q_FA z_A), so
# dz_F/dp_F = -Q_FF^{-1} and dz_A/dp = 0.
pg = p.clone().requires_grad_(True)
w = torch.randn(batch, n, dtype=dtype)
(g,) = torch.autograd.grad((qp(Q, pg, G, h) * w).sum(), pg)
for i in range(batch):
    free = ~active[i]
    expected = torch.zeros(n, dtype=dtype)
    if free.any():
        expected[free] = -torch.linalg.solve(Q[free][:, free], w[i, free])
    assert torch.allclose(g[i], expected, atol=1e-6), (g[i], expected)
print("gradient matches the active-set formula")

# 3. The QP as a layer: learn p so that the (box-constrained) solution reaches a target inside the box.
target = torch.tensor([0.5, -0.25, 0.9, -1.0], dtype=dtype)                # the last entry sits on a bound
p_learn = torch.zeros(1, n, dtype=dtype, requires_grad=True)
opt = torch.optim.Adam([p_learn], lr=0.5)
losses = []
for step in range(60 if QUICK else 300):
    zl = qp(Q, p_learn, G, h)
    loss = ((zl - target) ** 2).sum()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"loss {losses[0]:.3e} -> {losses[-1]:.3e}")
assert losses[-1] < 0.1 * losses[0]

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.semilogy(losses)
ax.set_xlabel("step")
ax.set_ylabel("||z(p) - target||^2")
ax.set_title("learning the linear term of a QP")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "qp_layer_learning.png"))
plt.close(fig)
print("saved plot to", OUT)
