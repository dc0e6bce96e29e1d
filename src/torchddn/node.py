"""Declarative nodes: ``y(x) in argmin_{u in C(x)} f(x, u)`` with exact implicit gradients.

A node is declared by its ``objective`` (and constraints); it is turned into an ``nn.Module`` by
:class:`~torchddn.DeclarativeLayer`. The class names follow the paper's reference code, so code written for it
migrates by changing the import.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import torch
from torch import Tensor

from torchddn import linalg
from torchddn.backward import BackwardRule, Implicit, JacobianFree, Phantom, Truncated, Unrolled, as_backward
from torchddn.diagnostics import ConvergenceWarning, DDNError, DDNWarning, Diagnostics, element_list, report
from torchddn.implicit import (AttachImplicit, BoundProblem, ConstraintState, ImplicitCache, ImplicitSolve,
                               KKTRule, constraint_state, implicit_vjp, is_live, kkt_residual_live, shared_positions,
                               warn_nonregular)
from torchddn.solvers import DEFAULTS, Problem, get_solver
from torchddn.solvers._common import first_order_check
from torchddn.autodiff import batch_grad, batch_hessian, batch_hvp, value_and_batch_grad
from torch.func import jvp

BACKWARD_MODES = ("auto", "dense", "cg", "minres", "gmres", "bicgstab", "neumann", "unrolled", "truncated",
                  "jacobian_free")


class DeclarativeNode:
    """Unconstrained declarative node ``y(x) in argmin_u f(x, u)``.

    Subclasses define:

    * ``objective(*xs, y) -> (b,)``: batched; ``xs`` are any tensors with a leading batch dimension ``b`` (plus any
      non-tensor arguments), ``y`` has shape ``(b, ...)``. It is called with ``y`` as a keyword.
    * or, for nonlinear least squares, ``residuals(*xs, y) -> (b, k)`` (or ``(b, ...)``): the objective is then
      ``1/2 ||r||^2`` per element, the built-in solver is Levenberg-Marquardt
      (:func:`~torchddn.solvers.least_squares.levenberg_marquardt`) and the backward uses the exact Hessian
      ``J^T J + sum_i r_i D^2 r_i`` unless ``hessian="gauss_newton"``.
    * either ``solve(*xs) -> (y, ctx)`` (any solver; ``ctx`` is a dict or None and may carry the multipliers
      ``"nu"``) or ``initial_guess(*xs) -> y0``, which fixes ``y``'s shape and starts the built-in solver.
    * optionally ``gradient(*xs, y=None, v=None, ctx=None)`` with a closed-form backward.

    The gradient is Prop. 4.4 of Gould et al.: ``Dy = -H^{-1} B`` with ``H = D^2_yy f`` and ``B = D^2_xy f``, applied
    as a vector-Jacobian product ``v^T Dy = -(H^{-1} v)^T B``: one linear solve with ``H`` per backward and one mixed
    second-derivative product; ``B`` and the Jacobian are never formed.

    Args:
        backward: a :mod:`torchddn.backward` value -- ``Implicit(solver)`` with any :mod:`torchddn.linalg` solver
            value or callable (e.g. ``Implicit(linalg.CG(precond="jacobi"))``), ``Unrolled(steps)``,
            ``Truncated(steps)``, ``JacobianFree()`` -- a linear solver (meaning ``Implicit(solver)``), or one of
            these shorthands:

            * ``"auto"`` (default): ``"dense"`` when ``m + r <= dense_max`` (``m = y.numel() / b``, ``r`` the number of
              constraints), else matrix-free (CG without constraints, MINRES with them).
            * ``"dense"``: ``H`` from ``m`` vmapped Hessian-vector products, Cholesky, falling back to an
              eigendecomposition pseudo-inverse (minimum norm) at singular or indefinite points.
            * ``"cg"``: matrix-free conjugate gradients on ``H`` (a Schur complement handles constraints).
            * ``"minres"``: matrix-free MINRES on the symmetric (indefinite) KKT system.
            * ``"unrolled"``: autograd through ``unroll_steps`` differentiable solver iterations from the initial guess.
            * ``"truncated"``: autograd through the last ``unroll_steps`` iterations, started at the solution.
            * ``"jacobian_free"``: ``H`` replaced by the identity (or its diagonal, ``jf_hessian="diagonal"``): a
              cheap descent direction, not the exact gradient.
        gamma: damping added to ``H`` (``H + gamma I``); 0 gives the exact gradient.
        solver: forward solver when no ``solve`` is defined: a name from :data:`torchddn.solvers.SOLVERS` or a
            callable ``solver(problem, y0, tol=, max_iter=) -> SolverResult``.
        tol, max_iter: forward solver tolerance and iteration limit.
        linear_tol, linear_max_iter: backward CG/MINRES relative tolerance and iteration limit.
        active_tol: relative tolerance deciding which inequality constraints are active.
        check_tol: tolerance of the first-order check after the forward (default 1e-6 in float64, 1e-3 otherwise).
        on_failure: ``"warn"``, ``"raise"`` or ``"ignore"`` when the forward output fails the first-order
            conditions or the constraints beyond ``check_tol``, or a solver does not converge.
        dense_max: size up to which ``"auto"`` uses the dense backward.
        check_inputs: check shapes and NaN/Inf of inputs and outputs (one device sync per call).
        unroll_steps, unroll_method, unroll_lr: settings of the unrolled/truncated modes (``"gd"`` gradient descent,
            ``"newton"`` Newton-KKT steps).
        hessian: for nodes that declare ``residuals``: ``"exact"`` (default) differentiates with the exact
            Hessian ``J^T J + sum_i r_i D^2 r_i``; ``"gauss_newton"`` drops the second term (``H ~= J^T J``, the
            mixed derivative ``B`` stays exact), the approximation made by Gauss-Newton layers elsewhere; it is not
            the layer's gradient unless the residuals vanish at the solution or are affine in ``y``.

    After each call, :attr:`diagnostics` holds per-element results (see :class:`~torchddn.diagnostics.Diagnostics`).
    """

    def __init__(self, *, backward: Any = "auto", gamma: float = 0.0,
                 solver: Union[str, Callable[..., Any], None] = None, tol: Optional[float] = None,
                 max_iter: int = 100, linear_tol: Optional[float] = None, linear_max_iter: Optional[int] = None,
                 active_tol: Optional[float] = None, check_tol: Optional[float] = None, on_failure: str = "warn",
                 dense_max: int = 128, check_inputs: bool = True, unroll_steps: Optional[int] = None,
                 unroll_method: Optional[str] = None, unroll_lr: Optional[float] = None,
                 jf_hessian: str = "identity", shared_inputs: Optional[Sequence[int]] = None,
                 hessian: str = "exact") -> None:
        rule = as_backward(backward)
        if isinstance(rule, Phantom):
            raise ValueError("backward=Phantom(...) applies to fixed-point nodes; optimisation nodes take "
                             "Implicit(solver), Unrolled(steps), Truncated(steps) or JacobianFree()")
        if isinstance(rule, Unrolled):
            unroll_steps = rule.steps if rule.steps is not None else unroll_steps
        if isinstance(rule, (Unrolled, Truncated)):
            unroll_method = rule.method if rule.method is not None else unroll_method
            unroll_lr = rule.lr if rule.lr is not None else unroll_lr
        if isinstance(rule, Truncated):
            unroll_steps = rule.steps if unroll_steps is None else unroll_steps
        if isinstance(rule, JacobianFree):
            jf_hessian = rule.hessian if rule.hessian != "identity" else jf_hessian
        if on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure must be 'warn', 'raise' or 'ignore', got {on_failure!r}")
        if jf_hessian not in ("identity", "diagonal"):
            raise ValueError(f"jf_hessian must be 'identity' or 'diagonal', got {jf_hessian!r}")
        self.backward_rule: BackwardRule = rule
        if isinstance(rule, Implicit):
            self.linear_solver: Any = rule.solver
            self.backward = rule.solver if isinstance(rule.solver, str) and rule.solver in BACKWARD_MODES \
                else "implicit"
        else:
            self.linear_solver = "auto"
            self.backward = {Unrolled: "unrolled", Truncated: "truncated", JacobianFree: "jacobian_free"}[type(rule)]
        self.gamma = 0.0 if gamma is None else float(gamma)
        if gamma is not None and not self.gamma >= 0:
            raise ValueError(f"gamma must be None or a non-negative number, got {gamma!r}")
        self.shared_inputs = None if shared_inputs is None else tuple(int(i) for i in shared_inputs)
        self.solver = solver
        self.tol = tol
        self.max_iter = max_iter
        self.linear_tol = linear_tol
        self.linear_max_iter = linear_max_iter
        self.active_tol = active_tol
        self.check_tol = check_tol
        self.on_failure = on_failure
        self.dense_max = dense_max
        self.check_inputs = check_inputs
        self.unroll_steps = unroll_steps
        self.unroll_method = unroll_method
        self.unroll_lr = unroll_lr
        self.jf_hessian = jf_hessian
        if hessian not in ("exact", "gauss_newton"):
            raise ValueError(f"hessian must be 'exact' or 'gauss_newton', got {hessian!r}")
        self.hessian = hessian
        self.diagnostics = Diagnostics()

    # ---- what subclasses define ------------------------------------------------------------------------------
    def objective(self, *xs: Any, y: Tensor) -> Tensor:
        """``f(x, y)``, batched: returns shape ``(b,)``.

        The default, for a node that defines ``residuals(*xs, y)``, is ``1/2 ||r(x, y)||^2`` per element. With
        ``hessian="gauss_newton"`` it is the linearised ``1/2 ||r(x, y0) + J(x, y0) (y - y0)||^2`` at
        ``y0 = y.detach()``: the same value and gradient in ``y`` (hence the same mixed derivative), but Hessian
        ``J^T J``.
        """
        residuals = getattr(self, "residuals", None)
        if not callable(residuals):
            raise NotImplementedError(f"{type(self).__name__} must define objective(self, *xs, y) or "
                                      f"residuals(self, *xs, y)")
        if getattr(self, "hessian", "exact") == "gauss_newton":
            y0 = y.detach()
            r0, dr = jvp(lambda u: residuals(*xs, y=u), (y0,), (y - y0,))
            r = r0 + dr
        else:
            r = residuals(*xs, y=y)
        if not isinstance(r, Tensor) or r.dim() == 0 or r.shape[0] != y.shape[0]:
            shape = tuple(r.shape) if isinstance(r, Tensor) else type(r).__name__
            raise DDNError(f"{type(self).__name__}.residuals must return shape ({y.shape[0]}, k), got {shape}")
        r = r.reshape(y.shape[0], -1)
        return 0.5 * (r * r).sum(-1)

    def initial_guess(self, *xs: Any) -> Tensor:
        """Starting point ``y0`` of shape ``(b, ...)`` for the built-in solvers; it fixes ``y``'s shape."""
        raise NotImplementedError(
            f"{type(self).__name__} defines no solve(); define initial_guess(self, *xs) returning y0 of shape "
            f"(b, ...) so that the built-in solver can run")

    def _problem_class(self) -> str:
        return "unconstrained"

    def solve(self, *xs: Any) -> tuple[Tensor, Optional[dict]]:
        """Solve the problem for a batch: returns ``(y, ctx)``.

        The default runs the built-in solver for the node's problem class from :meth:`initial_guess`
        (Levenberg-Marquardt for an unconstrained node that defines ``residuals``); ``ctx`` then holds the
        multipliers ``"nu"`` and the solver's per-element ``"converged"`` and ``"iterations"``.
        """
        y0 = self.initial_guess(*xs)
        if not isinstance(y0, Tensor):
            raise DDNError(f"{type(self).__name__}.initial_guess must return a tensor, got {type(y0).__name__}")
        y0 = y0.detach()
        b = y0.shape[0]
        bp = self._bind(xs, y0)
        tensors = [xs[i].detach() for i in bp.tensor_pos]
        residuals = getattr(self, "residuals", None)
        rfun = None
        if callable(residuals):
            rfun = lambda t: residuals(*bp.inputs(tensors), y=bp.unflatten(t))  # noqa: E731  (checked by the solver)
        problem = Problem(objective=lambda t: bp.f(tensors, t),
                          eq=(lambda t: bp.c(tensors, t)[:, :bp.num_eq]) if bp.num_eq else None,
                          ineq=(lambda t: bp.c(tensors, t)[:, bp.num_eq:]) if bp.num_ineq else None,
                          residuals=rfun)
        default = "levenberg_marquardt" if rfun is not None and not bp.num_constraints else \
            DEFAULTS[self._problem_class()]
        solver = get_solver(self.solver if self.solver is not None else default, kind="minimise")
        kwargs: dict = {"max_iter": self.max_iter}
        if self.tol is not None:
            kwargs["tol"] = self.tol
        y0f = y0.reshape(b, -1)
        res = solver(problem, y0f, **kwargs)
        f0, g0 = value_and_batch_grad(problem.objective, y0f)
        ctx = {"nu": res.nu, "converged": res.converged, "iterations": res.iterations,
               "method": getattr(res, "method", None), "_start": (f0, g0, y0f)}
        return res.y.reshape(y0.shape), ctx

    def gradient(self, *xs: Any, y: Optional[Tensor] = None, v: Optional[Tensor] = None,
                 ctx: Optional[dict] = None) -> tuple[Optional[Tensor], ...]:
        """Vector-Jacobian products ``v^T Dy(x)`` for each input (None for non-tensor inputs).

        ``y`` is solved for when not given; ``v`` defaults to ones. Uses the node's ``backward`` mode.
        """
        if y is None:
            with torch.no_grad():
                y, ctx = self.solve(*[x.detach() if isinstance(x, Tensor) else x for x in xs])
        v = torch.ones_like(y) if v is None else v
        need = [isinstance(x, Tensor) and x.is_floating_point() for x in xs]
        return self._implicit_gradient(xs, y, v, ctx, need)

    def jacobian(self, *xs: Any, y: Optional[Tensor] = None, ctx: Optional[dict] = None
                 ) -> tuple[Optional[Tensor], ...]:
        """Full Jacobians ``dy/dx_k`` of shape ``(b, *y.shape[1:], *x_k.shape[1:])`` (for teaching and tests).

        Built from ``m`` vector-Jacobian products, one per output coordinate, so it costs ``m`` backward passes.
        """
        if y is None:
            with torch.no_grad():
                y, ctx = self.solve(*[x.detach() if isinstance(x, Tensor) else x for x in xs])
        b = y.shape[0]
        m = y[0].numel()
        rows = []
        for j in range(m):
            v = torch.zeros(b, m, dtype=y.dtype, device=y.device)
            v[:, j] = 1
            rows.append(self.gradient(*xs, y=y, v=v.reshape(y.shape), ctx=ctx))
        out = []
        for k, x in enumerate(xs):
            if not isinstance(x, Tensor) or rows[0][k] is None:
                out.append(None)
                continue
            jac = torch.stack([r[k] for r in rows], 1)  # (b, m, *xshape)
            out.append(jac.reshape(b, *y.shape[1:], *x.shape[1:]))
        return tuple(out)

    # ---- machinery -------------------------------------------------------------------------------------------
    def _constraint_counts(self, xs: tuple, y: Tensor) -> tuple[int, int]:
        return 0, 0

    def _shared_positions(self, xs: tuple) -> frozenset:
        """Positions of the tensor inputs shared by the whole batch (no leading batch dimension).

        ``shared_inputs`` declares them; otherwise a tensor input is shared when it is 0-d or its leading size
        differs from the batch size ``b``, the leading size of the first tensor input with at least one
        dimension. Shared inputs are passed to the node's functions unchanged and get their gradient by one
        reduction over the batch (never expanded to it)."""
        if self.shared_inputs is not None:
            return frozenset(i % len(xs) for i in self.shared_inputs) if xs else frozenset()
        return shared_positions(xs)

    def _bind(self, xs: tuple, y: Tensor, hess_mode: str = "exact") -> BoundProblem:
        shared = self._shared_positions(xs)
        tensor_pos = tuple(i for i, x in enumerate(xs) if isinstance(x, Tensor) and i not in shared)
        template = tuple(None if i in tensor_pos else x for i, x in enumerate(xs))
        p, q = self._constraint_counts(xs, y)
        method = self.linear_solver
        return BoundProblem(self, template, tensor_pos, tuple(y.shape[1:]), p, q, hess_mode, self.gamma, method,
                            self.linear_tol, self.linear_max_iter, self.dense_max)

    def _check_tol(self, dtype: torch.dtype) -> float:
        if self.check_tol is not None:
            return self.check_tol
        return 1e-6 if dtype == torch.float64 else 1e-3

    def _state(self, bp: BoundProblem, tensors: list, yf: Tensor, ctx: Optional[dict]) -> Optional[ConstraintState]:
        if not bp.num_constraints:
            return None
        nu = ctx.get("nu") if ctx else None
        return constraint_state(bp, tensors, yf, nu, self.active_tol)

    def _check_batch(self, xs: tuple) -> int:
        name = type(self).__name__
        shared = self._shared_positions(xs)
        if self.check_inputs:
            for i in sorted(shared):
                x = xs[i]
                if isinstance(x, Tensor) and (x.is_floating_point() or x.is_complex()) and \
                        not bool(torch.isfinite(x.detach()).all()):
                    raise DDNError(f"{name}: shared input {i} (shape {tuple(x.shape)}) contains NaN or Inf")
        sizes = [(i, x) for i, x in enumerate(xs) if isinstance(x, Tensor) and i not in shared]
        if not sizes:
            zero_d = [i for i, x in enumerate(xs) if isinstance(x, Tensor) and x.dim() == 0]
            what = f" (input {zero_d[0]} is a 0-d tensor)" if zero_d else ""
            raise DDNError(f"{name}: at least one input must be a tensor with a leading batch dimension{what}")
        for i, x in sizes:
            if x.dim() == 0:
                raise DDNError(f"{name}: input {i} is a 0-d tensor; every tensor input needs a leading batch "
                               f"dimension (shape (b, ...))")
        b = sizes[0][1].shape[0]
        bad = [(i, tuple(x.shape)) for i, x in sizes if x.shape[0] != b]
        if bad:
            shapes = ", ".join(f"input {i}: {s}" for i, s in [(sizes[0][0], tuple(sizes[0][1].shape))] + bad)
            raise DDNError(f"{name}: tensor inputs must share the batch size (leading dimension); got {shapes}")
        if self.check_inputs:
            for i, x in sizes:
                if x.is_floating_point() or x.is_complex():
                    finite = torch.isfinite(x.detach()).reshape(b, -1).all(-1)
                    if not bool(finite.all()):
                        raise DDNError(f"{name}: input {i} (shape {tuple(x.shape)}) contains NaN or Inf at batch "
                                       f"elements {element_list(~finite)}")
        return b

    def _forward(self, *xs: Any) -> tuple[Tensor, dict]:
        """Solve, check and record diagnostics. Runs without autograd."""
        name = type(self).__name__
        b = self._check_batch(xs)
        shared = self._shared_positions(xs) if self.shared_inputs is None else frozenset()
        try:
            out = self._solve_packed(*xs)
        except (RuntimeError, IndexError) as err:
            if not shared:
                raise
            shapes = ", ".join(f"input {i}: {tuple(x.shape)}" for i, x in enumerate(xs) if isinstance(x, Tensor))
            raise DDNError(f"{name}: tensor inputs must share the batch size (leading dimension) {b}, or be inputs "
                           f"shared by the whole batch; inputs {sorted(shared)} have another leading size and were "
                           f"passed unchanged as shared inputs, but solving failed on them ({shapes}): {err}. Give "
                           f"them the batch dimension, or declare shared_inputs=(...) on the node") from err
        if not (isinstance(out, tuple) and len(out) == 2):
            raise DDNError(f"{name}.solve must return a tuple (y, ctx), got {type(out).__name__}")
        y, ctx = out
        if not isinstance(y, Tensor):
            raise DDNError(f"{name}.solve must return y as a tensor, got {type(y).__name__}")
        if y.dim() == 0 or y.shape[0] != b:
            raise DDNError(f"{name}.solve returned y of shape {tuple(y.shape)}; expected a leading batch dimension "
                           f"of size {b}")
        ctx = dict(ctx) if ctx else {}
        y = y.detach()
        if self.check_inputs:
            finite = torch.isfinite(y).reshape(b, -1).all(-1)
            if not bool(finite.all()):
                raise DDNError(f"{name}: the solution y contains NaN or Inf at batch elements {element_list(~finite)}")
        diag = self._diagnose(xs, y, ctx)
        self.diagnostics = diag
        ctx["_cache"] = ImplicitCache()
        return y, ctx

    def _solve_packed(self, *xs: Any) -> Any:
        """``solve(*xs)``; node kinds with structured solutions (tuples) pack them into one tensor here."""
        return self.solve(*xs)

    def _output(self, y: Tensor) -> Any:
        """The layer's output for the packed solution ``y`` (the inverse of :meth:`_solve_packed`'s packing)."""
        return y

    def _diagnose(self, xs: tuple, y: Tensor, ctx: dict) -> Diagnostics:
        name = type(self).__name__
        b = y.shape[0]
        yf = y.reshape(b, -1)
        bp = self._bind(xs, y)
        tensors = [xs[i].detach() for i in bp.tensor_pos]
        state = self._state(bp, tensors, yf, ctx)
        fval, gf = value_and_batch_grad(lambda t: bp.f(tensors, t), yf)
        if state is not None:
            ctx["nu"] = state.nu
            ctx["_state"] = state
            resid = gf - (state.jac.transpose(-1, -2) @ state.nu.unsqueeze(-1)).squeeze(-1)
            residual = resid.norm(dim=-1) + state.dual_infeasible
            cv = state.cval * state.cscale  # distances to the constraints (each divided by its gradient norm)
            cv[:, :bp.num_eq] = cv[:, :bp.num_eq].abs()
            distance = cv.clamp_min(0).amax(-1)
            raw = cv / state.cscale
            violation = raw.clamp_min(0).amax(-1)  # reported in the units the node wrote its constraints in
            active = state.mask[:, bp.num_eq:]
        else:
            resid = gf
            residual = gf.norm(dim=-1)
            violation = distance = torch.zeros_like(residual)
            active = None
        converged = ctx.get("converged")
        iterations = ctx.get("iterations")
        diag = Diagnostics(residual=residual, constraint_violation=violation, active=active,
                           converged=converged if converged is not None else torch.ones(b, dtype=torch.bool,
                                                                                        device=y.device),
                           iterations=iterations if iterations is not None else torch.zeros(
                               b, dtype=torch.long, device=y.device))
        tol = self._check_tol(y.dtype)
        start = ctx.get("_start")
        if start is None and type(self).initial_guess is not DeclarativeNode.initial_guess:
            # a user's solve: the node's initial guess gives the problem's scales
            y0 = self.initial_guess(*xs)
            if isinstance(y0, Tensor) and y0.shape == y.shape and bool(torch.isfinite(y0).all()):
                y0f = y0.detach().reshape(b, -1).to(yf.dtype)
                f0, g0 = value_and_batch_grad(lambda t: bp.f(tensors, t), y0f)
                start = (f0, g0, y0f)
        if start is not None:
            # scale-invariant, against the built-in solver's start (see solvers._common.first_order_check)
            ok, _ = first_order_check(fval, resid, yf, tol, *start)
            bad_opt = ~ok
            if state is not None:  # inequality multipliers of the wrong sign, relative to the multipliers' size
                nu_size = state.nu.norm(dim=-1).clamp_min(torch.finfo(yf.dtype).tiny)
                bad_opt = bad_opt | (state.dual_infeasible > tol * nu_size)
        else:
            # a user's solve: flagged only when both the absolute and the scale-free test fail
            ok, _ = first_order_check(fval, resid, yf, tol)
            bad_opt = (residual > tol * (1 + fval.abs())) & ~ok
        bad_con = distance > tol * (1 + yf.abs().amax(-1))
        if self.on_failure != "ignore":
            messages = []
            if converged is not None and not bool(converged.all()):
                messages.append(f"the forward solver did not converge at elements {element_list(~converged)}")
            if bool(bad_opt.any()):
                messages.append(f"the solution fails the first-order optimality conditions at elements "
                                f"{element_list(bad_opt)} (residual up to {float(residual.max()):.3g}; the "
                                f"scale-free test |grad L| |y| / |f| <= {tol:.1g} fails)")
            if bool(bad_con.any()):
                messages.append(f"the solution violates the constraints at elements {element_list(bad_con)} "
                                f"(violation up to {float(violation.max()):.3g})")
            if messages:
                diag.messages = messages
                report(self.on_failure, f"{name}: " + "; ".join(messages) + ". Gradients there are not reliable.",
                       ConvergenceWarning, stacklevel=5)
        return diag

    def _implicit_gradient(self, xs: tuple, y: Tensor, v: Tensor, ctx: Optional[dict], need: list
                           ) -> tuple[Optional[Tensor], ...]:
        out: list[Optional[Tensor]] = [None] * len(xs)
        b = y.shape[0]
        hess_mode = "exact"
        if self.backward == "jacobian_free":
            hess_mode = self.jf_hessian
        bp = self._bind(xs, y, hess_mode)
        tensors = [xs[i] for i in bp.tensor_pos]
        tneed = [bool(need[i]) for i in bp.tensor_pos]
        if not any(tneed):
            return tuple(out)
        if v.shape != y.shape:
            raise DDNError(f"{type(self).__name__}: incoming gradient has shape {tuple(v.shape)} but y has shape "
                           f"{tuple(y.shape)}")
        yf = y.reshape(b, -1)
        ctx_nu = ctx if (ctx and not torch.is_grad_enabled()) else None
        state = self._state(bp, tensors, yf, ctx_nu)
        if hess_mode == "diagonal":
            lag = lambda t: bp.lagrangian(tensors, t, state.nu if state is not None else None)  # noqa: E731
            bp.hess_diag = torch.diagonal(batch_hessian(lag, yf.detach()), dim1=-2, dim2=-1).detach()
        grads = implicit_vjp(bp, tensors, tneed, yf, v.reshape(b, -1), state,
                             (ctx or {}).get("_cache") if hess_mode == "exact" else None, v)
        for pos, g in zip(bp.tensor_pos, grads):
            out[pos] = g
        self._record_backward(bp, state, b)
        return tuple(out)

    def _attach(self, xs: tuple, y: Tensor, ctx: dict) -> Tensor:
        """``y`` plus the implicit rule for every tensor the node's functions use other than its batched inputs
        (parameters and buffers of a node that is an ``nn.Module``, tensors captured by its methods, shared
        inputs): see :class:`~torchddn.implicit.ImplicitRule`. Returns ``y`` unchanged when there are none that
        require grad. Cost: one evaluation of ``grad_y L`` (and the constraints) at the solution in the forward;
        in the backward, the KKT solve is shared with the batched inputs' one. A node that overrides
        :meth:`gradient` (for its positional inputs) still gets this rule for the other tensors, from its objective;
        one without an objective cannot, and warns when such tensors require grad."""
        b = y.shape[0]
        ystar = y.detach()
        yf = ystar.reshape(b, -1)
        hess_mode = self.jf_hessian if self.backward == "jacobian_free" else "exact"
        bp = self._bind(xs, ystar, hess_mode)
        tensors = [xs[i].detach() for i in bp.tensor_pos]
        with torch.enable_grad():
            try:
                live = is_live(bp.f(tensors, yf))
            except NotImplementedError:
                if any(is_live(xs[i]) for i in self._shared_positions(xs)):
                    warnings.warn(f"{type(self).__name__} defines no objective, so its shared inputs get no "
                                  f"gradient from gradient(); give them the batch dimension", DDNWarning,
                                  stacklevel=4)
                return y
            if not live and bp.num_constraints:
                live = is_live(bp.c(tensors, yf))
        if not live:
            return y
        state = ctx.get("_state")
        if bp.num_constraints and (state is None or state.nu.shape[0] != b):
            with torch.no_grad():
                state = constraint_state(bp, tensors, yf, None, self.active_tol)
        if not bp.num_constraints:
            state = None
        if hess_mode == "diagonal":
            with torch.no_grad():
                lag = lambda t: bp.lagrangian(tensors, t, state.nu if state is not None else None)  # noqa: E731
                bp.hess_diag = torch.diagonal(batch_hessian(lag, yf), dim1=-2, dim2=-1)
        with torch.enable_grad():
            q = kkt_residual_live(bp, tensors, yf, state)
        if not is_live(q):
            return y
        cache = ctx.get("_cache") if hess_mode == "exact" else None
        rule = KKTRule(self, bp, tensors, yf, state, y.shape, cache)
        return y + AttachImplicit.apply(rule, q - q.detach())

    def _implicit_jvp(self, xs: tuple, y: Tensor, tangents: tuple, ctx: Optional[dict]) -> Tensor:
        """Forward-mode product ``Dy(x) dx``: ``dy = -[K^-1 [B dx; C dx]]_y`` (used by ``jvp``/``jacfwd``)."""
        b = y.shape[0]
        bp = self._bind(xs, y)
        tensors = [xs[i] for i in bp.tensor_pos]
        tan = [tangents[i] if isinstance(tangents[i], Tensor) else torch.zeros_like(xs[i]) for i in bp.tensor_pos]
        yf = y.reshape(b, -1)
        state = self._state(bp, tensors, yf, ctx)
        nu = state.nu if state is not None else None

        def stationarity(*ts: Tensor) -> Tensor:
            gl = batch_grad(lambda t: bp.lagrangian(ts, t, nu), yf)
            if not bp.num_constraints:
                return gl
            return torch.cat([gl, bp.c(ts, yf) * state.weights], -1)

        _, rhs = jvp(stationarity, tuple(tensors), tuple(tan))
        z = ImplicitSolve.apply(bp, -rhs, yf, nu, state.weights if state is not None else None, *tensors)
        self._record_backward(bp, state, b)
        return z[:, :yf.shape[1]].reshape(y.shape)

    def _record_backward(self, bp: BoundProblem, state: Optional[ConstraintState], b: int) -> None:
        if not bp.infos:
            return
        info = bp.infos[0]
        diag = self.diagnostics
        residual, iterations, nonreg, indefinite = (t.detach() for t in (info.residual, info.iterations,
                                                                           info.nonregular, info.indefinite))
        if residual.shape[0] != b:
            # the solve ran under torch.func.vmap with the vmapped dimension folded into the batch
            residual, iterations, nonreg, indefinite = (t.reshape(-1, b).amax(0) for t in (
                residual, iterations, nonreg, indefinite))
        diag.linear_residual = residual
        diag.linear_iterations = iterations
        nonreg = nonreg | indefinite
        if state is not None:
            nonreg = nonreg | state.vanishing | state.dependent | state.weak
        diag.nonregular = nonreg
        diag.backward_method = info.method
        if bool(nonreg.any()) and self.on_failure != "ignore":
            warn_nonregular(type(self).__name__, nonreg, state, indefinite)
        tol = bp.tol if bp.tol is not None else linalg.default_tol(info.residual.dtype)
        bad = (residual > max(1e3 * tol, 1e-6 if residual.dtype == torch.float64 else 1e-3)) & ~nonreg
        if bool(bad.any()):
            report(self.on_failure, f"{type(self).__name__}: the backward linear solve ({info.method}) did not "
                   f"converge at elements {element_list(bad)} (relative residual up to "
                   f"{float(residual.max()):.3g}); increase linear_max_iter or use backward='dense'",
                   ConvergenceWarning, stacklevel=5)

    # ---- unrolled and truncated modes ------------------------------------------------------------------------
    def _unrolled_forward(self, *xs: Any) -> Tensor:
        """Differentiable solver iterations (``backward="unrolled"`` / ``"truncated"``)."""
        b = self._check_batch(xs)
        detached = [x.detach() if isinstance(x, Tensor) else x for x in xs]
        with torch.no_grad():
            y0 = self.initial_guess(*detached) if self.backward == "unrolled" else None
            bp = self._bind(xs, y0) if y0 is not None else None
            if bp is None or bp.num_constraints:  # the solution fixes the start (truncated) or the active set
                y_star, ctx = self.solve(*detached)
            else:
                y_star, ctx = y0, None
        y_star = y_star.detach()
        bp = self._bind(xs, y_star)
        tensors = [xs[i] for i in bp.tensor_pos]
        method = self.unroll_method or ("newton" if bp.num_constraints else "gd")
        if method not in ("gd", "newton"):
            raise ValueError(f"unroll_method must be 'gd' or 'newton', got {method!r}")
        if method == "gd" and bp.num_constraints:
            raise DDNError(f"{type(self).__name__}: unroll_method='gd' needs an unconstrained node; use "
                           f"unroll_method='newton' for constrained nodes")
        if self.backward == "truncated":
            y = y_star.reshape(b, -1)
            steps = 10 if self.unroll_steps is None else self.unroll_steps
        else:
            y = y0.detach().reshape(b, -1)
            steps = self.max_iter if self.unroll_steps is None else self.unroll_steps
        state = None
        if bp.num_constraints:
            with torch.no_grad():
                state = constraint_state(bp, [t.detach() for t in tensors], y_star.reshape(b, -1),
                                         (ctx or {}).get("nu"), self.active_tol)
        lr = self.unroll_lr
        if method == "gd" and lr is None:
            lr = 1.0 / _lipschitz(lambda t: bp.f([t_.detach() for t_ in tensors], t), y.detach())
        for _ in range(steps):
            y = _newton_kkt_step(bp, tensors, y, state) if method == "newton" else \
                y - lr * _grad_create(lambda t: bp.f(tensors, t), y)
        return y.reshape(y_star.shape)


