"""Robust pooling: averages that ignore outliers, with exact gradients.

``torchddn.nodes.robust_pool(x, penalty, alpha, dim)`` computes

    y = argmin_u  sum_i phi(u - x_i; alpha)

over the pooled dimension(s). With the quadratic penalty this is the mean; with pseudo-Huber, Huber, Welsch or
the truncated quadratic, points far from the bulk have little or no influence. The backward pass is the closed form
dy/dx_i = phi''(y - x_i) / sum_j phi''(y - x_j): each point's weight in the gradient is its curvature at the
solution, so outliers get (nearly) zero weight.

This script
1. pools sets of numbers contaminated by a growing fraction of outliers and plots each estimate's error;
2. checks the gradient with torch.autograd.gradcheck (float64) and against the closed form above;
3. plots the gradient weight of each point (its influence on the pooled value).
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from torchddn.nodes.robust_pool import robust_pool

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)

PENALTIES = ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"]
n_sets, n_points = (32, 50) if QUICK else (256, 200)

# 1. Sets of points around 0 (inliers, std 0.3) with a fraction replaced by outliers around +6.
fractions = [0.0, 0.1, 0.2, 0.3, 0.4] if QUICK else [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]
errors = {p: [] for p in PENALTIES}
for frac in fractions:
    x = 0.3 * torch.randn(n_sets, n_points, dtype=torch.float64)
    n_out = int(frac * n_points)
    x[:, :n_out] = 6.0 + torch.randn(n_sets, n_out, dtype=torch.float64)
    for p in PENALTIES:
        y = robust_pool(x, p, alpha=1.0, dim=-1)          # (n_sets,)
        errors[p].append(y.abs().mean().item())            # the true location is 0

print("mean |error| of the pooled value, by outlier fraction")
print("penalty".ljust(22) + " ".join(f"{f:6.2f}" for f in fractions))
for p in PENALTIES:
    print(p.ljust(22) + " ".join(f"{e:6.3f}" for e in errors[p]))
assert errors["welsch"][-1] < 0.5 * errors["quadratic"][-1]  # robust beats the mean under outliers

fig, ax = plt.subplots(figsize=(6, 4))
for p in PENALTIES:
    ax.plot(fractions, errors[p], "o-", label=p)
ax.set_xlabel("outlier fraction")
ax.set_ylabel("mean |pooled value - true location|")
ax.set_yscale("symlog", linthresh=1e-2)
ax.legend()
ax.set_title("robust pooling under outliers")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "robust_pooling_error.png"))
plt.close(fig)

# 2. Gradients: gradcheck, and the closed form dy/dx_i = phi''(y - x_i) / sum_j phi''(y - x_j).
x = torch.randn(3, 8, dtype=torch.float64)
x[:, 0] += 5.0                                             # one outlier per set
x.requires_grad_(True)
for p in ["pseudo_huber", "huber", "welsch"]:
    assert torch.autograd.gradcheck(lambda t: robust_pool(t, p, alpha=1.0), (x,))

alpha = 1.0
y = robust_pool(x, "pseudo_huber", alpha=alpha)
(grad,) = torch.autograd.grad(y.sum(), x)
z = (y.detach()[:, None] - x.detach()) / alpha
curvature = (1 + z**2) ** -1.5                             # phi'' of the pseudo-Huber penalty
closed_form = curvature / curvature.sum(dim=1, keepdim=True)
print("max |autograd - closed form| =", (grad - closed_form).abs().max().item())
assert torch.allclose(grad, closed_form, atol=1e-10)

# 3. Influence of each point on the pooled value.
xs = torch.cat([0.3 * torch.randn(40, dtype=torch.float64), torch.tensor([2.0, 3.0, 4.0, 6.0], dtype=torch.float64)])
fig, ax = plt.subplots(figsize=(6, 4))
for p in ["quadratic", "pseudo_huber", "huber", "welsch"]:
    xi = xs.clone()[None].requires_grad_(True)
    (w,) = torch.autograd.grad(robust_pool(xi, p, alpha=1.0).sum(), xi)
    order = torch.argsort(xs)
    ax.plot(xs[order], w[0, order], ".-", label=p)
ax.set_xlabel("point value x_i")
ax.set_ylabel("dy / dx_i")
ax.set_title("gradient weight of each point (outliers at 2..6)")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(OUT, "robust_pooling_weights.png"))
plt.close(fig)
print("saved plots to", OUT)
