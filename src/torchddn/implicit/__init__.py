"""The implicit rule under every node kind (Gould, Hartley & Campbell, Props. 4.4-4.6; the implicit function theorem).

An optimality condition ``q(theta, z) = 0`` gives a linear operator ``A = dq/dz``, which gives one differentiable
linear solve (:mod:`torchddn.linalg`), which gives the vector-Jacobian product ``theta_bar = -(dq/dtheta)^T A^{-T} v``
and the Jacobian-vector product ``dz = -A^{-1} (dq/dtheta) dtheta``.

* :mod:`torchddn.implicit.kkt`: optimisation nodes, ``q = [grad_y L; M c]`` and the masked KKT operator; the
  attached rule (:class:`ImplicitRule`, :class:`AttachImplicit`) that gives parameters, captured tensors and shared
  inputs their gradients.
* :mod:`torchddn.implicit.root`: root nodes (``q = F``, ``A = dF/dy``) and fixed points (``q = y - T``).
"""
from torchddn.implicit.kkt import *  # noqa: F401,F403
from torchddn.implicit.kkt import (AttachImplicit, BoundProblem, ConstraintState, ImplicitCache,  # noqa: F401
                                   ImplicitRule, ImplicitSolve, KKTRule, cached_kkt_matvec, constraint_state,
                                   default_active_tol, fold_vmap, implicit_vjp, is_live, kkt_residual_live,
                                   shared_positions, warn_nonregular)
from torchddn.implicit.root import (ImplicitLinearSolve, ImplicitOp, RootRule, attach_root, root_tangent,  # noqa: F401
                                    root_vjp)
