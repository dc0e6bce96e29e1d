"""Constrained nodes: equality, linear equality and inequality constraints, with mixed active sets in one batch.

Constrained declarative nodes add constraint functions to the objective:

* ``EqConstDeclarativeNode``: ``equality_constraints(*xs, y)`` returns h with h(x, y) = 0;
* ``LinEqConstDeclarativeNode``: ``linear_constraint_parameters(y)`` returns (A, d) with A y = d;
* ``IneqConstDeclarativeNode``: ``inequality_constraints(*xs, y)`` returns g with g(x, y) <= 0.

The gradient solves the KKT system of the Lagrangian over the equality and the *active* inequality constraints
(Propositions 4.5 and 4.6 of the paper). Every batch element has its own active set; torchddn handles a batch with
different active sets in one batched solve.

This script uses Euclidean projections, whose gradients are known in closed form:
1. onto the unit sphere (equality), Dy = (I - y y^T) / ||x||;
2. onto the hyperplane sum(y) = 1 (linear equality), Dy = I - 1 1^T / m;
3. onto the box [-1, 1]^m (inequalities): Dy = diag(|x_i| < 1), different in each batch element;
4. onto the unit ball, where points inside and outside the ball share one batch; plotted in 2D.
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


class Projection:
    """Shared objective and initial guess: y = argmin 1/2 ||y - x||^2 over the node's constraint set."""

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(dim=1)

    def initial_guess(self, x):
        return x.clone()


class SphereProjection(Projection, ddn.EqConstDeclarativeNode):
    def equality_constraints(self, x, y):
        return (y**2).sum(dim=1) - 1.0                      # (b,)


class HyperplaneProjection(Projection, ddn.LinEqConstDeclarativeNode):
    def linear_constraint_parameters(self, y):
        m = y.shape[1]
        return torch.ones(1, m, dtype=y.dtype, device=y.device), torch.ones(1, dtype=y.dtype, device=y.device)


class BoxProjection(Projection, ddn.IneqConstDeclarativeNode):
    def inequality_constraints(self, x, y):
        return torch.cat([y - 1.0, -y - 1.0], dim=1)        # (b, 2m): y <= 1 and -y <= 1


class BallProjection(Projection, ddn.IneqConstDeclarativeNode):
    def inequality_constraints(self, x, y):
        return (y**2).sum(dim=1) - 1.0                      # (b,): ||y||^2 <= 1


def vjp(layer, x, v):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (g,) = torch.autograd.grad((y * v).sum(), x)
    return y.detach(), g


m, b = 5, 6
x = 2.0 * torch.randn(b, m, dtype=dtype)
v = torch.randn(b, m, dtype=dtype)

# 1. Sphere (equality constraint).
y, g = vjp(ddn.DeclarativeLayer(SphereProjection()), x, v)
norm = x.norm(dim=1, keepdim=True)
assert torch.allclose(y, x / norm, atol=1e-8)
expected = (v - (v * y).sum(1, keepdim=True) * y) / norm   # v^T (I - y y^T) / ||x||
print("sphere:     max gradient error", (g - expected).abs().max().item())
assert torch.allclose(g, expected, atol=1e-7)

# 2. Hyperplane sum(y) = 1 (linear equality constraint).
y, g = vjp(ddn.DeclarativeLayer(HyperplaneProjection()), x, v)
assert torch.allclose(y.sum(1), torch.ones(b, dtype=dtype), atol=1e-8)
expected = v - v.mean(1, keepdim=True)
print("hyperplane: max gradient error", (g - expected).abs().max().item())
assert torch.allclose(g, expected, atol=1e-7)

# 3. Box: each element has its own set of active bounds.
box = BoxProjection()
y, g = vjp(ddn.DeclarativeLayer(box), x, v)
assert torch.allclose(y, x.clamp(-1, 1), atol=1e-6)
free = x.abs() < 1
print("box:        active bounds per element", box.diagnostics.active.sum(1).tolist())
print("            max gradient error", (g - v * free).abs().max().item())
assert torch.allclose(g, v * free, atol=1e-6)
xs = torch.tensor([[0.3, -1.7, 2.2]], dtype=dtype, requires_grad=True)  # away from the kinks |x_i| = 1
assert torch.autograd.gradcheck(ddn.DeclarativeLayer(BoxProjection()), (xs,), atol=1e-5)

# 4. Ball in 2D: points inside (constraint inactive: y = x) and outside (active: y = x / ||x||) in one batch.
n_points = 16 if QUICK else 64
x2 = 1.6 * (torch.rand(n_points, 2, dtype=dtype) - 0.5) * 2
ball = BallProjection()
y2, g2 = vjp(ddn.DeclarativeLayer(ball), x2, torch.ones(n_points, 2, dtype=dtype))
outside = x2.norm(dim=1) > 1
assert torch.equal(ball.diagnostics.active.reshape(-1), outside)
expected = torch.where(outside[:, None], x2 / x2.norm(dim=1, keepdim=True), x2)
assert torch.allclose(y2, expected, atol=1e-6)
print(f"ball:       {int(outside.sum())} of {n_points} points outside, active sets match")

fig, ax = plt.subplots(figsize=(4.5, 4.5))
ax.add_patch(plt.Circle((0, 0), 1.0, fill=False, color="black"))
for xi, yi, out in zip(x2, y2, outside):
    ax.annotate("", xy=yi.tolist(), xytext=xi.tolist(),
                arrowprops=dict(arrowstyle="->", color="tab:red" if out else "tab:green"))
ax.scatter(x2[:, 0], x2[:, 1], c=["tab:red" if o else "tab:green" for o in outside], s=12)
ax.set_aspect("equal")
ax.set_xlim(-1.8, 1.8)
ax.set_ylim(-1.8, 1.8)
ax.set_title("ball projection: active (red), inactive (green)", fontsize=10)
fig.tight_layout()
fig.savefig(os.path.join(OUT, "constrained_ball.png"))
plt.close(fig)
print("saved plot to", OUT)
