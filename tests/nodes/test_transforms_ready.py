"""torch.func transforms (jvp, jacfwd, jacrev, vmap) and double backward through the ready nodes, in float64.

Each node is checked four ways: ``torch.func.jvp`` against central finite differences of re-solves, ``jacfwd``
against ``jacrev``, ``vmap`` against a Python loop over the vmapped dimension, and ``gradgradcheck``.
"""
from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.func import jacfwd, jacrev, jvp, vmap

import torchddn.nodes as nodes

D = torch.float64


def _fd_jvp(f, args, tangents, eps=1e-6):
    plus = f(*[a + eps * t for a, t in zip(args, tangents)])
    minus = f(*[a - eps * t for a, t in zip(args, tangents)])
    return (plus - minus) / (2 * eps)


def _check_all(f, args, atol=1e-6, vmap_dim_size=3, fd=True, gg=True):
    gen = torch.Generator().manual_seed(1)
    tangents = tuple(torch.randn(a.shape, dtype=D, generator=gen) for a in args)
    _, jv = jvp(f, args, tangents)
    if fd:
        torch.testing.assert_close(jv, _fd_jvp(f, args, tangents), atol=atol, rtol=1e-5)
    argnums = tuple(range(len(args)))
    jf = jacfwd(f, argnums=argnums)(*args)
    jr = jacrev(f, argnums=argnums)(*args)
    for a_, b_ in zip(jf, jr):
        torch.testing.assert_close(a_, b_, atol=1e-9, rtol=1e-7)
    # vmap over a new leading dimension of every argument, against a loop
    stacked = tuple(torch.stack([a + 0.01 * k * torch.randn(a.shape, dtype=D, generator=gen)
                                 for k in range(vmap_dim_size)]) for a in args)
    vm = vmap(f)(*stacked)
    loop = torch.stack([f(*[s[k] for s in stacked]) for k in range(vmap_dim_size)])
    torch.testing.assert_close(vm, loop, atol=1e-10, rtol=1e-9)
    ins = tuple(a.clone().requires_grad_() for a in args)
    assert gradcheck(f, ins, atol=atol)
    if gg:
        assert gradgradcheck(f, ins, atol=atol)


# ---------------------------------------------------------------- robust_pool
@pytest.mark.parametrize("penalty", ["quadratic", "pseudo_huber", "huber", "welsch", "truncated_quadratic"])
def test_robust_pool_transforms(penalty):
    torch.manual_seed(0)
    # rows with outliers, so Huber / truncated-quadratic rows have different inlier (active) sets
    x = torch.randn(4, 7, dtype=D)
    x[1, :2] += 6.0
    x[3, 0] -= 9.0
    alpha = torch.tensor([0.7, 1.0, 1.3, 2.0], dtype=D)

    def f(x, alpha):
        return nodes.robust_pool(x, penalty, alpha, dim=-1)

    _check_all(f, (x, alpha))


def test_robust_pool_module_import():
    import torchddn.nodes.robust_pool as m
    assert hasattr(m, "_RobustPool1d")
    assert callable(nodes.robust_pool)
