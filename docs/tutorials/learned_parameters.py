"""Learning a node's own parameters: f(x, u; theta) with theta trained end to end.

A declarative node's output solves ``y(x) in argmin_u f(x, u; theta)``. The node's own parameters theta -- an
``nn.Parameter`` of a node that is an ``nn.Module``, the weights of a submodule such as an ``nn.Linear`` inside a
fixed-point map, a tensor its methods capture, or a positional input without the batch dimension -- get their
exact gradient by the same implicit rule as the inputs: ``theta_bar = -(d q / d theta)^T A^{-T} v`` for the
optimality condition ``q = 0`` with Jacobian ``A`` (the KKT matrix, ``I - dT/dy``, ``dF/dy``). Nothing is expanded
to the batch: a shared weight's gradient is one reduction.

This script
1. declares a robust average with a learned pseudo-Huber scale alpha, checks d loss / d alpha against finite
   differences of re-solves, and trains alpha with Adam on data whose outliers call for a small alpha;
2. declares a deep equilibrium layer whose map T is an ``nn.Module`` (an ``nn.Linear`` on y), checks the weight
   gradient against finite differences, and trains it with its read-out on a small regression task;
3. plots both training curves.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

import torchddn as ddn

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64


def finite_difference(loss, p, eps=1e-6):
    """Central differences of a loss that re-solves the node, for a scalar parameter ``p``."""
    with torch.no_grad():
        old = p.item()
        p.fill_(old + eps)
        up = loss().item()
        p.fill_(old - eps)
        down = loss().item()
        p.fill_(old)
    return (up - down) / (2 * eps)


# 1. A robust average whose pseudo-Huber scale alpha is a parameter of the node.
class LearnedPseudoHuber(ddn.DeclarativeNode, nn.Module):
    """y = argmin_u sum_i alpha^2 (sqrt(1 + ((u - x_i) / alpha)^2) - 1); x (b, n) -> y (b, 1)."""

    def __init__(self, alpha=2.0):
        ddn.DeclarativeNode.__init__(self)
        nn.Module.__init__(self)
        self.log_alpha = nn.Parameter(torch.tensor(float(alpha), dtype=dtype).log())

    def objective(self, x, y):
        a = self.log_alpha.exp()
        return (a ** 2 * (torch.sqrt(1 + ((y - x) / a) ** 2) - 1)).sum(-1)

    def initial_guess(self, x):
        return x.median(-1, keepdim=True).values


pool = ddn.DeclarativeLayer(LearnedPseudoHuber())
print("parameters of the layer:", [name for name, _ in pool.named_parameters()])

n_points = 40 if QUICK else 200
b = 16 if QUICK else 64


def batch(b):
    """Inliers around a per-element centre, 30% outliers far to one side; the target is the centre."""
    centre = torch.randn(b, 1, dtype=dtype)
    x = centre + 0.3 * torch.randn(b, n_points, dtype=dtype)
    outliers = torch.rand(b, n_points) < 0.3
    x = torch.where(outliers, x + 8 + 4 * torch.rand(b, n_points, dtype=dtype), x)
    return x, centre


x, centre = batch(b)
loss = lambda: ((pool(x) - centre) ** 2).mean()  # noqa: E731
pool.zero_grad()
loss().backward()
fd = finite_difference(loss, pool.node.log_alpha)
print(f"d loss / d log(alpha): implicit {pool.node.log_alpha.grad.item():.8f}, finite differences {fd:.8f}")
assert abs(pool.node.log_alpha.grad.item() - fd) <= 1e-6 * max(1.0, abs(fd))

opt = torch.optim.Adam(pool.parameters(), lr=0.1)
pool_losses = []
for step in range(25 if QUICK else 150):
    x, centre = batch(b)
    value = ((pool(x) - centre) ** 2).mean()
    opt.zero_grad()
    value.backward()
    opt.step()
    pool_losses.append(value.item())
alpha = pool.node.log_alpha.exp().item()
print(f"alpha 2.0 -> {alpha:.3f}; pooling error {pool_losses[0]:.4f} -> {pool_losses[-1]:.4f}")
assert alpha < 2.0 and pool_losses[-1] < pool_losses[0]


# 2. A deep equilibrium layer whose T is an nn.Module: its weights are ordinary module parameters.
class LinearEquilibrium(ddn.FixedPointNode, nn.Module):
    """y = tanh(W y + U x + c) with W an nn.Linear (no bias) and U x + c an nn.Linear; x (b, d) -> y (b, h)."""

    def __init__(self, d, h):
        ddn.FixedPointNode.__init__(self, tol=1e-12)
        nn.Module.__init__(self)
        self.W = nn.Linear(h, h, bias=False, dtype=dtype)
        self.U = nn.Linear(d, h, dtype=dtype)
        with torch.no_grad():
            self.W.weight.mul_(0.5 / torch.linalg.matrix_norm(self.W.weight, 2))

    def T(self, x, y):
        return torch.tanh(self.W(y) + self.U(x))

    def initial_guess(self, x):
        return torch.zeros(x.shape[0], self.W.weight.shape[0], dtype=x.dtype, device=x.device)


d, h = 3, (8 if QUICK else 32)
deq = ddn.DeclarativeLayer(LinearEquilibrium(d, h))
X = torch.rand(64 if QUICK else 256, d, dtype=dtype) * 2 - 1
target = torch.sin(2 * X[:, :1]) * X[:, 1:2] + 0.5 * X[:, 2:3] ** 2
probe = torch.randn(X.shape[0], h, dtype=dtype)
check = lambda: (deq(X) * probe).sum()  # noqa: E731
deq.zero_grad()
check().backward()
w00 = deq.node.W.weight
analytic = w00.grad[0, 0].item()
with torch.no_grad():
    old = w00[0, 0].item()
    w00[0, 0] = old + 1e-6
    up = check().item()
    w00[0, 0] = old - 1e-6
    down = check().item()
    w00[0, 0] = old
fd = (up - down) / 2e-6
print(f"d loss / d W[0, 0]: implicit {analytic:.8f}, finite differences {fd:.8f}")
assert abs(analytic - fd) <= 1e-6 * max(1.0, abs(fd))

readout = nn.Linear(h, 1, dtype=dtype)
model = nn.Sequential(deq, readout)
opt = torch.optim.Adam(model.parameters(), lr=0.03)
deq_losses = []
for step in range(30 if QUICK else 300):
    value = ((model(X) - target) ** 2).mean()
    opt.zero_grad()
    value.backward()
    opt.step()
    with torch.no_grad():  # keep T contractive in y
        w = deq.node.W.weight
        w.div_(torch.clamp(torch.linalg.matrix_norm(w, 2) / 0.9, min=1.0))
    deq_losses.append(value.item())
print(f"equilibrium model training loss {deq_losses[0]:.4f} -> {deq_losses[-1]:.4f}")
assert deq_losses[-1] < deq_losses[0]

# 3. Plots.
fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
axes[0].plot(pool_losses)
axes[0].set_title("robust pooling: learning alpha")
axes[0].set_xlabel("step")
axes[0].set_ylabel("squared error")
axes[1].semilogy(deq_losses)
axes[1].set_title("equilibrium layer with an nn.Linear in T")
axes[1].set_xlabel("step")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "learned_parameters.png"))
plt.close(fig)
print("saved plot to", OUT)
