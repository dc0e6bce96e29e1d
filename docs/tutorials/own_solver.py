"""Using your own solver: scipy, or any function with the solver signature.

The backward pass of a declarative node depends only on the optimality conditions at the solution, not on how the
solution was found. So the forward solver is yours to choose:

* ``solver="newton"``, ``"lbfgs"``, ``"sqp"``, ``"interior_point"``, ... — the built-in batched torch solvers;
* ``solver="scipy"`` — ``scipy.optimize.minimize`` per batch element on the CPU (SLSQP by default), with gradients and
  Jacobians supplied by torch;
* any callable ``solver(problem, y0, *, tol, max_iter, **options) -> SolverResult``, where ``problem.objective``,
  ``problem.eq`` and ``problem.ineq`` are batched functions of a flat ``y`` of shape (b, m);
* or override ``solve(*xs)`` in the node and return ``(y, ctx)``.

This script solves a regularised logistic regression (no closed form) and a constrained projection with different
solvers, and checks that solutions and gradients agree, and that the gradient passes gradcheck.
"""
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torch.nn.functional as F

import torchddn as ddn
from torchddn.solvers import SolverResult, batch_grad, batch_hessian

QUICK = os.environ.get("TORCHDDN_TUTORIAL_QUICK", "0") == "1"
OUT = os.environ.get("TORCHDDN_TUTORIAL_OUT", ".")
torch.manual_seed(0)
dtype = torch.float64


class LogisticRegression(ddn.DeclarativeNode):
    """w = argmin sum_i softplus(a_i^T w) - t_i a_i^T w + 1/2 ||w||^2; A (b, n, p), t (b, n) -> w (b, p)."""

    def initial_guess(self, A, t):
        return torch.zeros(A.shape[0], A.shape[2], dtype=A.dtype, device=A.device)

    def objective(self, A, t, y):
        z = torch.einsum("bnp,bp->bn", A, y)
        return (F.softplus(z) - t * z).sum(1) + 0.5 * (y**2).sum(1)


def my_newton(problem, y0, *, tol=1e-10, max_iter=50, **options):
    """A hand-written batched Newton method with the solver signature."""
    y = y0.clone()
    done = torch.zeros(y.shape[0], dtype=torch.bool, device=y.device)
    iterations = torch.zeros(y.shape[0], dtype=torch.long, device=y.device)
    for _ in range(max_iter):
        g = batch_grad(problem.objective, y)               # (b, m)
        residual = g.norm(dim=1)
        done = residual <= tol
        if bool(done.all()):
            break
        H = batch_hessian(problem.objective, y)            # (b, m, m)
        step = torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)
        y = torch.where(done[:, None], y, y - step)        # converged elements stop moving
        iterations += (~done).long()
    return SolverResult(y=y, nu=None, converged=done, iterations=iterations, residual=residual)


b, n, p = 3, 12 if QUICK else 40, 4
A = torch.randn(b, n, p, dtype=dtype)
t = (torch.rand(b, n, dtype=dtype) < 0.5).to(dtype)
v = torch.randn(b, p, dtype=dtype)

results = {}
for name, solver in [("newton (built in)", "newton"), ("lbfgs (built in)", "lbfgs"), ("scipy", "scipy"),
                     ("my_newton", my_newton)]:
    node = LogisticRegression(solver=solver)
    A_ = A.clone().requires_grad_(True)
    w = ddn.DeclarativeLayer(node)(A_, t)
    (gA,) = torch.autograd.grad((w * v).sum(), A_)
    results[name] = (w.detach(), gA)
    print(f"{name:18s} iterations {node.diagnostics.iterations.tolist()}  residual "
          f"{float(node.diagnostics.residual.max()):.1e}")

w_ref, g_ref = results["newton (built in)"]
for name, (w, gA) in results.items():
    dw, dg = (w - w_ref).abs().max().item(), (gA - g_ref).abs().max().item()
    print(f"{name:18s} |w - w_newton| = {dw:.1e}   |dL/dA - newton's| = {dg:.1e}")
    assert dw < 1e-5 and dg < 1e-5, name

A_small = A[:1, :5].clone().requires_grad_(True)
assert torch.autograd.gradcheck(lambda a: ddn.DeclarativeLayer(LogisticRegression(solver=my_newton))(a, t[:1, :5]),
                                (A_small,))


# A constrained problem: projection onto {||y|| <= 1, y_0 >= 0.2}, with scipy's SLSQP and the built-in solver.
class BallHalfspace(ddn.IneqConstDeclarativeNode):
    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(1)

    def initial_guess(self, x):
        y0 = torch.zeros_like(x)
        y0[:, 0] = 0.5
        return y0

    def inequality_constraints(self, x, y):
        return torch.stack([(y**2).sum(1) - 1.0, 0.2 - y[:, 0]], dim=1)


x = 1.5 * torch.randn(6, 2, dtype=dtype)
sols = {}
for solver in ["interior_point", "scipy"]:
    xs = x.clone().requires_grad_(True)
    y = ddn.DeclarativeLayer(BallHalfspace(solver=solver))(xs)
    (g,) = torch.autograd.grad(y.sum(), xs)
    sols[solver] = (y.detach(), g)
diff_y = (sols["scipy"][0] - sols["interior_point"][0]).abs().max().item()
diff_g = (sols["scipy"][1] - sols["interior_point"][1]).abs().max().item()
print(f"constrained: |y_scipy - y_ip| = {diff_y:.1e}, |grad difference| = {diff_g:.1e}")
assert diff_y < 1e-5 and diff_g < 1e-4

fig, ax = plt.subplots(figsize=(4.5, 4.5))
theta = torch.linspace(0, 2 * torch.pi, 200)
ax.plot(torch.cos(theta), torch.sin(theta), color="black", linewidth=0.8)
ax.axvline(0.2, color="black", linewidth=0.8, linestyle="--")
for solver, marker in [("interior_point", "o"), ("scipy", "x")]:
    ys = sols[solver][0]
    ax.scatter(ys[:, 0], ys[:, 1], marker=marker, s=40, label=f"solver={solver!r}")
ax.scatter(x[:, 0], x[:, 1], s=10, color="gray", label="inputs")
ax.set_aspect("equal")
ax.legend(fontsize=8)
ax.set_title("same solution from two solvers")
fig.tight_layout()
fig.savefig(os.path.join(OUT, "own_solver.png"))
plt.close(fig)
print("saved plot to", OUT)