def _grad_create(fn: Callable[[Tensor], Tensor], y: Tensor) -> Tensor:
    """Per-element gradient that keeps the graph (for unrolled differentiation)."""
    if not y.requires_grad:
        y = y.detach().requires_grad_(True) if not torch.is_grad_enabled() else y.requires_grad_(True)
    return torch.autograd.grad(fn(y).sum(), y, create_graph=True)[0]


def _lipschitz(fn: Callable[[Tensor], Tensor], y: Tensor, iters: int = 20) -> float:
    """Largest Hessian eigenvalue over the batch, by power iteration (for a safe gradient-descent step)."""
    v = torch.randn_like(y)
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    lam = torch.ones(y.shape[0], dtype=y.dtype, device=y.device)
    for _ in range(iters):
        hv = batch_hvp(fn, y, v)
        lam = hv.norm(dim=-1)
        v = hv / lam.clamp_min(1e-30)[:, None]
    return float(lam.max().clamp_min(1e-12)) * 1.1


def _newton_kkt_step(bp: BoundProblem, tensors: list, y: Tensor, state: Optional[ConstraintState]) -> Tensor:
    """One differentiable Newton (or Newton-KKT on the active set) step, dense."""
    b, m = y.shape
    if not y.requires_grad and torch.is_grad_enabled():
        y = y.requires_grad_(True)
    nu = state.nu if state is not None else None
    lag = lambda t: bp.lagrangian(tensors, t, nu)  # noqa: E731
    g = _grad_create(lambda t: bp.f(tensors, t), y)
    gl = _grad_create(lag, y)
    rows = [torch.autograd.grad(gl[:, j].sum(), y, create_graph=True)[0] for j in range(m)]
    H = torch.stack(rows, 1) + bp.gamma * torch.eye(m, dtype=y.dtype, device=y.device)
    if state is None:
        return y - torch.linalg.solve(H, g.unsqueeze(-1)).squeeze(-1)
    r = bp.num_constraints
    maskf = state.mask.to(y.dtype)
    cval = bp.c(tensors, y)
    jac = torch.stack([torch.autograd.grad(cval[:, i].sum(), y, create_graph=True)[0] for i in range(r)], 1)
    jm = jac * maskf[..., None]
    K = torch.cat([torch.cat([H, jm.transpose(-1, -2)], -1),
                   torch.cat([jm, -torch.diag_embed(1 - maskf)], -1)], -2)
    rhs = torch.cat([-g, -cval * maskf], -1)
    step = torch.linalg.lstsq(K, rhs.unsqueeze(-1)).solution.squeeze(-1) if K.device.type == "cpu" else \
        (torch.linalg.pinv(K) @ rhs.unsqueeze(-1)).squeeze(-1)
    return y + step[:, :m]


