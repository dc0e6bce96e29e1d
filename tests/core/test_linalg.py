"""torchddn.linalg: tagged operators and solver values, against torch.linalg references in float64."""
import pytest
import torch

import torchddn.fixed_point as fixed_point
from torchddn import linalg
from torchddn.diagnostics import DDNError
from torchddn.linalg import (CG, GMRES, MINRES, Auto, BiCGStab, Dense, DenseOperator, DiagonalOperator,
                             LinearOperator, Neumann, TridiagonalOperator, UserSolver)

DT = torch.float64


def mv(A):
    return lambda z: (A @ z.unsqueeze(-1)).squeeze(-1)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def spectral(b, n, evals, seed, dtype=DT):
    """Symmetric ``Q diag(evals) Qᵀ`` with a random orthogonal ``Q`` per element; ``evals`` ``(b, n)``."""
    Q, _ = torch.linalg.qr(torch.randn(b, n, n, generator=gen(seed), dtype=DT))
    return (Q @ torch.diag_embed(evals.to(DT)) @ Q.mT).to(dtype)


def system(tag, b=4, n=20, seed=0, dtype=DT):
    """A batch of well-conditioned ``(b, n, n)`` matrices with the given tag and its operator."""
    g = gen(seed + 100)
    if tag == "spd":
        A = spectral(b, n, 1 + 9 * torch.rand(b, n, generator=g, dtype=DT), seed, dtype)
    elif tag == "indefinite":
        sign = torch.where(torch.arange(n) % 2 == 0, 1.0, -1.0).to(DT)
        A = spectral(b, n, sign * (1 + 9 * torch.rand(b, n, generator=g, dtype=DT)), seed, dtype)
    else:
        A = (3 * torch.eye(n, dtype=DT) + torch.randn(b, n, n, generator=g, dtype=DT) / n ** 0.5).to(dtype)
    op = LinearOperator(mv(A), n, symmetric=tag != "general", psd=tag == "spd",
                        diagonal=torch.diagonal(A, dim1=-2, dim2=-1))
    return A, op


def rhs(b, n, seed=1, dtype=DT):
    return torch.randn(b, n, generator=gen(seed), dtype=DT).to(dtype)


SOLVERS = {
    "spd": [Dense(), CG(), CG(precond="jacobi"), MINRES(), MINRES(precond="jacobi"), GMRES(), BiCGStab(),
            Auto(dense_max=4), Auto(), "cg", "minres", "dense", "gmres", "bicgstab"],
    "indefinite": [Dense(), CG(), MINRES(), MINRES(precond="jacobi"), GMRES(), BiCGStab(), Auto(dense_max=4)],
    "general": [Dense(), GMRES(), GMRES(restart=3), GMRES(precond="jacobi"), BiCGStab(),
                BiCGStab(precond="jacobi"), Auto(dense_max=4), Auto()],
}
CASES = [(tag, s) for tag, ss in SOLVERS.items() for s in ss]


@pytest.mark.parametrize("tag,solver", CASES, ids=[f"{t}-{s!r}" for t, s in CASES])
def test_solvers_match_torch_solve(tag, solver):
    A, op = system(tag)
    b = rhs(4, 20)
    x, info = linalg.solve(op, b, solver)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=0)
    true_res = (mv(A)(x) - b).norm(dim=-1) / b.norm(dim=-1)
    torch.testing.assert_close(info.residual, true_res, atol=1e-13, rtol=1e-6)
    assert bool((info.residual < 1e-9).all()) and bool(info.converged.all())
    assert not bool(info.nonregular.any())
    assert info.indefinite.tolist() == [tag == "indefinite" and info.method.startswith("cg")] * 4


def test_auto_choices():
    _, spd = system("spd")
    _, ind = system("indefinite")
    _, gen_ = system("general")
    plain = LinearOperator(spd.matvec, 20, True, True)
    assert Auto().choose(spd) == Dense()
    assert repr(Auto(dense_max=4).choose(spd)) == "CG(precond='jacobi')"
    assert repr(Auto(dense_max=4).choose(plain)) == "CG()"
    assert repr(Auto(dense_max=4, precond=None).choose(spd)) == "CG()"
    assert repr(Auto(dense_max=4).choose(ind)) == "MINRES()"
    assert repr(Auto(dense_max=4).choose(gen_)) == "GMRES()"
    assert isinstance(Auto(dense_max=0).choose(DiagonalOperator(torch.ones(2, 300, dtype=DT))), Dense)
    ones = torch.ones(2, 299, dtype=DT)
    assert isinstance(Auto(dense_max=0).choose(TridiagonalOperator(ones, 3 * ones[:, :1].expand(2, 300), ones)),
                      Dense)


