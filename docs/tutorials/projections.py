"""Euclidean projections as layers.

``torchddn.nodes.project(x, kind, radius=1.0, dim=-1)`` computes y = argmin_{u in C} 1/2 ||u - x||^2 for C one of
the simplex, the L1/L2/Linf balls and the L1/L2/Linf spheres of a given radius. Forward passes are exact
(sort-based for the simplex and L1); backward passes are closed forms. For example, onto the L2 sphere,
Dy = r (I - y y^T / r^2) / ||x||, and onto the simplex Dy = diag(s) - s s^T / |s| with s the support of y.

This script
1. projects a 2D grid onto each set and plots the results;
2. checks gradients with gradcheck, against closed forms, and against a generic constrained declarative node
   built from the same objective (an independent computation);
3. shows the gradient with respect to the radius.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import torchddn as ddn
from torchddn.nodes import project

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64

# 1. Project random 2D points onto each set.
kinds = ["simplex", "l1_ball", "l2_ball", "linf_ball", "l1_sphere", "l2_sphere", "linf_sphere"]
pts = 2.4 * torch.rand(40 if QUICK else 150, 2, dtype=dtype) - 1.2
fig, axes = plt.subplots(1, len(kinds), figsize=(2.4 * len(kinds), 2.6))
for ax, kind in zip(axes, kinds):
    y = project(pts, kind, radius=1.0)
    for a, q in zip(pts, y):
        ax.plot([a[0], q[0]], [a[1], q[1]], color="lightgray", linewidth=0.6)
    ax.scatter(y[:, 0], y[:, 1], s=6, color="tab:blue")
    ax.set_title(kind, fontsize=9)
    ax.set_aspect("equal")
    ax.set_xlim(-1.3, 1.3)
    ax.set_ylim(-1.3, 1.3)
    ax.set_xticks([])
    ax.set_yticks([])
fig.tight_layout()
fig.savefig(os.path.join(OUT, "projections.png"))
plt.close(fig)

# 2a. gradcheck for every kind, on points away from the sets' non-differentiable points.
x = torch.randn(3, 5, dtype=dtype) * 1.5
x.requires_grad_(True)
for kind in kinds:
    assert torch.autograd.gradcheck(lambda t: project(t, kind, radius=0.8), (x,)), kind
print("gradcheck passed for", ", ".join(kinds))

# 2b. Closed form for the L2 sphere: v^T Dy = r (v - (v.y) y / r^2) / ||x||.
r = 0.8
v = torch.randn(3, 5, dtype=dtype)
y = project(x, "l2_sphere", radius=r)
(g,) = torch.autograd.grad((y * v).sum(), x)
xd = x.detach()
expected = r * (v - (v * y.detach()).sum(1, keepdim=True) * y.detach() / r**2) / xd.norm(dim=1, keepdim=True)
assert torch.allclose(g, expected, atol=1e-10)


# 2c. The same projection onto the simplex declared as a generic inequality-constrained node.
class SimplexNode(ddn.IneqConstDeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(1)

    def initial_guess(self, x):
        return torch.full_like(x, 1.0 / x.shape[1])

    def equality_constraints(self, x, y):
        return y.sum(1) - 1.0

    def inequality_constraints(self, x, y):
        return -y


(g_fast,) = torch.autograd.grad((project(x, "simplex") * v).sum(), x)
(g_generic,) = torch.autograd.grad((ddn.DeclarativeLayer(SimplexNode())(x) * v).sum(), x)
print("simplex: max |closed form - generic node| =", (g_fast - g_generic).abs().max().item())
assert torch.allclose(g_fast, g_generic, atol=1e-6)

# 3. Gradient with respect to the radius: for the L2 ball with ||x|| > r, y = r x / ||x||, so dy/dr = x / ||x||.
radius = torch.tensor(0.5, dtype=dtype, requires_grad=True)
xo = torch.tensor([[3.0, 4.0]], dtype=dtype)                 # ||x|| = 5 > r
(g_r,) = torch.autograd.grad(project(xo, "l2_ball", radius=radius).sum(), radius)
print("d sum(y) / d r =", g_r.item(), "(expected", (xo / 5).sum().item(), ")")
assert abs(g_r.item() - 1.4) < 1e-12
print("saved plot to", OUT)
