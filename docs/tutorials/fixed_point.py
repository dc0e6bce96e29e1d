"""A fixed-point layer (deep equilibrium model).

``torchddn.FixedPointNode`` computes y with y = T(x, y): the "infinitely deep" layer of a deep equilibrium model.
Subclass it and define ``T(*xs, y)`` and ``initial_guess(*xs)``. The forward pass runs Anderson acceleration
(or Broyden, or plain Picard iteration); the backward pass solves the adjoint system (I - dT/dy)^T u = v
matrix-free, so memory does not grow with the number of forward iterations. With ``phantom=k`` the backward
is the cheaper phantom gradient (k damped unrolled steps at the fixed point).

This script
1. declares y = tanh(W y + U x + c) with a contractive W, passing the weights as inputs so they get gradients;
2. checks the gradient with gradcheck, against autograd through many unrolled iterations, and on a linear T
   against the closed form y = (I - W)^{-1} x;
3. compares the forward solvers' iteration counts and the phantom gradient's accuracy;
4. trains the equilibrium layer on a small regression task and plots the loss.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import torchddn as ddn

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64


class TanhEquilibrium(ddn.FixedPointNode):
    """y = tanh(y W^T + x U^T + c); x (b, d), W (b, h, h), U (b, h, d), c (b, h) -> y (b, h)."""

    def T(self, x, W, U, c, y):
        return torch.tanh(torch.einsum("bij,bj->bi", W, y) + torch.einsum("bij,bj->bi", U, x) + c)

    def initial_guess(self, x, W, U, c):
        return torch.zeros(x.shape[0], W.shape[1], dtype=x.dtype, device=x.device)


def batch_params(W, U, c, b):
    return W.expand(b, *W.shape), U.expand(b, *U.shape), c.expand(b, *c.shape)


d, h, b = 3, 6, 4
W0 = torch.randn(h, h, dtype=dtype)
W0 = 0.8 * W0 / torch.linalg.matrix_norm(W0, ord=2)           # spectral norm 0.8: T is a contraction
U0 = torch.randn(h, d, dtype=dtype)
c0 = 0.1 * torch.randn(h, dtype=dtype)
x = torch.randn(b, d, dtype=dtype)

# 1-2. Forward, gradcheck, and comparison with autograd through the unrolled iteration.
node = TanhEquilibrium()
layer = ddn.DeclarativeLayer(node)
W, U, c = (t.clone().requires_grad_(True) for t in (W0, U0, c0))
y = layer(x, *batch_params(W, U, c, b))
print("forward iterations:", node.diagnostics.iterations.tolist(),
      "| max residual:", float(node.diagnostics.residual.max()))
loss_w = torch.randn(b, h, dtype=dtype)
grads = torch.autograd.grad((y * loss_w).sum(), (W, U, c))

Wu, Uu, cu = (t.clone().requires_grad_(True) for t in (W0, U0, c0))
yu = torch.zeros(b, h, dtype=dtype)
for _ in range(200):                                           # converges: contraction factor <= 0.8
    yu = torch.tanh(yu @ Wu.T + x @ Uu.T + cu)
grads_unrolled = torch.autograd.grad((yu * loss_w).sum(), (Wu, Uu, cu))
err = max((g1 - g2).abs().max().item() for g1, g2 in zip(grads, grads_unrolled))
print("implicit vs unrolled (200 steps) gradient difference:", err)
assert err < 1e-8

xg = x[:2].clone().requires_grad_(True)
Wg = W0[None].expand(2, h, h).clone().requires_grad_(True)
assert torch.autograd.gradcheck(lambda x_, W_: layer(x_, W_, U0.expand(2, h, d), c0.expand(2, h)), (xg, Wg))


class Linear(ddn.FixedPointNode):
    """y = W y + x, whose fixed point is y = (I - W)^{-1} x."""

    def T(self, x, W, y):
        return torch.einsum("bij,bj->bi", W, y) + x

    def initial_guess(self, x, W):
        return torch.zeros_like(x)


xl = torch.randn(b, h, dtype=dtype, requires_grad=True)
Wl = W0.expand(b, h, h)
yl = ddn.DeclarativeLayer(Linear())(xl, Wl)
closed = torch.linalg.solve(torch.eye(h, dtype=dtype) - Wl, xl)
(g1,) = torch.autograd.grad((yl * loss_w).sum(), xl)
(g2,) = torch.autograd.grad((closed * loss_w).sum(), xl)
assert torch.allclose(yl, closed, atol=1e-8) and torch.allclose(g1, g2, atol=1e-8)
print("linear T: solution and gradient match (I - W)^{-1} x")

# 3. Forward solvers and the phantom gradient.
for solver in ["picard", "anderson", "broyden"]:
    n_s = TanhEquilibrium(forward_solver=solver)
    ddn.DeclarativeLayer(n_s)(x, *batch_params(W0, U0, c0, b))
    print(f"{solver:9s} iterations: {n_s.diagnostics.iterations.tolist()}")
for k in [2, 5, 20]:
    Wp, Up, cp = (t.clone().requires_grad_(True) for t in (W0, U0, c0))
    yp = ddn.DeclarativeLayer(TanhEquilibrium(phantom=k))(x, *batch_params(Wp, Up, cp, b))
    gp = torch.autograd.grad((yp * loss_w).sum(), (Wp, Up, cp))
    rel = sum((a - e).norm() ** 2 for a, e in zip(gp, grads)).sqrt() / sum(e.norm() ** 2 for e in grads).sqrt()
    print(f"phantom gradient, k = {k:2d}: relative error {rel.item():.2e}")

# 4. Train the equilibrium layer (and a linear read-out) to fit a smooth target.
n_train = 64 if QUICK else 256
X = torch.rand(n_train, d, dtype=dtype) * 2 - 1
target = torch.sin(2 * X[:, :1]) * X[:, 1:2] + 0.5 * X[:, 2:3] ** 2
W = (0.5 * W0).clone().requires_grad_(True)
U, c = U0.clone().requires_grad_(True), c0.clone().requires_grad_(True)
readout = torch.nn.Linear(h, 1, dtype=dtype)
opt = torch.optim.Adam([W, U, c, *readout.parameters()], lr=0.03)
train_layer = ddn.DeclarativeLayer(TanhEquilibrium())
losses = []
for step in range(30 if QUICK else 300):
    Ws = W / torch.clamp(torch.linalg.matrix_norm(W, ord=2) / 0.9, min=1.0)   # keep T contractive
    pred = readout(train_layer(X, *batch_params(Ws, U, c, n_train)))
    loss = ((pred - target) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
print(f"training loss {losses[0]:.4f} -> {losses[-1]:.4f}")
assert losses[-1] < losses[0]

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.semilogy(losses)
ax.set_xlabel("step")
ax.set_ylabel("training MSE")
ax.set_title("training a deep equilibrium layer")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "fixed_point_training.png"))
plt.close(fig)
print("saved plot to", OUT)
