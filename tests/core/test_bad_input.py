"""Bad input gets a clear error or warning that names the problem."""
import pytest
import torch

import torchddn as ddn
from tests.core import problems as P

D = torch.float64


def test_batch_size_mismatch_names_shapes():
    layer = ddn.DeclarativeLayer(P.InputHessianQuadratic())
    with pytest.raises(ddn.DDNError, match=r"share the batch size.*input 0: \(3, 4\).*input 1: \(2, 4\)"):
        layer(torch.randn(3, 4, dtype=D), torch.randn(2, 4, dtype=D))


def test_nan_input_names_argument_and_elements():
    x = torch.randn(4, 3, dtype=D)
    x[2, 1] = float("nan")
    with pytest.raises(ddn.DDNError, match=r"input 0 \(shape \(4, 3\)\) contains NaN or Inf at batch elements \[2\]"):
        ddn.DeclarativeLayer(P.LinearOnCircle())(x)


def test_inf_input():
    x = torch.randn(2, 3, dtype=D)
    x[0, 0] = float("inf")
    with pytest.raises(ddn.DDNError, match="NaN or Inf"):
        ddn.DeclarativeLayer(P.RobustAverage())(x)


def test_scalar_input_needs_batch_dimension():
    with pytest.raises(ddn.DDNError, match="0-d tensor"):
        ddn.DeclarativeLayer(P.RobustAverage())(torch.tensor(1.0))


def test_objective_wrong_shape():
    class Bad(ddn.DeclarativeNode):
        def objective(self, x, y):
            return ((y - x) ** 2).sum()  # scalar, not (b,)

        def initial_guess(self, x):
            return x.clone()

    with pytest.raises(ddn.DDNError, match=r"objective must return one value per batch element, shape \(3,\)"):
        ddn.DeclarativeLayer(Bad())(torch.randn(3, 2, dtype=D))


def test_constraint_wrong_shape():
    class Bad(P.QuadraticOnSphere):
        def equality_constraints(self, x, r, y):
            return super().equality_constraints(x, r, y)[:1]

    with pytest.raises(ddn.DDNError, match="equality_constraints must return shape"):
        ddn.DeclarativeLayer(Bad())(torch.randn(3, 2, dtype=D), torch.ones(3, 1, dtype=D))


def test_solve_returns_wrong_batch():
    class Bad(P.LinearOnCircle):
        def solve(self, x):
            return x[:1], None

    with pytest.raises(ddn.DDNError, match=r"expected a leading batch dimension of size 3"):
        ddn.DeclarativeLayer(Bad())(torch.randn(3, 2, dtype=D))


def test_solve_returns_nan():
    class Bad(P.LinearOnCircle):
        def solve(self, x):
            y = -x / x.norm(dim=-1, keepdim=True)
            y[1] = float("nan")
            return y, None

    with pytest.raises(ddn.DDNError, match=r"solution y contains NaN or Inf at batch elements \[1\]"):
        ddn.DeclarativeLayer(Bad())(torch.randn(3, 2, dtype=D))


def test_solve_must_return_tuple():
    class Bad(P.LinearOnCircle):
        def solve(self, x):
            return -x

    with pytest.raises(ddn.DDNError, match=r"solve must return a tuple \(y, ctx\)"):
        ddn.DeclarativeLayer(Bad())(torch.randn(3, 2, dtype=D))


class OffSurface(P.LinearOnCircle):
    def solve(self, x):
        return -2 * x / x.norm(dim=-1, keepdim=True), None  # radius 2, off the unit circle


def test_y_off_constraint_surface_warns():
    with pytest.warns(ddn.ConvergenceWarning, match=r"violates the constraints at elements \[0, 1, 2\]"):
        ddn.DeclarativeLayer(OffSurface())(torch.randn(3, 2, dtype=D))


def test_on_failure_raise_and_ignore():
    with pytest.raises(ddn.DDNError, match="violates the constraints"):
        ddn.DeclarativeLayer(OffSurface(on_failure="raise"))(torch.randn(3, 2, dtype=D))
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        layer = ddn.DeclarativeLayer(OffSurface(on_failure="ignore"))
        layer(torch.randn(3, 2, dtype=D))
    assert (layer.diagnostics.constraint_violation > 1).all()


def test_not_optimal_warns_with_elements():
    class NotOptimal(P.InputHessianQuadratic):
        def solve(self, a, c):
            y = c / torch.exp(a)
            y[1] += 1.0
            return y, None

    layer = ddn.DeclarativeLayer(NotOptimal())
    with pytest.warns(ddn.ConvergenceWarning, match=r"first-order optimality conditions at elements \[1\]"):
        layer(torch.randn(3, 2, dtype=D), torch.randn(3, 2, dtype=D))
    assert layer.diagnostics.residual[1] > 0.1 and layer.diagnostics.residual[0] < 1e-12


def test_nonconvergence_of_builtin_solver_warns():
    with pytest.warns(ddn.ConvergenceWarning, match="did not converge at elements"):
        ddn.DeclarativeLayer(P.RobustAverage(max_iter=1))(torch.randn(3, 50, dtype=D) * 10)


def test_missing_initial_guess():
    class NoGuess(ddn.DeclarativeNode):
        def objective(self, x, y):
            return (y ** 2).sum(-1)

    with pytest.raises(NotImplementedError, match="initial_guess"):
        ddn.DeclarativeLayer(NoGuess())(torch.randn(2, 2, dtype=D))


def test_bad_options():
    with pytest.raises(ValueError, match="backward must be one of"):
        P.RobustAverage(backward="magic")
    with pytest.raises(ValueError, match="on_failure"):
        P.RobustAverage(on_failure="shout")
    with pytest.raises(TypeError, match="DeclarativeNode"):
        ddn.DeclarativeLayer(object())


def test_backward_linear_solve_nonconvergence_warns():
    layer = ddn.DeclarativeLayer(P.InputHessianQuadratic(backward="cg", linear_max_iter=1))
    a = torch.linspace(-3, 3, 12, dtype=D).expand(2, 12).contiguous()
    c = torch.randn(2, 12, dtype=D, requires_grad=True)
    y = layer(a, c)
    with pytest.warns(ddn.ConvergenceWarning, match="backward linear solve"):
        y.sum().backward()