# ---------------------------------------------------------------------------------------------------------------
# structured operators
# ---------------------------------------------------------------------------------------------------------------

def test_diagonal_operator():
    d = torch.rand(3, 7, generator=gen(2), dtype=DT) + 0.1
    d[1, 2] = -2.0
    op = DiagonalOperator(d)
    assert op.symmetric and not op.psd and DiagonalOperator(d.abs()).psd and op.T is op
    assert op.tags == ("diagonal", "symmetric")
    b = rhs(3, 7)
    torch.testing.assert_close(op.materialize(b), torch.diag_embed(d))
    torch.testing.assert_close(op.diag(b), d)
    for solver in (Dense(), Auto(), MINRES(), GMRES()):
        x, info = solver(op, b)
        torch.testing.assert_close(x, b / d, atol=1e-12, rtol=0)
    x, info = CG(precond="jacobi")(DiagonalOperator(d.abs()), b)
    torch.testing.assert_close(x, b / d.abs(), atol=1e-12, rtol=0)
    assert info.iterations.tolist() == [1, 1, 1]


def tridiag(b, n, seed, dominant=True):
    g = gen(seed)
    lo, di, up = (torch.randn(b, n - 1, generator=g, dtype=DT), torch.randn(b, n, generator=g, dtype=DT),
                  torch.randn(b, n - 1, generator=g, dtype=DT))
    if dominant:
        di = di + 4 * torch.sign(di)
    return lo, di, up


def test_tridiagonal_operator_products_and_transpose():
    lo, di, up = tridiag(3, 9, 3)
    op = TridiagonalOperator(lo, di, up)
    b = rhs(3, 9)
    A = op.materialize(b)
    torch.testing.assert_close(A, LinearOperator(op.matvec, 9, False).materialize(b))
    assert A[0, 1, 0] == lo[0, 0] and A[0, 0, 1] == up[0, 0] and not op.symmetric
    torch.testing.assert_close(op.T.materialize(b), A.mT)
    torch.testing.assert_close(op.diag(b), di)
    sym = TridiagonalOperator(lo, di, lo)
    assert sym.symmetric and sym.T is sym


@pytest.mark.parametrize("dominant", [True, False])
def test_tridiagonal_direct_solve_matches_torch(dominant):
    lo, di, up = tridiag(6, 15, 4, dominant)
    op = TridiagonalOperator(lo, di, up)
    b = rhs(6, 15)
    A = op.materialize(b)
    x, info = Dense()(op, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=1e-9)
    assert info.method == "tridiagonal" and not bool(info.nonregular.any())
    xt, _ = linalg.transpose_solve(op, b, "dense")
    torch.testing.assert_close(xt, torch.linalg.solve(A.mT, b), atol=1e-9, rtol=1e-9)
    if dominant:
        for solver in (GMRES(), BiCGStab()):
            torch.testing.assert_close(solver(op, b)[0], torch.linalg.solve(A, b), atol=1e-9, rtol=0)


def test_tridiagonal_solve_pivots():
    # without row interchanges the first pivot 1e-20 gives x = [0, 1]; pivoting gives [1, 1]
    op = TridiagonalOperator(torch.tensor([[1.0]], dtype=DT), torch.tensor([[1e-20, 1.0]], dtype=DT),
                             torch.tensor([[1.0]], dtype=DT))
    x, info = Dense()(op, torch.tensor([[1.0, 2.0]], dtype=DT))
    torch.testing.assert_close(x, torch.tensor([[1.0, 1.0]], dtype=DT), atol=1e-15, rtol=0)
    assert info.method == "tridiagonal" and not bool(info.nonregular.any())   # no tiny pivot after interchanges
    # a zero diagonal (every step pivots); nonsingular for even n
    n = 10
    ones = torch.ones(2, n - 1, dtype=DT)
    op = TridiagonalOperator(ones, torch.zeros(2, n, dtype=DT), torch.stack([ones[0], 2 * ones[1]]))
    b = rhs(2, n)
    x, info = Dense()(op, b)
    torch.testing.assert_close(x, torch.linalg.solve(op.materialize(b), b), atol=1e-12, rtol=0)
    assert not bool(info.nonregular.any())


