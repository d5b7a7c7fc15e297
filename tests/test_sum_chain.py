"""adaptlr._reduce.chained_sums: under ``jax.jit``, the terms that several sums read (DSA's products,
each summed over rows and over columns) are made one after another, so that XLA keeps one of them
live at a time; the numbers do not change, and work traced in an epoch boundary's loop has a chain
of its own."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

import adaptlr
from adaptlr import _boundary, _ordering, _reduce
from adaptlr._reduce import CHAINED_ELEMENTS, Reducer, Term, chained_sums

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")

SHAPES = [(256, 256), (256, 256), (128, 512), (64, 4, 4), (64,)]  # three terms of CHAINED_ELEMENTS


def _unchained(xp: object, term: object) -> object:
    return term


def _arrays(seed: int) -> list:
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in SHAPES]


def _dsa() -> adaptlr.Optimizer:
    return adaptlr.dsa(adaptlr.adamw(1e-2), hyper_lr=0.05)


def test_a_donated_dsa_step_keeps_one_product_live(monkeypatch: pytest.MonkeyPatch) -> None:
    from adaptlr.backends.fast import jit_step

    params, grads = _arrays(0), _arrays(1)
    largest = 4 * max(int(np.prod(s)) for s in SHAPES)

    def temp_bytes() -> int:
        opt = _dsa()
        compiled = jit_step(opt, donate=True).compile(grads, opt.init(params), params)
        return int(compiled.memory_analysis().temp_size_in_bytes)

    chained = temp_bytes()
    monkeypatch.setattr(_reduce, "_after_chain", _unchained)
    unchained = temp_bytes()
    assert chained <= 1.05 * largest, (chained, largest)
    assert unchained > 1.5 * largest, (unchained, largest)  # what the chain removes (round 23)


def test_the_chained_step_is_the_unchained_one_bit_for_bit(monkeypatch: pytest.MonkeyPatch) -> None:
    import jax.numpy as jnp

    from adaptlr.backends.fast import jit_step

    def run() -> tuple:
        opt = _dsa()
        step = jit_step(opt, donate=True)
        params = [p + 0 for p in _arrays(0)]
        state = opt.init(params)
        for seed in range(1, 5):
            params, state = step(_arrays(seed), state, params)
        return params, adaptlr.learning_rates(state)

    chained = run()
    monkeypatch.setattr(_reduce, "_after_chain", _unchained)
    unchained = run()
    for got, want in zip(_leaves(chained), _leaves(unchained), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    # and the factors moved: the steps are not trivially equal
    assert any(not np.all(np.asarray(r) == np.asarray(r).ravel()[0]) for r in _leaves(chained[1]) if jnp.ndim(r))


def _leaves(tree: object) -> list:
    import optree

    return optree.tree_leaves(tree)


def _waits(make_terms: object, monkeypatch: pytest.MonkeyPatch) -> int:
    """How many terms ``make_terms(x)`` gives were made to wait (``adaptlr._ordering.wait_for``),
    summed under ``jax.jit`` within a chain (each twice, over rows and over columns)."""
    import jax
    import jax.numpy as jnp

    waited = []

    def wait_for(xp: object, values: list, sums: list) -> list:
        waited.append(len(values))
        return _ordering.wait_for(xp, values, sums)

    monkeypatch.setattr(_reduce, "wait_for", wait_for)

    def sums(x: jax.Array) -> list:
        with chained_sums():
            reduce = Reducer(jnp)
            out = []
            for term in make_terms(x):
                out += [reduce.leaf_sum(0, term, axis=1), reduce.leaf_sum(0, term, axis=0)]
            return out

    jax.jit(sums).lower(jnp.ones((256, CHAINED_ELEMENTS // 256), dtype=jnp.float32))
    return sum(waited)


def test_only_large_terms_that_several_sums_read_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    import jax.numpy as jnp

    def terms(reads: int, rows: int | None = None) -> object:
        def make(x: object) -> list:
            x = x if rows is None else x[:rows]
            return [Term(lambda k=k: x * k, 2, reads) for k in (1.0, 2.0, 3.0)]

        return make

    assert _waits(terms(2), monkeypatch) == 2  # the second and third wait for the sums of the one before
    assert _waits(terms(1), monkeypatch) == 0  # one sum each: XLA fuses the term into it
    assert _waits(terms(2, rows=128), monkeypatch) == 0  # below CHAINED_ELEMENTS: cheap to keep live together
    # outside a chain (eager backends, or code that did not open one): nothing waits
    reduce = Reducer(jnp)
    x = jnp.ones((256, 256))
    term = Term(lambda: x * 2.0, 2, reads=2)
    assert reduce.leaf_sum(0, term, axis=0).shape == (256,) and term.value() is not None


@pytest.mark.parametrize("due", [False, True])
def test_boundary_work_has_a_chain_of_its_own(due: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import jax
    import jax.numpy as jnp

    def step(x: jax.Array, pred: jax.Array) -> tuple:
        with chained_sums():
            reduce = Reducer(jnp)
            before = reduce.leaf_sum(0, Term(lambda: x * x, 2, reads=2), axis=0)

            def boundary(y: jax.Array) -> tuple:  # traced in the loop's body
                return (y * reduce.leaf_sum(0, Term(lambda: y * x, 2, reads=2), axis=1, keepdims=True),)

            (y,) = _boundary.at_boundary(jnp, pred, boundary, (x,))
            after = reduce.leaf_sum(0, Term(lambda: y * y, 2, reads=2))
            return before, y, after

    x_host = np.linspace(-1.0, 1.0, CHAINED_ELEMENTS, dtype=np.float32).reshape(256, -1)
    # (jax.jit of a new function each time: traced anew, not taken from the cache)
    before, y, after = jax.jit(lambda *args: step(*args))(jnp.asarray(x_host), jnp.asarray(due))
    y_want = x_host * (x_host * x_host).sum(axis=1, keepdims=True) if due else x_host
    np.testing.assert_allclose(np.asarray(before), (x_host * x_host).sum(axis=0), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y), y_want, rtol=1e-5)
    np.testing.assert_allclose(float(after), float((y_want * y_want).sum()), rtol=1e-4)

    # sharing the step's chain, the term after the loop would wait for a sum of the loop's body
    monkeypatch.setattr(_boundary, "in_own_chain", lambda work: work)
    with pytest.raises(jax.errors.UnexpectedTracerError):
        jax.jit(lambda *args: step(*args))(jnp.asarray(x_host), jnp.asarray(due))
