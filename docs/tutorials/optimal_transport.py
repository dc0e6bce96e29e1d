"""Optimal transport: a differentiable Sinkhorn layer.

``torchddn.nodes.sinkhorn(M, r, c, gamma)`` returns the entropy-regularised transport plan

    P = argmin_{P >= 0, P 1 = r, P^T 1 = c}  <P, M> - (1/gamma) H(P)  =  diag(u) exp(-gamma M) diag(v)

between histograms r and c for the cost matrix M. The forward is a log-domain Sinkhorn iteration; the default
backward (``backward="implicit"``) differentiates the optimality conditions exactly, with memory independent of the
number of iterations. ``backward="truncated"`` back-propagates through the last few iterations instead (cheaper,
approximate).

This script
1. transports one 1D histogram onto another and plots the plan;
2. checks the implicit gradient with gradcheck, against autograd through many unrolled iterations, and compares the
   truncated approximation;
3. learns a cost matrix so that the plan matches a target permutation (a differentiable matching).
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from torchddn.nodes import sinkhorn

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64

# 1. Transport between two 1D histograms with the squared-distance cost.
m, n = (20, 25) if QUICK else (60, 80)
s = torch.linspace(0, 1, m, dtype=dtype)
t = torch.linspace(0, 1, n, dtype=dtype)
r = torch.exp(-((s - 0.3) / 0.1) ** 2) + 0.5 * torch.exp(-((s - 0.75) / 0.07) ** 2) + 1e-3
c = torch.exp(-((t - 0.6) / 0.15) ** 2) + 1e-3
r, c = r / r.sum(), c / c.sum()
M = (s[:, None] - t[None, :]) ** 2
P = sinkhorn(M, r, c, gamma=200.0)
print("row-sum error", (P.sum(1) - r).abs().max().item(), " column-sum error", (P.sum(0) - c).abs().max().item())
assert torch.allclose(P.sum(1), r, atol=1e-8) and torch.allclose(P.sum(0), c, atol=1e-8)

fig, ax = plt.subplots(figsize=(5, 4))
ax.imshow(P.numpy(), origin="lower", aspect="auto", extent=(0, 1, 0, 1), cmap="viridis")
ax.set_xlabel("target position (c)")
ax.set_ylabel("source position (r)")
ax.set_title("entropic transport plan")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "optimal_transport_plan.png"))
plt.close(fig)

# 2. Gradients. gradcheck on a small problem, then the implicit gradient against autograd through an unrolled
#    log-domain Sinkhorn run for many iterations (an independent computation that converges to the same value).
Ms = torch.rand(2, 4, 5, dtype=dtype, requires_grad=True)
assert torch.autograd.gradcheck(lambda A: sinkhorn(A, gamma=2.0), (Ms,))


def unrolled_sinkhorn(M, r, c, gamma, iters):
    logk = -gamma * M
    a = torch.zeros_like(r)
    b = torch.zeros_like(c)
    for _ in range(iters):
        a = r.log() - torch.logsumexp(logk + b[..., None, :], dim=-1)
        b = c.log() - torch.logsumexp(logk + a[..., :, None], dim=-2)
    return torch.exp(logk + a[..., :, None] + b[..., None, :])


W = torch.randn(2, 4, 5, dtype=dtype)                       # a random linear loss <W, P>
r2 = torch.full((2, 4), 1 / 4, dtype=dtype)
c2 = torch.full((2, 5), 1 / 5, dtype=dtype)
(g_implicit,) = torch.autograd.grad((W * sinkhorn(Ms, r2, c2, gamma=2.0)).sum(), Ms)
(g_unrolled,) = torch.autograd.grad((W * unrolled_sinkhorn(Ms, r2, c2, 2.0, 500)).sum(), Ms)
(g_truncated,) = torch.autograd.grad((W * sinkhorn(Ms, r2, c2, gamma=2.0, backward="truncated", truncate=3)).sum(), Ms)
print("implicit vs unrolled (500 its):", (g_implicit - g_unrolled).abs().max().item())
print("implicit vs truncated (3 its): ", (g_implicit - g_truncated).abs().max().item())
assert torch.allclose(g_implicit, g_unrolled, atol=1e-8)

# 3. Learn a cost matrix whose plan is a given permutation: minimise -<P, T> over M.
k = 6
perm = torch.randperm(k)
T = torch.eye(k, dtype=dtype)[perm] / k                     # target plan, uniform marginals
logits = torch.zeros(k, k, dtype=dtype, requires_grad=True)
opt = torch.optim.Adam([logits], lr=0.3)
losses = []
for step in range(30 if QUICK else 150):
    P = sinkhorn(logits, gamma=5.0)
    loss = -(P * T).sum() * k                              # 1 when P equals the target permutation
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(-loss.item())
print(f"matching accuracy <P, T> * k: {losses[0]:.3f} -> {losses[-1]:.3f}")
assert losses[-1] > losses[0] + 0.2

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.plot(losses)
ax.set_xlabel("step")
ax.set_ylabel("mass on the target matching")
ax.set_title("learning a cost through Sinkhorn")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "optimal_transport_learning.png"))
plt.close(fig)
print("saved plots to", OUT)