def test_tridiagonal_size_one():
    z = torch.zeros(3, 0, dtype=DT)
    op = TridiagonalOperator(z, torch.tensor([[2.0], [0.0], [-1.0]], dtype=DT), z)
    x, info = Dense()(op, torch.ones(3, 1, dtype=DT))
    assert x.flatten().tolist() == [0.5, 0.0, -1.0] and info.nonregular.tolist() == [False, True, False]


def test_tridiagonal_broadcasts_over_extra_rhs_dimensions():
    lo, di, up = tridiag(3, 8, 5)
    op = TridiagonalOperator(lo, di, up)
    b = torch.randn(4, 3, 8, generator=gen(6), dtype=DT)
    x, info = Dense()(op, b)
    A = op.materialize(b[0])
    torch.testing.assert_close(x, torch.linalg.solve(A.expand(4, 3, 8, 8), b), atol=1e-10, rtol=0)
    assert info.residual.shape == (4, 3)


def test_dense_operator():
    A, _ = system("general", 3, 6)
    op = DenseOperator(A)
    assert not op.symmetric and op.kind == "dense"
    b = rhs(3, 6)
    torch.testing.assert_close(op.materialize(b), A)
    torch.testing.assert_close(op.T.materialize(b), A.mT)
    torch.testing.assert_close(Dense()(op, b)[0], torch.linalg.solve(A, b))
    torch.testing.assert_close(linalg.transpose_solve(op, b, GMRES())[0], torch.linalg.solve(A.mT, b),
                               atol=1e-9, rtol=0)
    S = A + A.mT
    assert DenseOperator(S).symmetric and DenseOperator(S).T.symmetric
    # B Bᵀ is symmetric only up to rounding: still inferred symmetric, and CG accepts it
    B = torch.randn(3, 40, 40, generator=gen(19), dtype=DT)
    spd = B @ B.mT + torch.eye(40, dtype=DT)
    op = DenseOperator(spd, psd=True)
    assert op.symmetric and not DenseOperator(spd + 1e-6 * torch.triu(torch.ones_like(spd), 1)).symmetric
    b = rhs(3, 40)
    torch.testing.assert_close(CG(precond="jacobi")(op, b)[0], torch.linalg.solve(spd, b), atol=1e-8, rtol=0)


@pytest.mark.parametrize("solver", [Dense(), CG(), MINRES(), GMRES(), BiCGStab(), Neumann(),
                                    Auto(dense_max=2)], ids=repr)
def test_unbatched_right_hand_side(solver):
    A, _ = system("spd", 1, 8)
    A = A[0] / 10                                   # eigenvalues in [0.1, 1]: the Neumann series converges
    b = rhs(1, 8)[0]
    x, info = solver(DenseOperator(A, psd=True), b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=0)
    assert x.shape == (8,) and info.residual.shape == ()


