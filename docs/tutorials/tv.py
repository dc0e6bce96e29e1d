"""Total-variation denoising: a piecewise-constant layer with an exact gradient, and learning its weight.

``torchddn.nodes.tv_denoise(x, lam)`` solves the 1D total-variation problem

    y = argmin_u  1/2 ||u - x||^2 + lam * sum_i |u_i - u_{i+1}|

exactly. The solution is piecewise constant: neighbouring entries fuse into groups. The gradient accounts for
the fusion: inside a fused group G, y_G = mean(x_G) + lam * (sign terms) / |G|, so dy_i/dx_j = 1/|G| for i, j in the
same group (the identity is wrong whenever neighbours fuse), and the gradient with respect to lam follows.

This script
1. denoises a noisy step signal and plots it;
2. checks the gradient with gradcheck, against finite differences of re-solves, and against the group-mean rule;
3. learns lam by gradient descent so that the denoised signal best matches the clean one (a bilevel problem).
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from torchddn.nodes import tv_denoise

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64

# 1. A noisy piecewise-constant signal.
n = 60 if QUICK else 300
t = torch.arange(n, dtype=dtype) / n
clean = (t > 0.2).to(dtype) - 1.5 * (t > 0.5).to(dtype) + 0.8 * (t > 0.8).to(dtype)
noisy = clean + 0.3 * torch.randn(n, dtype=dtype)
y = tv_denoise(noisy[None], 1.0)[0]
print(f"error: noisy {((noisy - clean) ** 2).mean():.4f}, denoised {((y - clean) ** 2).mean():.4f}")

# 2. Gradients.
x = torch.randn(2, 8, dtype=dtype, requires_grad=True)
lam = torch.tensor([0.3, 0.6], dtype=dtype, requires_grad=True)
assert torch.autograd.gradcheck(tv_denoise, (x, lam))

# Group-mean rule: the gradient of sum(v * y) w.r.t. x is the mean of v over each fused group.
yx = tv_denoise(x, lam)
v = torch.randn(2, 8, dtype=dtype)
(gx,) = torch.autograd.grad((yx * v).sum(), x, retain_graph=True)
for i in range(2):
    fused = (yx[i, 1:] - yx[i, :-1]).abs() < 1e-9
    group = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(~fused, 0)])
    expected = torch.zeros(int(group.max()) + 1, dtype=dtype).index_add_(0, group, v[i])
    expected = expected / torch.bincount(group).to(dtype)
    assert torch.allclose(gx[i], expected[group], atol=1e-10)
print("gradient = mean of the incoming gradient over each fused group")

# Finite differences of re-solves for d y / d lam.
eps = 1e-6
(glam,) = torch.autograd.grad((yx * v).sum(), lam)
fd = ((tv_denoise(x.detach(), lam.detach() + eps) - tv_denoise(x.detach(), lam.detach() - eps)) * v).sum(1) / (2 * eps)
assert torch.allclose(glam, fd, atol=1e-6)

# 3. Learn lam (through its logarithm, to keep it positive) on a training signal.
log_lam = torch.tensor(-2.0, dtype=dtype, requires_grad=True)
opt = torch.optim.Adam([log_lam], lr=0.2)
history = []
for step in range(20 if QUICK else 80):
    loss = ((tv_denoise(noisy[None], log_lam.exp()) - clean) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    history.append((log_lam.exp().item(), loss.item()))
print(f"lam {history[0][0]:.3f} -> {history[-1][0]:.3f}; error {history[0][1]:.4f} -> {history[-1][1]:.4f}")
assert history[-1][1] < history[0][1]

y_best = tv_denoise(noisy[None], log_lam.exp().detach())[0]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
ax1.plot(t, noisy, ".", ms=3, color="gray", label="noisy")
ax1.plot(t, clean, color="black", label="clean")
ax1.plot(t, y_best, color="tab:red", label=f"TV, learned lam = {history[-1][0]:.2f}")
ax1.legend(fontsize=8)
ax1.set_title("total-variation denoising")
ax2.plot([h for h, _ in history], [e for _, e in history], "o-", ms=3)
ax2.set_xscale("log")
ax2.set_xlabel("lam")
ax2.set_ylabel("MSE to the clean signal")
ax2.set_title("learning lam by gradient descent")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "tv_denoising.png"))
plt.close(fig)
print("saved plot to", OUT)
