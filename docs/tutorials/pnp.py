"""Perspective-n-point: a differentiable camera-pose layer.

``torchddn.nodes.pnp(X, x, w)`` estimates the pose (R, t) -- or, with ``return_axis_angle=True``, the 6 numbers of
an axis-angle rotation and a translation -- of a calibrated camera from n correspondences between 3D points and their 2D images (normalised image coordinates),
by minimising the weighted reprojection error

    pose = argmin_{r, t}  1/2 sum_i w_i || pi(R(r) X_i + t) - x_i ||^2,      pi(X) = (X_1 / X_3, X_2 / X_3).

The forward pass is a batched RANSAC initialisation followed by Levenberg-Marquardt refinement; the backward pass
differentiates the optimality conditions with the exact 6x6 Hessian, giving gradients with respect to the 3D
points, the 2D points and the weights.

This script
1. recovers poses from noisy correspondences with outliers;
2. checks the gradient with respect to the weights against finite differences of re-solves;
3. learns per-point weights by gradient descent through the layer so that the pose error falls, and plots it.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from torchddn.nodes.pnp import pnp as _pnp

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64


def pnp(p3d, p2d, weights):
    """Pose (b, 6) = (axis-angle, translation); RANSAC sampling with a fixed seed for reproducible re-solves."""
    gen = torch.Generator().manual_seed(0)
    return _pnp(p3d, p2d, weights, return_axis_angle=True, generator=gen)


def rotation(r):
    """Rodrigues' formula: axis-angle (b, 3) -> rotation matrices (b, 3, 3)."""
    theta = r.norm(dim=1, keepdim=True).clamp_min(1e-12)
    k = r / theta
    K = torch.zeros(r.shape[0], 3, 3, dtype=r.dtype)
    K[:, 0, 1], K[:, 0, 2], K[:, 1, 2] = -k[:, 2], k[:, 1], -k[:, 0]
    K = K - K.transpose(1, 2)
    s, c = torch.sin(theta)[..., None], torch.cos(theta)[..., None]
    return torch.eye(3, dtype=r.dtype) + s * K + (1 - c) * K @ K


def project(pose, p3d):
    X = p3d @ rotation(pose[:, :3]).transpose(1, 2) + pose[:, None, 3:]
    return X[..., :2] / X[..., 2:]


# 1. Synthetic data: random points in front of the camera, noisy images, a fraction of outliers.
b, n = (2, 20) if QUICK else (8, 60)
true_pose = torch.cat([0.3 * torch.randn(b, 3, dtype=dtype), torch.tensor([0.0, 0.0, 6.0], dtype=dtype)
                       + 0.3 * torch.randn(b, 3, dtype=dtype)], dim=1)
p3d = 2 * torch.rand(b, n, 3, dtype=dtype) - 1
p2d = project(true_pose, p3d) + 0.002 * torch.randn(b, n, 2, dtype=dtype)
outlier = torch.rand(b, n) < 0.2
p2d[outlier] += 0.05 * torch.randn(int(outlier.sum()), 2, dtype=dtype)
weights = torch.ones(b, n, dtype=dtype)
pose = pnp(p3d, p2d, weights)
err = (pose - true_pose).norm(dim=1)
print("pose error with uniform weights:", err.numpy().round(4))

# 2. Gradient with respect to the weights, against central finite differences of re-solves.
w = weights[:1].clone().requires_grad_(True)
v = torch.randn(1, 6, dtype=dtype)
(g,) = torch.autograd.grad((pnp(p3d[:1], p2d[:1], w) * v).sum(), w)
eps = 1e-4  # central differences: O(eps^2) truncation error, well above the solver tolerance
for i in range(2):
    dw = torch.zeros_like(w)
    dw[0, i] = eps
    fd = ((pnp(p3d[:1], p2d[:1], w.detach() + dw) - pnp(p3d[:1], p2d[:1], w.detach() - dw)) * v).sum() / (2 * eps)
    assert abs(fd.item() - g[0, i].item()) < 1e-3 * (abs(fd.item()) + 1e-3), (fd.item(), g[0, i].item())
print("gradient with respect to the weights matches finite differences")

# 3. Learn per-point weights (through their logarithms) that minimise the pose error.
log_w = torch.zeros(b, n, dtype=dtype, requires_grad=True)
opt = torch.optim.Adam([log_w], lr=0.3)
history = []
for step in range(10 if QUICK else 60):
    pose = pnp(p3d, p2d, log_w.exp())
    loss = ((pose - true_pose) ** 2).sum(1).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    history.append(loss.item())
print(f"pose error {history[0]:.2e} -> {history[-1]:.2e}")
assert history[-1] <= history[0]
learned = log_w.exp().detach()
print("mean learned weight: inliers", learned[~outlier].mean().item(), " outliers", learned[outlier].mean().item())

fig, ax = plt.subplots(figsize=(5, 3.5))
ax.semilogy(history)
ax.set_xlabel("step")
ax.set_ylabel("squared pose error")
ax.set_title("learning correspondence weights through PnP")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "pnp_learning.png"))
plt.close(fig)
print("saved plot to", OUT)