# ---------------------------------------------------------------------------------------------------------------
# transposes
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("with_rmatvec", [True, False])
@pytest.mark.parametrize("solver", [Dense(), GMRES(), BiCGStab(), Auto(dense_max=4)], ids=repr)
def test_transpose_solve(with_rmatvec, solver):
    A, _ = system("general", 3, 12)
    op = LinearOperator(mv(A), 12, symmetric=False, rmatvec=mv(A.mT) if with_rmatvec else None)
    b = rhs(3, 12)
    torch.testing.assert_close(op.T.materialize(b), A.mT)
    torch.testing.assert_close(op.T.T.materialize(b), A)
    torch.testing.assert_close(op.rmv(b), mv(A.mT)(b))
    x, info = linalg.transpose_solve(op, b, solver)
    torch.testing.assert_close(x, torch.linalg.solve(A.mT, b), atol=1e-9, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# singular systems: the minimum-norm solution
# ---------------------------------------------------------------------------------------------------------------

def singular_sym(psd=True, b=3, n=10, rank=6, seed=7):
    """Symmetric rank-``rank`` matrices: PSD, or with eigenvalues of both signs."""
    mags = 1 + torch.rand(b, rank, generator=gen(seed), dtype=DT)
    if not psd:
        mags = mags * torch.where(torch.arange(rank) % 2 == 0, 1.0, -1.0).to(DT)
    return spectral(b, n, torch.cat([mags, torch.zeros(b, n - rank, dtype=DT)], 1), seed)


@pytest.mark.parametrize("solver", [Dense(), CG(), MINRES(), GMRES(), Auto(), Auto(dense_max=4)], ids=repr)
def test_singular_consistent_symmetric_gives_minimum_norm(solver):
    A = singular_sym()
    op = LinearOperator(mv(A), 10, True, True)
    b = mv(A)(rhs(3, 10, seed=8))                    # in range(A)
    x, info = solver(op, b)
    torch.testing.assert_close(x, mv(torch.linalg.pinv(A))(b), atol=1e-8, rtol=0)
    assert bool((info.residual < 1e-9).all())
    if isinstance(solver, Dense) or (isinstance(solver, Auto) and solver.dense_max > 10):
        assert bool(info.nonregular.all())


@pytest.mark.parametrize("solver", [Dense(), CG(), MINRES(), Auto(dense_max=4)], ids=repr)
@pytest.mark.parametrize("psd", [True, False])
def test_singular_inconsistent_symmetric_gives_minimum_norm_least_squares(solver, psd):
    A = singular_sym(psd)
    op = LinearOperator(mv(A), 10, True, psd)
    b = rhs(3, 10, seed=10)                          # not in range(A)
    ref = torch.linalg.lstsq(A, b.unsqueeze(-1), rcond=1e-10, driver="gelsd").solution.squeeze(-1)
    x, info = solver(op, b)
    torch.testing.assert_close(x, ref, atol=1e-7, rtol=1e-7)
    assert bool(info.nonregular.all()) and bool(info.converged.all())


def general_singular(b=3, n=8, seed=11):
    g = gen(seed)
    A = torch.randn(b, n, 5, generator=g, dtype=DT) @ torch.randn(b, 5, n, generator=g, dtype=DT)  # rank 5
    return A


def test_singular_general_dense_and_inconsistent_krylov_give_minimum_norm():
    A = general_singular()
    op = LinearOperator(mv(A), 8, symmetric=False)
    pinv = torch.linalg.pinv(A)
    b = mv(A)(rhs(3, 8, seed=12))                    # consistent
    x, info = Dense()(op, b)
    torch.testing.assert_close(x, mv(pinv)(b), atol=1e-9, rtol=0)
    assert bool(info.nonregular.all())
    bad = rhs(3, 8, seed=13)                         # inconsistent: min-norm least squares
    ref = mv(pinv)(bad)
    for solver in (Dense(), GMRES(), BiCGStab(), Auto(dense_max=4)):
        x, info = solver(op, bad)
        torch.testing.assert_close(x, ref, atol=1e-6, rtol=1e-6)
        assert bool(info.nonregular.all()) and bool(info.converged.all()), solver
        lsq = (mv(A)(ref) - bad).norm(dim=-1) / bad.norm(dim=-1)
        torch.testing.assert_close(info.residual, lsq, atol=1e-8, rtol=0)
    for solver in (GMRES(), BiCGStab()):             # consistent: a solution (not necessarily minimum-norm)
        x, info = solver(op, b)
        assert bool((info.residual < 1e-8).all())


def test_singular_structured_operators():
    d = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=DT)
    b = torch.tensor([[1.0, 1.0, 1.0], [1.0, 2.0, 3.0]], dtype=DT)
    x, info = Dense()(DiagonalOperator(d), b)
    torch.testing.assert_close(x, torch.tensor([[0.5, 0.0, -1.0], [0.0, 0.0, 0.0]], dtype=DT))
    assert info.nonregular.tolist() == [True, True]
    lo, di, up = tridiag(3, 8, 14)
    di = di.clone()
    lo, up = lo.clone(), up.clone()
    di[1, 3], lo[1, 2], up[1, 3] = 0.0, 0.0, 0.0     # zero column 3 at element 1
    lo[2], di[2], up[2] = 1.0, 1.0, 1.0               # all-ones band, eigenvalue 1 + 2 cos(6 pi / 9) = 0
    op = TridiagonalOperator(lo, di, up)
    b = rhs(3, 8, seed=15)
    x, info = Dense()(op, b)
    A = op.materialize(b)
    torch.testing.assert_close(x, mv(torch.linalg.pinv(A, rtol=1e-12))(b), atol=1e-9, rtol=0)
    assert info.nonregular.tolist() == [False, True, True]