class EqConstDeclarativeNode(DeclarativeNode):
    """Equality-constrained node ``y(x) in argmin_u f(x, u) s.t. h(x, u) = 0``.

    Subclasses add ``equality_constraints(*xs, y) -> (b,)`` or ``(b, p)``. The gradient is Prop. 4.5:
    ``Dy = H^-1 A^T (A H^-1 A^T)^-1 (A H^-1 B - C) - H^-1 B`` with ``A = D_y h``, ``C = D_x h`` and ``H``, ``B`` taken
    on the Lagrangian ``f - nu^T h``; it is computed as one solve with the symmetric KKT matrix
    ``[[H, A^T], [A, 0]]``. Multipliers come from ``ctx["nu"]`` (convention ``grad_y f = A^T nu``) or are
    recovered by least squares.
    """

    def _problem_class(self) -> str:
        return "equality"

    def equality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        """``h(x, y)``, shape ``(b,)`` or ``(b, p)``; the constraint is ``h = 0``."""
        raise NotImplementedError(f"{type(self).__name__} must define equality_constraints(self, *xs, y)")

    def _has(self, name: str) -> bool:
        impl = getattr(type(self), name)
        return impl is not getattr(EqConstDeclarativeNode, name) and impl is not getattr(IneqConstDeclarativeNode, name)

    def _constraint_counts(self, xs: tuple, y: Tensor) -> tuple[int, int]:
        b = y.shape[0]
        counts = []
        for name in ("equality_constraints", "inequality_constraints"):
            if not self._has(name):
                counts.append(0)
                continue
            with torch.no_grad():
                val = getattr(self, name)(*xs, y=y)
            if not isinstance(val, Tensor) or val.dim() == 0 or val.shape[0] != b:
                shape = tuple(val.shape) if isinstance(val, Tensor) else type(val).__name__
                raise DDNError(f"{type(self).__name__}.{name} must return shape ({b},) or ({b}, p), got {shape}")
            counts.append(val.reshape(b, -1).shape[1])
        return counts[0], counts[1]

    def inequality_constraints(self, *xs: Any, y: Tensor) -> Tensor:  # overridden by inequality nodes
        raise NotImplementedError


