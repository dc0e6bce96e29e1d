"""Every tensor a node depends on gets its exact gradient: nn.Module parameters and buffers (and submodules),
tensors captured by the node's methods or closures, and positional inputs shared by the whole batch.

Each case is compared with central finite differences of re-solves in float64 (an independent method: only
forward solves are used), for every node kind.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import torchddn as ddn
from torchddn.fixed_point import FixedPointNode, fixed_point
from torchddn.root import RootNode, custom_root

DT = torch.float64


def fd_grad(loss, param: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of ``loss()`` (which re-solves) with respect to every entry of ``param``."""
    g = torch.zeros_like(param)
    flat, gflat = param.data.view(-1), g.view(-1)
    for i in range(flat.numel()):
        old = flat[i].item()
        with torch.no_grad():
            flat[i] = old + eps
            up = loss().item()
            flat[i] = old - eps
            down = loss().item()
            flat[i] = old
        gflat[i] = (up - down) / (2 * eps)
    return g


def weights(b: int, *shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, *shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ---- unconstrained node with its own nn.Parameter ------------------------------------------------------------

class LearnedHuber(ddn.DeclarativeNode, nn.Module):
    """Pseudo-Huber average with a learned scale alpha (the paper's f(x, u; theta))."""

    def __init__(self, alpha: float = 0.7) -> None:
        ddn.DeclarativeNode.__init__(self)
        nn.Module.__init__(self)
        self.alpha = nn.Parameter(torch.tensor(alpha, dtype=DT))

    def initial_guess(self, x):
        return x.mean(-1, keepdim=True)

    def objective(self, x, y):
        a = self.alpha
        return (a ** 2 * (torch.sqrt(1 + ((y - x) / a) ** 2) - 1)).sum(-1)


def test_module_parameter_gets_exact_gradient_and_is_registered():
    node = LearnedHuber()
    layer = ddn.DeclarativeLayer(node)
    assert any(p is node.alpha for p in layer.parameters())
    x = weights(4, 15) * 3
    x[:, :3] += 20  # outliers make the solution depend on alpha
    w = weights(4, 1, seed=1)
    loss = lambda: (layer(x) * w).sum()  # noqa: E731
    loss().backward()
    ref = fd_grad(loss, node.alpha)
    assert node.alpha.grad is not None
    assert torch.allclose(node.alpha.grad, ref, rtol=1e-6, atol=1e-9)
    assert abs(float(ref)) > 1e-3  # the case is not trivial


def test_parameter_and_input_gradients_together_share_one_solve(monkeypatch):
    from torchddn.implicit import kkt as implicit
    node = LearnedHuber()
    layer = ddn.DeclarativeLayer(node)
    x = (weights(3, 12) * 2).requires_grad_(True)
    calls = []
    real = implicit._solve_kkt
    monkeypatch.setattr(implicit, "_solve_kkt", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer(x).sum().backward()
    assert len(calls) == 1
    # the input gradient is still the exact one
    xg = x.detach().clone().requires_grad_(True)
    ref = torch.autograd.grad(ddn.DeclarativeLayer(LearnedHuber())(xg).sum(), xg)[0]
    assert torch.allclose(x.grad, ref, atol=1e-10)


def test_parameter_trains_with_an_optimiser():
    torch.manual_seed(0)
    node = LearnedHuber(alpha=2.0)
    layer = ddn.DeclarativeLayer(node)
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    x = weights(8, 20)
    x[:, :4] += 10
    target = torch.zeros(8, 1, dtype=DT)  # the robust mean of the inliers is near 0: small alpha helps
    start = float(((layer(x) - target) ** 2).mean())
    for _ in range(30):
        opt.zero_grad()
        loss = ((layer(x) - target) ** 2).mean()
        loss.backward()
        opt.step()
    assert float(node.alpha) < 2.0
    assert float(((layer(x) - target) ** 2).mean()) < 0.5 * start


def test_submodule_parameters_in_objective():
    class Net(ddn.DeclarativeNode, nn.Module):
        def __init__(self):
            ddn.DeclarativeNode.__init__(self)
            nn.Module.__init__(self)
            self.lin = nn.Linear(3, 3).double()

        def initial_guess(self, x):
            return torch.zeros_like(x)

        def objective(self, x, y):  # strongly convex in y; the weights enter the data term
            return 0.5 * ((self.lin(y) - x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1) + 0.1 * (y ** 4).sum(-1)

    torch.manual_seed(1)
    node = Net()
    layer = ddn.DeclarativeLayer(node)
    x = weights(5, 3)
    w = weights(5, 3, seed=2)
    loss = lambda: (layer(x) * w).sum()  # noqa: E731
    loss().backward()
    for p in (node.lin.weight, node.lin.bias):
        assert torch.allclose(p.grad, fd_grad(loss, p), rtol=1e-6, atol=1e-8)


def test_captured_closure_tensor_and_buffer():
    A = weights(6, 3, seed=3).requires_grad_(True)

    class Ridge(ddn.DeclarativeNode, nn.Module):
        def __init__(self):
            ddn.DeclarativeNode.__init__(self)
            nn.Module.__init__(self)
            self.register_buffer("lam", torch.tensor(0.5, dtype=DT))

        def initial_guess(self, x):
            return torch.zeros(x.shape[0], 3, dtype=x.dtype)

        def objective(self, x, y):
            return 0.5 * ((y @ A.T - x) ** 2).sum(-1) + 0.5 * self.lam * (y ** 2).sum(-1) + 0.05 * (y ** 4).sum(-1)

    node = Ridge()
    node.lam.requires_grad_(True)
    layer = ddn.DeclarativeLayer(node)
    x = weights(4, 6, seed=4)
    w = weights(4, 3, seed=5)
    loss = lambda: (layer(x) * w).sum()  # noqa: E731
    loss().backward()
    assert torch.allclose(A.grad, fd_grad(loss, A), rtol=1e-6, atol=1e-8)
    assert torch.allclose(node.lam.grad, fd_grad(loss, node.lam), rtol=1e-6, atol=1e-8)


# ---- shared positional inputs ----------------------------------------------------------------------------------

class SharedRidge(ddn.DeclarativeNode):
    """min_y 1/2 |A y - x|^2 + 1/2 |y|^2 with A (n, m) shared by the batch, x (b, n)."""

    def initial_guess(self, x, A):
        return torch.zeros(x.shape[0], A.shape[1], dtype=x.dtype)

    def objective(self, x, A, y):
        return 0.5 * ((y @ A.T - x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)


def ridge_closed_form(x, A):
    return torch.linalg.solve(A.T @ A + torch.eye(A.shape[1], dtype=A.dtype), (x @ A).T).T


def test_shared_input_gradcheck_and_closed_form():
    A = weights(5, 3, seed=6).requires_grad_(True)
    x = weights(4, 5, seed=7).requires_grad_(True)
    f = lambda x, A: ddn.DeclarativeLayer(SharedRidge())(x, A)  # noqa: E731
    assert torch.allclose(f(x, A), ridge_closed_form(x, A), atol=1e-10)
    assert torch.autograd.gradcheck(f, (x, A))
    ga, gx = torch.autograd.grad((f(x, A) ** 2).sum(), (A, x))
    ra, rx = torch.autograd.grad((ridge_closed_form(x, A) ** 2).sum(), (A, x))
    assert ga.shape == A.shape  # one reduction over the batch: never expanded to it
    assert torch.allclose(ga, ra, atol=1e-9) and torch.allclose(gx, rx, atol=1e-9)


def test_declared_shared_input_with_batch_sized_leading_dimension():
    # A is (4, 4) and the batch is 4: the automatic rule would call it batched; declaring it shared is explicit
    A = weights(4, 4, seed=8).requires_grad_(True)
    x = weights(4, 4, seed=9)
    node = SharedRidge(shared_inputs=(1,))
    y = ddn.DeclarativeLayer(node)(x, A)
    assert torch.allclose(y, ridge_closed_form(x, A), atol=1e-10)
    g = torch.autograd.grad(y.sum(), A)[0]
    r = torch.autograd.grad(ridge_closed_form(x, A).sum(), A)[0]
    assert torch.allclose(g, r, atol=1e-9)


def test_scalar_shared_input():
    class Scaled(ddn.DeclarativeNode):
        def initial_guess(self, x, s):
            return torch.zeros_like(x)

        def objective(self, x, s, y):
            return 0.5 * s * ((y - x) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)

    s = torch.tensor(2.0, dtype=DT, requires_grad=True)
    x = weights(3, 4, seed=10).requires_grad_(True)
    f = lambda x, s: ddn.DeclarativeLayer(Scaled())(x, s)  # noqa: E731
    assert torch.allclose(f(x, s), s * x / (s + 1), atol=1e-10)
    assert torch.autograd.gradcheck(f, (x, s))


# ---- constrained nodes: parameters in the objective and in the constraints -----------------------------------

class SphereProjection(ddn.EqConstDeclarativeNode, nn.Module):
    """min_y 1/2 |y - x|^2 s.t. |y|^2 = r^2 with a learned radius r: y = r x / |x|."""

    def __init__(self):
        ddn.EqConstDeclarativeNode.__init__(self)
        nn.Module.__init__(self)
        self.r = nn.Parameter(torch.tensor(1.5, dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def equality_constraints(self, x, y):
        return (y ** 2).sum(-1) - self.r ** 2

    def initial_guess(self, x):
        return x / x.norm(dim=-1, keepdim=True)


def test_parameter_in_equality_constraint():
    node = SphereProjection()
    x = weights(4, 3, seed=11)
    w = weights(4, 3, seed=12)
    y = ddn.DeclarativeLayer(node)(x)
    assert torch.allclose(y, 1.5 * x / x.norm(dim=-1, keepdim=True), atol=1e-8)
    (y * w).sum().backward()
    ref = (w * x / x.norm(dim=-1, keepdim=True)).sum()  # d/dr of r x/|x|
    assert torch.allclose(node.r.grad, ref, atol=1e-7)


class BoxClip(ddn.IneqConstDeclarativeNode, nn.Module):
    """min_y 1/2 |y - x|^2 s.t. y <= c (c a learned bound): y = min(x, c), dy/dc = 1 where active."""

    def __init__(self):
        ddn.IneqConstDeclarativeNode.__init__(self)
        nn.Module.__init__(self)
        self.c = nn.Parameter(torch.tensor([0.3, -0.2, 0.5], dtype=DT))

    def objective(self, x, y):
        return 0.5 * ((y - x) ** 2).sum(-1)

    def inequality_constraints(self, x, y):
        return y - self.c

    def solve(self, x):
        return torch.minimum(x, self.c.detach()), None


def test_parameter_in_inequality_constraints_with_mixed_active_sets():
    node = BoxClip()
    x = torch.tensor([[1.0, 1.0, 0.0], [0.0, -1.0, 1.0], [-1.0, 0.0, 0.2], [2.0, -3.0, 4.0]], dtype=DT)
    w = weights(4, 3, seed=13)
    y = ddn.DeclarativeLayer(node)(x)
    (y * w).sum().backward()
    active = (x > node.c.detach()).to(DT)
    assert torch.allclose(node.c.grad, (w * active).sum(0), atol=1e-8)
    assert 0 < active.sum() < active.numel()  # mixed


def test_parameter_in_linear_equality_constraint():
    d = torch.tensor([1.0], dtype=DT, requires_grad=True)

    class SumTo(ddn.LinEqConstDeclarativeNode):
        """min 1/2 |y - x|^2 s.t. sum(y) = d: y = x + (d - sum x) / n."""

        def objective(self, x, y):
            return 0.5 * ((y - x) ** 2).sum(-1)

        def linear_constraint_parameters(self, y):
            return torch.ones(1, y.shape[-1], dtype=y.dtype), d

        def initial_guess(self, x):
            return x.clone()

    x = weights(3, 4, seed=14)
    w = weights(3, 4, seed=15)
    y = ddn.DeclarativeLayer(SumTo())(x)
    assert torch.allclose(y, x + (d.detach() - x.sum(-1, keepdim=True)) / 4, atol=1e-8)
    (y * w).sum().backward()
    assert torch.allclose(d.grad, w.sum().reshape(1) / 4, atol=1e-8)


# ---- fixed-point and root nodes -------------------------------------------------------------------------------

class LinearDEQ(FixedPointNode, nn.Module):
    """y = tanh(W y + x) with W from an nn.Linear (a DEQ whose T is an nn.Module)."""

    def __init__(self, n: int, **kw):
        FixedPointNode.__init__(self, **kw)
        nn.Module.__init__(self)
        self.lin = nn.Linear(n, n).double()
        with torch.no_grad():
            self.lin.weight.mul_(0.3 / self.lin.weight.norm(p=2))

    def T(self, x, y):
        return torch.tanh(self.lin(y) + x)

    def initial_guess(self, x):
        return torch.zeros_like(x)


@pytest.mark.parametrize("backward_solver", ["gmres", "dense", "fixed_point"])
def test_deq_module_weights(backward_solver):
    torch.manual_seed(2)
    node = LinearDEQ(4, backward_solver=backward_solver, tol=1e-13)
    layer = ddn.DeclarativeLayer(node)
    x = weights(3, 4, seed=16)
    w = weights(3, 4, seed=17)
    loss = lambda: (layer(x) * w).sum()  # noqa: E731
    loss().backward()
    for p in (node.lin.weight, node.lin.bias):
        assert torch.allclose(p.grad, fd_grad(loss, p), rtol=1e-6, atol=1e-8)


def test_functional_fixed_point_captured_weight():
    W = (0.2 * weights(4, 4, seed=18)).requires_grad_(True)
    x = weights(2, 4, seed=19)
    loss = lambda: fixed_point(lambda x, y: torch.tanh(y @ W.T + x), x, y0=torch.zeros_like(x),  # noqa: E731
                               tol=1e-13).pow(2).sum()
    loss().backward()
    assert torch.allclose(W.grad, fd_grad(loss, W), rtol=1e-6, atol=1e-8)


def test_root_node_parameter_and_custom_root_closure():
    class CubeRoot(RootNode, nn.Module):
        def __init__(self):
            RootNode.__init__(self)
            nn.Module.__init__(self)
            self.k = nn.Parameter(torch.tensor(2.0, dtype=DT))

        def optimality(self, x, y):
            return self.k * y ** 3 - x

        def initial_guess(self, x):
            return torch.ones_like(x)

    node = CubeRoot()
    x = torch.tensor([[1.0, 8.0], [27.0, 0.5]], dtype=DT)
    y = ddn.DeclarativeLayer(node)(x)
    assert torch.allclose(y, (x / 2) ** (1 / 3), atol=1e-10)
    y.sum().backward()
    ref = (-(1 / 3) * x ** (1 / 3) * 2.0 ** (-4 / 3)).sum()  # d/dk (x/k)^(1/3)
    assert torch.allclose(node.k.grad, ref, atol=1e-8)

    s = torch.tensor(3.0, dtype=DT, requires_grad=True)

    @custom_root(lambda x, y: y * y - s * x)
    def scaled_sqrt(x):
        return torch.sqrt(s.detach() * x)

    x = torch.tensor([[1.0, 4.0, 9.0]], dtype=DT)
    scaled_sqrt(x).sum().backward()
    assert torch.allclose(s.grad, (0.5 * torch.sqrt(x / 3.0)).sum(), atol=1e-10)


# ---- forward mode and vmap through shared inputs ----------------------------------------------------------------

def test_forward_mode_and_jacfwd_through_shared_input():
    A = weights(5, 3, seed=21)
    x = weights(4, 5, seed=22)
    f = lambda A: ddn.DeclarativeLayer(SharedRidge())(x, A)  # noqa: E731
    dA = weights(5, 3, seed=23)
    _, tangent = torch.func.jvp(f, (A,), (dA,))
    _, ref = torch.func.jvp(lambda A: ridge_closed_form(x, A), (A,), (dA,))
    assert torch.allclose(tangent, ref, atol=1e-9)
    assert torch.allclose(torch.func.jacfwd(f)(A), torch.func.jacrev(lambda A: ridge_closed_form(x, A))(A),
                          atol=1e-9)


def test_vmap_over_batched_input_with_shared_input():
    A = weights(5, 3, seed=24)
    X = weights(3, 4, 5, seed=25)
    out = torch.func.vmap(lambda x: ddn.DeclarativeLayer(SharedRidge())(x, A))(X)
    assert torch.allclose(out, torch.stack([ridge_closed_form(x, A) for x in X]), atol=1e-10)


def test_no_live_tensors_costs_no_attached_term():
    layer = ddn.DeclarativeLayer(LearnedHuber())
    layer.node.alpha.requires_grad_(False)
    x = weights(2, 5).requires_grad_(True)
    y = layer(x)
    assert "Attach" not in type(y.grad_fn).__name__ and "Add" not in type(y.grad_fn).__name__


def test_node_with_its_own_gradient_still_gives_parameters_their_gradient():
    """A closed-form gradient() covers the positional inputs; the node's parameter gets the implicit rule."""

    class ScaledMean(ddn.DeclarativeNode, nn.Module):
        """min_y 1/2 s |y - mean x|^2 + 1/2 |y|^2 with a learned s: y = s mean(x) / (s + 1)."""

        def __init__(self):
            ddn.DeclarativeNode.__init__(self)
            nn.Module.__init__(self)
            self.s = nn.Parameter(torch.tensor(2.0, dtype=DT))

        def objective(self, x, y):
            return 0.5 * self.s * ((y - x.mean(-1, keepdim=True)) ** 2).sum(-1) + 0.5 * (y ** 2).sum(-1)

        def solve(self, x):
            s = self.s.detach()
            return s * x.mean(-1, keepdim=True) / (s + 1), None

        def gradient(self, x, y=None, v=None, ctx=None):
            s = self.s.detach()
            return (v * s / (s + 1) / x.shape[-1]).expand_as(x),

    node = ScaledMean()
    x = weights(3, 5, seed=30).requires_grad_(True)
    y = ddn.DeclarativeLayer(node)(x)
    y.sum().backward()
    assert torch.allclose(node.s.grad, (x.detach().mean(-1) / 9.0).sum(), atol=1e-10)  # d/ds s m/(s+1) = m/(s+1)^2
    assert torch.allclose(x.grad, torch.full_like(x, 2.0 / 3.0 / 5.0), atol=1e-12)