# ---------------------------------------------------------------------------------------------------------------
# preconditioning and per-element convergence
# ---------------------------------------------------------------------------------------------------------------

def badly_scaled_spd(b=2, n=60, decades=4, seed=16):
    C = spectral(b, n, 1 + torch.rand(b, n, generator=gen(seed), dtype=DT), seed)
    s = torch.logspace(0, decades, n, dtype=DT).sqrt()
    return s[:, None] * C * s[None, :]


def test_jacobi_cg_takes_far_fewer_iterations():
    A = badly_scaled_spd()
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    op = LinearOperator(mv(A), 60, True, True, diagonal=lambda: diag)
    b = rhs(2, 60)
    ref = torch.linalg.solve(A, b)
    x0, plain = CG(tol=1e-10)(op, b)
    x1, jac = CG(tol=1e-10, precond="jacobi")(op, b)
    x2, auto = Auto(dense_max=16, tol=1e-10)(op, b)
    for x in (x0, x1, x2):
        torch.testing.assert_close(x, ref, atol=1e-6 * float(ref.abs().max()), rtol=0)
    assert plain.method == jac.method == "cg"
    assert bool((plain.iterations >= 8 * jac.iterations).all()), (plain.iterations, jac.iterations)
    assert torch.equal(auto.iterations, jac.iterations)
    # preconditioned MINRES stops on an M-norm estimate; the refinement restarts bring the true residual to tol
    x3, mr = MINRES(tol=1e-10, precond="jacobi")(op, b)
    assert mr.method == "minres" and bool((mr.residual <= 1e-10).all()), mr.residual
    assert bool((plain.iterations >= 4 * mr.iterations).all())
    # a user preconditioner (the same Jacobi one) does as well
    _, user = CG(tol=1e-10, precond=lambda r: r / diag)(op, b)
    assert torch.equal(user.iterations, jac.iterations)


@pytest.mark.parametrize("solver", [CG(), MINRES(), GMRES(), BiCGStab()], ids=repr)
def test_per_element_convergence_easy_and_hard(solver):
    n = 30
    hard = spectral(1, n, torch.logspace(0, 3, n, dtype=DT)[None], 17)[0]
    A = torch.stack([torch.eye(n, dtype=DT), hard, 2 * torch.eye(n, dtype=DT)])
    op = LinearOperator(mv(A), n, True, True)
    b = rhs(3, n)
    x, info = solver(op, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-8, rtol=0)
    its = info.iterations.tolist()
    assert its[0] == its[2] <= 2 and its[1] > 10, its
    # the easy elements are frozen once done: the same answer as solving them alone
    xe, _ = solver(LinearOperator(mv(A[[0, 2]]), n, True, True), b[[0, 2]])
    torch.testing.assert_close(x[[0, 2]], xe, atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------------------------
# user callables, Neumann, float32, no NaN
# ---------------------------------------------------------------------------------------------------------------

def test_user_callable_solvers():
    A, op = system("spd", 3, 10)
    b = rhs(3, 10)

    def richardson(matvec, b):
        x = torch.zeros_like(b)
        for _ in range(400):
            x = x + 0.15 * (b - matvec(x))
        return x

    x, info = linalg.solve(op, b, richardson)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-9, rtol=0)
    assert info.method == "user:richardson" and bool(info.converged.all())
    x, info = linalg.solve(op, b, lambda matvec, b: (torch.zeros_like(b), None))
    assert torch.equal(info.residual, torch.ones(3, dtype=DT)) and not bool(info.converged.any())
    with pytest.raises(DDNError, match="shape"):
        linalg.solve(op, b, lambda matvec, b: b[:, :3])
    with pytest.raises(DDNError, match=r"batch elements \[1\]"):
        linalg.solve(op, b, lambda matvec, b: torch.where(torch.arange(3)[:, None] == 1, torch.nan, b))
    assert repr(linalg.as_solver(richardson)) == "UserSolver(fn=richardson)"


