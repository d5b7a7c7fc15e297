"""adaptlr._reduce.Term under ``jax.jit``: a term that several sums read (DSA's products, each summed
over rows and over columns) is made again for each sum, behind ``jax.lax.optimization_barrier``
(:mod:`adaptlr.backends.jax_reads`), so that XLA fuses each product into its own reduction instead
of writing it out and reading it back: no temporaries, the same numbers."""

from __future__ import annotations

import importlib.util
import operator

import numpy as np
import pytest

import adaptlr
from adaptlr import _reduce
from adaptlr._reduce import READ_AGAIN_ELEMENTS, Reducer, Term

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

SHAPES = [(256, 256), (256, 256), (128, 512), (64, 4, 4), (64,)]  # three leaves of READ_AGAIN_ELEMENTS


def _arrays(seed: int) -> list:
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _dsa() -> adaptlr.Optimizer:
    return adaptlr.dsa(adaptlr.adamw(1e-2), hyper_lr=0.05)


def _kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every term made once and kept, as before round 28."""
    monkeypatch.setattr(_reduce, "READ_AGAIN_ELEMENTS", 1 << 62)


def test_a_donated_dsa_step_has_no_product_sized_temporaries(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptlr.backends.fast import jit_step

    params, grads = _arrays(0), _arrays(1)
    largest = 4 * max(int(np.prod(s)) for s in SHAPES)

    def temp_bytes() -> int:
        opt = _dsa()
        compiled = jit_step(opt, donate=True).compile(grads, opt.init(params), params)
        return int(compiled.memory_analysis().temp_size_in_bytes)

    made_per_sum = temp_bytes()
    _kept(monkeypatch)
    kept = temp_bytes()
    assert made_per_sum <= 0.25 * largest, (made_per_sum, largest)  # (the factors' sums and such)
    assert kept > 1.5 * largest, (kept, largest)  # the products written out, all live at once


def test_terms_made_per_sum_give_the_kept_terms_numbers(monkeypatch: pytest.MonkeyPatch) -> None:
    import jax.numpy as jnp
    import optree

    from adaptlr.backends.fast import jit_step

    def run() -> list:
        opt = _dsa()
        step = jit_step(opt, donate=True)
        params = [p + 0 for p in _arrays(0)]
        state = opt.init(params)
        for seed in range(1, 5):
            params, state = step(_arrays(seed), state, params)
        return optree.tree_leaves((params, adaptlr.learning_rates(state)))

    made_per_sum = run()
    _kept(monkeypatch)
    kept = run()
    for got, want in zip(made_per_sum, kept, strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # the factors moved: the steps are not trivially equal
    rates = [np.asarray(r) for r in made_per_sum[len(SHAPES):] if jnp.ndim(r)]
    assert any(not np.all(r == r.ravel()[0]) for r in rates)


def _read_again_calls(reads: int, rows: int, monkeypatch: pytest.MonkeyPatch) -> tuple[int, list]:
    """How often a jitted row and column sum of ``x ⊙ x`` (``x`` of ``rows`` × 256) passed the
    inputs through the barrier, and the sums."""
    import jax
    import jax.numpy as jnp

    from adaptlr.backends import jax_reads

    calls = []

    def counted(inputs: tuple) -> tuple:
        calls.append(len(inputs))
        return read_again(inputs)

    read_again = jax_reads.read_again
    monkeypatch.setattr(jax_reads, "read_again", counted)

    def sums(x: jax.Array) -> list:
        term = Term(operator.mul, (x, x), 2, reads)
        reduce = Reducer(jnp)
        return [reduce.leaf_sum(0, term, axis=1), reduce.leaf_sum(0, term, axis=0)]

    x = np.linspace(-1.0, 1.0, rows * 256, dtype=np.float32).reshape(rows, 256)
    got = jax.jit(sums)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got[0]), (x * x).sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), (x * x).sum(axis=0), rtol=1e-5)
    return len(calls), got


def test_only_large_terms_that_several_sums_read_are_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = READ_AGAIN_ELEMENTS // 256
    assert _read_again_calls(2, rows, monkeypatch)[0] == 1  # the first sum from the inputs, the second not
    assert _read_again_calls(1, rows, monkeypatch)[0] == 0  # read once: kept (XLA fuses it into its one sum)
    assert _read_again_calls(2, rows // 2, monkeypatch)[0] == 0  # below READ_AGAIN_ELEMENTS: made once


def test_an_eager_term_is_made_once_and_kept() -> None:
    made = []
    x = np.arange(12.0).reshape(3, 4)
    term = Term(lambda a, b: made.append(1) or a * b, (x, x), 2, reads=2)
    reduce = Reducer(np)
    assert reduce.leaf_sum(0, term, axis=1).tolist() == (x * x).sum(axis=1).tolist()
    assert reduce.leaf_sum(0, term, axis=0).tolist() == (x * x).sum(axis=0).tolist()
    assert made == [1] and term.made_for_one_sum() is None


def test_a_jitted_dsa_update_has_derivatives() -> None:
    """The barrier has derivatives: ``jax.grad`` through a jitted DSA update (with respect to the
    gradients it is given) equals the same derivative with every term kept."""
    import jax
    import jax.numpy as jnp

    opt = _dsa()
    params = _arrays(0)[:1]  # one leaf of READ_AGAIN_ELEMENTS: a smaller program to differentiate
    state = opt.init(params)
    _, state = opt.update(_arrays(1)[:1], state, params)  # P ≠ 0: the cosines depend on the gradients

    def loss(grads: list) -> jax.Array:
        updates, _ = opt.update(grads, state, params)
        return sum(jnp.sum(u * u) for u in updates)

    grads = _arrays(2)[:1]
    got = jax.jit(jax.grad(loss))(grads)
    saved = _reduce.READ_AGAIN_ELEMENTS
    try:
        _reduce.READ_AGAIN_ELEMENTS = 1 << 62
        want = jax.jit(jax.grad(loss))(grads)
    finally:
        _reduce.READ_AGAIN_ELEMENTS = saved
    for g, w in zip(got, want, strict=True):
        w = np.asarray(w)  # (float32, summed in another order: an absolute tolerance at the derivative's scale)
        np.testing.assert_allclose(np.asarray(g), w, rtol=1e-5, atol=1e-5 * float(np.max(np.abs(w))))
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in got)
