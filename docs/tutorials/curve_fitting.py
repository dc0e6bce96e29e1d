"""Curve fitting as a layer: a node declared by its residuals.

Fit y = (a, k) of the model a exp(-k t) to each row of noisy observations,

    y(obs) = argmin_u  1/2 sum_j (u_1 exp(-u_2 t_j) - obs_j)^2.

A node that defines ``residuals(*xs, y)`` instead of ``objective`` gets the objective 1/2 ||r||^2, the batched
Levenberg-Marquardt solver (damping per element) and the exact implicit gradient, whose Hessian is
J^T J + sum_j r_j D^2 r_j. ``hessian="gauss_newton"`` drops the second term, an approximation that is exact only
when the residuals vanish at the solution.

This script
1. declares the node, fits a batch and compares with scipy.optimize.least_squares;
2. checks the gradient with gradcheck and central finite differences of re-solves;
3. shows how far the Gauss-Newton approximation is from the exact gradient as the noise grows;
4. plots the fits and the approximation error.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import scipy.optimize as so
import torch

import torchddn as ddn

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)


class ExponentialFit(ddn.DeclarativeNode):
    """obs (b, n) -> (a, k) (b, 2) fitted to a exp(-k t) at fixed sample times t (n,)."""

    def __init__(self, t, **kwargs):
        super().__init__(**kwargs)
        self.t = t

    def initial_guess(self, obs):
        return torch.ones(obs.shape[0], 2, dtype=obs.dtype)        # (b, 2)

    def residuals(self, obs, y):                                    # (b, n): one residual per sample
        return y[:, :1] * torch.exp(-y[:, 1:] * self.t) - obs


def make_data(b, n, noise, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 3, n, dtype=torch.float64)
    true = torch.stack([0.5 + torch.rand(b, generator=g, dtype=torch.float64),
                        0.3 + 1.5 * torch.rand(b, generator=g, dtype=torch.float64)], 1)
    obs = true[:, :1] * torch.exp(-true[:, 1:] * t) + noise * torch.randn(b, n, generator=g, dtype=torch.float64)
    return t, obs, true


# 1. Forward: a batch of fits, checked against scipy.
b, n = (4, 15) if QUICK else (16, 100)
t, obs, true = make_data(b, n, noise=0.05)
node = ExponentialFit(t)
layer = ddn.DeclarativeLayer(node)
y = layer(obs)
print("converged:", bool(node.diagnostics.converged.all()), "| LM iterations per fit:",
      node.diagnostics.iterations.tolist())
ref = []
for i in range(b):
    fun = lambda p, i=i: p[0] * np.exp(-p[1] * t.numpy()) - obs[i].numpy()  # noqa: E731
    ref.append(so.least_squares(fun, np.ones(2), xtol=1e-15, ftol=1e-15, gtol=1e-15).x)
ref = torch.tensor(np.array(ref))
print("max |torchddn - scipy| =", float((y - ref).abs().max()))
assert torch.allclose(y, ref, atol=1e-8)

# 2. The gradient: gradcheck, and finite differences of re-solves for v^T dy/dobs.
small = obs[:2, :8].clone().requires_grad_(True)
assert torch.autograd.gradcheck(ddn.DeclarativeLayer(ExponentialFit(t[:8])), (small,))
v = torch.randn(b, 2, dtype=torch.float64)
o = obs.clone().requires_grad_(True)
(g_exact,) = torch.autograd.grad((layer(o) * v).sum(), o)
fine = ExponentialFit(t, tol=1e-15)
h = 1e-6
fd = torch.zeros(n, dtype=torch.float64)
for j in range(n):                                           # the first fit's gradient, one sample at a time
    e = torch.zeros_like(obs)
    e[0, j] = h
    fd[j] = ((fine.solve(obs + e)[0] - fine.solve(obs - e)[0])[0] * v[0]).sum() / (2 * h)
print("max |implicit - finite differences| =", float((g_exact[0] - fd).abs().max()))
assert torch.allclose(g_exact[0], fd, atol=1e-7)

# 3. Gauss-Newton backward: the J^T J approximation against the exact Hessian as the noise grows.
gn_layer = ddn.DeclarativeLayer(ExponentialFit(t, hessian="gauss_newton"))
noises = [0.0, 0.02, 0.05, 0.1, 0.2] if QUICK else [0.0, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4]
errors = []
for s in noises:
    _, obs_s, _ = make_data(b, n, noise=s, seed=1)
    o_s = obs_s.clone().requires_grad_(True)
    (ge,) = torch.autograd.grad((layer(o_s) * v).sum(), o_s)
    (ga,) = torch.autograd.grad((gn_layer(o_s) * v).sum(), o_s)
    errors.append(float((ga - ge).abs().max() / ge.abs().max()))
    print(f"noise {s:4.2f}: relative error of the Gauss-Newton gradient {errors[-1]:.2e}")
assert errors[0] < 1e-8 and errors[-1] > 1e-3     # exact at zero residual, not otherwise

# 4. Plots.
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
tt = torch.linspace(0, 3, 200, dtype=torch.float64)
for i in range(min(b, 4)):
    line, = ax1.plot(t, obs[i], ".", alpha=0.5)
    ax1.plot(tt, y[i, 0].detach() * torch.exp(-y[i, 1].detach() * tt), color=line.get_color())
ax1.set_xlabel("t")
ax1.set_title("fits a exp(-k t) (Levenberg-Marquardt)")
ax2.semilogy(noises[1:], errors[1:], "o-")
ax2.set_xlabel("noise level")
ax2.set_ylabel("relative gradient error")
ax2.set_title("Gauss-Newton backward vs exact")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "curve_fitting.png"))
plt.close(fig)
print("saved plot to", OUT)
