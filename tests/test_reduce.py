"""Sums and maxima over leaves (``adaptlr._reduce.add_all``, ``adaptlr._precision.largest``).

They give the chain's numbers (the same additions, left to right; JAX: within the rounding of its
tree of additions), and under ``jax.jit`` a step's compiled size grows linearly with the number of
leaves: XLA had fused the chains of ``n`` 0-D operations into every leaf's loop, and a Prodigy step
over 500 leaves took 5 minutes and 7.5 GB to compile.
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import pytest

import adaptlr
from adaptlr._precision import largest
from adaptlr._reduce import Reducer, add_all


def _values(n: int) -> np.ndarray:
    rng = np.random.default_rng(n)
    return rng.standard_normal(n) * 10.0 ** rng.integers(-8, 9, n)


@pytest.mark.parametrize("n", [1, 2, 7, 64])
def test_add_all_is_the_left_to_right_chain(backend, n):
    xp = backend.xp
    # values of very different sizes, so that another order of the additions rounds differently
    values = _values(n)
    parts = [backend.asarray(np.asarray(x)) for x in values]
    chain = backend.to_numpy(functools.reduce(operator.add, parts))
    # NumPy and torch on the CPU scan left to right; lax.cumsum adds in a tree (associative_scan) and
    # GPUs scan in parallel: their own rounding, within the bound of any order of the additions
    exact = backend.library in ("numpy", "array_api_strict") or backend.name == "torch"
    for got in (backend.to_numpy(add_all(xp, parts)), backend.to_numpy(Reducer(xp).total(parts))):
        if exact:
            assert got == chain
        else:
            assert abs(got - chain) <= (n - 1) * np.finfo(np.float64).eps * np.sum(np.abs(values))


def test_the_chain_order_is_what_the_test_checks():
    """The values above do round differently when added in another order (the test can fail)."""
    values = _values(64)
    assert functools.reduce(operator.add, values) != functools.reduce(operator.add, values[::-1])


def test_add_all_promotes_mixed_dtypes_as_addition_does(backend):
    xp = backend.xp
    parts = [backend.asarray(np.asarray(0.1), "float32"), backend.asarray(np.asarray(1e-9))]
    total = add_all(xp, parts)
    assert total.dtype == (parts[0] + parts[1]).dtype == xp.float64
    assert backend.to_numpy(total) == backend.to_numpy(parts[0] + parts[1])


def test_largest_is_the_maximum(backend):
    values = [3.0, -1.0, 7.5, 7.25, 0.0]
    got = largest(backend.xp, [backend.asarray(np.asarray(x)) for x in values], backend.xp.float64)
    assert float(backend.to_numpy(got)) == 7.5


MAKERS = {
    "prodigy": adaptlr.prodigy,
    "dadapt_adam": adaptlr.dadapt_adam,
    "dadapt_sgd": adaptlr.dadapt_sgd,
    "dog": adaptlr.dog,
    "autodrop(adamw)": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=10),
    "hypergradient(adamw)": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-4),
    "eg_step_size(adamw)": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), 0.01, 0.01),
    # a 0-D value per tensor that the base waits for under jit (adaptlr._ordering)
    "dsa(adamw)": lambda: adaptlr.dsa(adaptlr.adamw(1e-3)),
    "hypergradient(adamw) per tensor": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-4,
                                                                     granularity="tensor"),
    "eg_step_size(adamw) per tensor": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), 0.01, 0.01, scale="tensor"),
}


@pytest.mark.parametrize("name", list(MAKERS))
def test_the_jitted_step_compiles_to_a_size_linear_in_the_leaves(name):
    jnp = pytest.importorskip("jax.numpy", reason="JAX is not installed")
    from adaptlr.backends.fast import jit_step
    from adaptlr.backends.xla_copies import instruction_count

    def compiled_instructions(leaves: int) -> int:
        opt = MAKERS[name]()
        params = [jnp.asarray(np.full((4, 8), 0.5 + i), dtype=jnp.float32) for i in range(leaves)]
        grads = [p * 0.1 for p in params]
        return instruction_count(jit_step(opt, donate=False).compile(grads, opt.init(params), params).as_text())

    small, large = compiled_instructions(24), compiled_instructions(48)
    # linear: twice the leaves, at most about twice the instructions (quadratic was 3-4x here)
    assert large <= 2.2 * small, (small, large)