def test_neumann():
    n = 6
    J = 0.5 * torch.linalg.qr(torch.randn(3, n, n, generator=gen(18), dtype=DT))[0]   # ||J|| = 0.5
    A = torch.eye(n, dtype=DT) - J
    op = LinearOperator(mv(A), n, symmetric=False)
    b = rhs(3, n)
    x, info = Neumann()(op, b)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), atol=1e-10, rtol=0)
    assert info.method == "neumann" and bool(info.converged.all())
    x3, info3 = Neumann(steps=3)(op, b)
    torch.testing.assert_close(x3, b + mv(J)(b) + mv(J)(mv(J)(b)))
    assert info3.iterations.tolist() == [3, 3, 3] and info3.method == "phantom"
    torch.testing.assert_close(linalg.transpose_solve(op, b, Neumann(damping=0.8))[0], torch.linalg.solve(A.mT, b),
                               atol=1e-9, rtol=0)
    diverging = LinearOperator(mv(-3 * torch.eye(n, dtype=DT).expand(3, n, n)), n)
    x, info = Neumann(max_iter=2000)(diverging, b)
    assert bool(torch.isfinite(x).all()) and not bool(info.converged.any())


F32 = [("spd", s) for s in (Dense(), CG(), CG(precond="jacobi"), MINRES(), GMRES(), BiCGStab(), Auto(dense_max=4))]
F32 += [("general", s) for s in (Dense(), GMRES(), BiCGStab(), Auto(dense_max=4))]


@pytest.mark.parametrize("tag,solver", F32, ids=[f"{t}-{s!r}" for t, s in F32])
def test_float32(tag, solver):
    A, op = system(tag, 4, 20, dtype=torch.float32)
    b = rhs(4, 20, dtype=torch.float32)
    x, info = solver(op, b)
    assert x.dtype == torch.float32 and info.residual.dtype == torch.float32
    ref = torch.linalg.solve(A.double(), b.double())
    assert float(((x.double() - ref).norm(dim=-1) / ref.norm(dim=-1)).max()) < 1e-4
    assert bool((info.residual < 1e-5).all())


NAN_SOLVERS = [Dense(), CG(), CG(precond="jacobi"), MINRES(), MINRES(precond="jacobi"), GMRES(), BiCGStab(),
               Neumann(), Auto(dense_max=2)]


@pytest.mark.parametrize("solver", NAN_SOLVERS, ids=repr)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_no_nan_on_singular_input(solver, dtype):
    n = 6
    A = torch.zeros(4, n, n, dtype=dtype)
    A[1] = torch.ones(n, n)                                   # rank one
    A[2, 0, 0] = 1e-30                                        # almost zero
    A[3] = torch.eye(n)
    symmetric = not isinstance(solver, (GMRES, BiCGStab))
    op = LinearOperator(mv(A), n, symmetric=symmetric, psd=True, diagonal=torch.diagonal(A, dim1=-2, dim2=-1))
    b = torch.ones(4, n, dtype=dtype)
    b[3] = 0.0
    x, info = solver(op, b)
    assert bool(torch.isfinite(x).all()) and bool(torch.isfinite(info.residual).all())
    assert torch.equal(x[3], torch.zeros(n, dtype=dtype))
    if not isinstance(solver, Neumann):
        torch.testing.assert_close(x[:2], mv(torch.linalg.pinv(A[:2].double()))(b[:2].double()).to(dtype),
                                   atol=1e-4, rtol=1e-4)
    for structured in (DiagonalOperator(torch.zeros(2, n, dtype=dtype)),
                       TridiagonalOperator(*(torch.zeros(2, k, dtype=dtype) for k in (n - 1, n, n - 1)))):
        x, info = solver(structured, b[:2])
        assert bool(torch.isfinite(x).all())


# ---------------------------------------------------------------------------------------------------------------
# the old call sites, shorthands, errors
# ---------------------------------------------------------------------------------------------------------------