class IneqConstDeclarativeNode(EqConstDeclarativeNode):
    """Inequality-constrained node ``y(x) in argmin_u f(x, u) s.t. g(x, u) <= 0`` (and optionally ``h = 0``).

    Subclasses add ``inequality_constraints(*xs, y) -> (b,)`` or ``(b, q)`` and optionally
    ``equality_constraints``. The gradient is Prop. 4.6: Prop. 4.5 applied to the equality and *active* inequality
    constraints, with inequality multipliers ``nu <= 0`` in the convention ``grad_y f = J^T nu``. Batch elements
    with different active sets share one fixed-size KKT system in which inactive rows are masked out. An inequality
    is active when ``g_i >= -active_tol * (1 + ||grad g_i|| ||y||)``.
    """

    def _problem_class(self) -> str:
        return "inequality"

    def inequality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        """``g(x, y)``, shape ``(b,)`` or ``(b, q)``; the constraint is ``g <= 0``."""
        raise NotImplementedError(f"{type(self).__name__} must define inequality_constraints(self, *xs, y)")


class LinEqConstDeclarativeNode(EqConstDeclarativeNode):
    """Linear-equality-constrained node ``y(x) in argmin_u f(x, u) s.t. A u = d``.

    Subclasses define ``linear_constraint_parameters(y) -> (A, d)`` with ``A`` of shape ``(p, m)`` or
    ``(b, p, m)`` and ``d`` of shape ``(p,)`` or ``(b, p)``, where ``m = y[0].numel()``. The gradient includes the
    constraint correction of Prop. 4.5 (with ``C = 0``): ``Dy = (H^-1 A^T (A H^-1 A^T)^-1 A H^-1 - H^-1) B``.
    """

    def linear_constraint_parameters(self, y: Tensor) -> tuple[Tensor, Tensor]:
        """``(A, d)`` of the constraint ``A y = d`` (``y`` flattened per element)."""
        raise NotImplementedError(f"{type(self).__name__} must define linear_constraint_parameters(self, y)")

    def equality_constraints(self, *xs: Any, y: Tensor) -> Tensor:
        A, d = self.linear_constraint_parameters(y)
        yf = y.reshape(y.shape[0], -1)
        Ay = (yf @ A.transpose(-1, -2)) if A.dim() == 2 else (A @ yf.unsqueeze(-1)).squeeze(-1)
        return Ay - d

    def _has(self, name: str) -> bool:
        return name == "equality_constraints"


#: alias used by the paper's reference code
AbstractDeclarativeNode = DeclarativeNode