def test_legacy_calls_and_shorthands():
    A, op = system("spd", 3, 10)
    b = rhs(3, 10)
    ref = torch.linalg.solve(A, b)
    x, info = linalg.solve(op, b, "cg", 1e-12, 200)          # positional (tol, max_iter) as implicit.py calls it
    torch.testing.assert_close(x, ref)
    assert info.method == "cg"
    x, info = linalg.solve(op, b, "auto", None, None, 128)
    assert info.method == "dense"
    # extra leading dimensions, with a vmapped product, as the constrained CG uses it
    bb = torch.stack([b, 2 * b])
    x, info = linalg.solve(LinearOperator(torch.vmap(mv(A)), 10, True, True), bb, "cg", 1e-12, 200)
    torch.testing.assert_close(x, torch.stack([ref, 2 * ref]))
    assert info.residual.shape == (2, 3)
    x, info = linalg.solve(op, bb, GMRES())
    torch.testing.assert_close(x, torch.stack([ref, 2 * ref]))
    x, info = linalg.cg(op.matvec, b)
    torch.testing.assert_close(x, ref)
    x, info = linalg.minres(op.matvec, b)
    torch.testing.assert_close(x, ref)
    x, singular, negative = linalg.pinv_solve_symmetric(A, b)
    torch.testing.assert_close(x, ref)
    x, info = linalg.dense_solve(A, b, True)
    torch.testing.assert_close(x, ref)
    assert linalg.default_tol(DT) == 1e-11 and linalg.default_tol(torch.float32) == 1e-6
    assert fixed_point.gmres is linalg.gmres and fixed_point.neumann is linalg.neumann
    assert fixed_point.dense_solve_general is linalg.dense_solve_general


def test_as_solver_and_repr():
    assert repr(linalg.as_solver("cg", tol=1e-4)) == "CG(tol=0.0001)"
    assert linalg.as_solver(CG(tol=1e-5), tol=1e-3).tol == 1e-5
    assert linalg.as_solver(CG(precond="jacobi"), tol=1e-3, max_iter=7) == CG(1e-3, 7, "jacobi")
    assert repr(linalg.as_solver(None)) == "Auto()"
    assert repr(linalg.as_solver("auto", dense_max=8)) == "Auto(dense_max=8)"
    assert repr(GMRES(restart=10, precond="jacobi")) == "GMRES(precond='jacobi', restart=10)"
    assert repr(Neumann(steps=5, damping=0.5)) == "Neumann(steps=5, damping=0.5)"
    assert repr(linalg.as_solver("fixed_point")) == "Neumann()"
    assert repr(Dense()) == "Dense()" and repr(BiCGStab()) == "BiCGStab()" and repr(MINRES()) == "MINRES()"
    assert isinstance(linalg.as_solver(lambda matvec, b: b), UserSolver)
    for name in linalg.SOLVER_NAMES:
        assert isinstance(linalg.as_solver(name), linalg.LinearSolver)


def test_bad_input_raises_named_errors():
    A, op = system("general", 2, 5)
    b = rhs(2, 5)
    with pytest.raises(DDNError, match="unknown linear solver 'lu'"):
        linalg.solve(op, b, "lu")
    with pytest.raises(DDNError, match="CG needs a symmetric operator"):
        CG()(op, b)
    with pytest.raises(DDNError, match="MINRES needs a symmetric operator"):
        linalg.solve(op, b, "minres")
    with pytest.raises(DDNError, match="needs the operator's diagonal"):
        CG(precond="jacobi")(LinearOperator(mv(A + A.mT), 5, True, True), b)
    with pytest.raises(DDNError, match=r"shape \(\*batch, 5\)"):
        linalg.solve(op, b[:, :4])
    with pytest.raises(DDNError, match="precond"):
        GMRES(precond="ilu")(op, b)
    with pytest.raises(DDNError, match="lower"):
        TridiagonalOperator(torch.ones(2, 5, dtype=DT), torch.ones(2, 5, dtype=DT), torch.ones(2, 4, dtype=DT))
    with pytest.raises(DDNError, match="n, n"):
        DenseOperator(torch.ones(2, 3, 4, dtype=DT))
