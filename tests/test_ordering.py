"""adaptlr._ordering: the gradients the base reads, made to wait for the adaptations' sums under
``jax.jit``, are the same numbers for every value of those sums (NaN and ±∞ included)."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from adaptlr._ordering import ordered_after

has_jax = importlib.util.find_spec("jax") is not None


def test_eager_values_come_back_as_they_are() -> None:
    values = [np.array([1.0, -0.0]), np.array(2.0)]
    assert ordered_after(np, values, (), (np.array(1.0),)) is values


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize("sum_value", [0.0, -1.5, np.inf, -np.inf, np.nan])
def test_traced_values_are_unchanged_for_every_sum(sum_value: float) -> None:
    import jax
    import jax.numpy as jnp

    old = (jnp.asarray(1.0),)
    grads = jnp.asarray([1.0, -0.0, 0.0, np.nan, np.inf, -np.inf, 3e-45], dtype=jnp.float32)
    other = jnp.asarray([[2.0, -3.0]], dtype=jnp.float64)

    def step(grads: jax.Array, other: jax.Array, s: jax.Array) -> list:
        new = (s * 2.0,)
        out = ordered_after(jnp, [grads, other, grads], old, new)
        assert out[0] is out[2] and out[0] is not grads  # one dependent array per distinct input
        return out

    out = jax.jit(step)(grads, other, jnp.asarray(sum_value))
    for got, want in zip(out, (grads, other, grads), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.signbit(np.asarray(got)), np.signbit(np.asarray(want)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # NaN where NaN


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
def test_traced_values_without_new_arrays_are_not_touched() -> None:
    import jax
    import jax.numpy as jnp

    def step(grads: jax.Array, d: jax.Array) -> jax.Array:
        values = [grads]
        state = (d,)
        assert ordered_after(jnp, values, state, state) is values  # nothing new
        assert ordered_after(jnp, values, state, (d[:0] + 1,)) is values  # new, but no element to wait for
        return grads

    jax.jit(step)(jnp.ones(3), jnp.ones(3))


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
def test_traced_values_wait_for_a_new_array_through_its_first_element() -> None:
    """HD's rate per element is new and not 0-D (round 23: 2 f32 copies per parameter before)."""
    import jax
    import jax.numpy as jnp

    def step(grads: jax.Array, d: jax.Array) -> jax.Array:
        (out,) = ordered_after(jnp, [grads], (d,), (d * grads,))
        assert out is not grads  # made to depend on the new array
        return out

    grads = jnp.asarray([[1.0, np.nan], [-0.0, np.inf]])
    out = jax.jit(step)(grads, jnp.full((2, 2), np.nan))  # whatever the new array holds
    np.testing.assert_array_equal(np.asarray(out), np.asarray(grads))
    np.testing.assert_array_equal(np.signbit(np.asarray(out)), np.signbit(np.asarray(grads)))


@pytest.mark.skipif(not has_jax, reason="jax is not installed")
@pytest.mark.parametrize("t", [1, 2**31 - 1])
def test_as_loop_fusion_gives_every_value_back(t: int) -> None:
    """``as_loop_fusion``: eager, the same arrays; traced, the same values (signed zeros, NaN, ±∞,
    subnormals) for every count, only arrays of more than one dimension made a select (round 27)."""
    import jax
    import jax.numpy as jnp

    from adaptlr._ordering import as_loop_fusion

    eager = [np.ones((2, 3))]
    assert as_loop_fusion(np, eager, np.asarray(1.0)) is eager
    square = jnp.asarray([[1.0, -0.0, np.nan], [np.inf, -np.inf, 3e-45]], dtype=jnp.float32)
    line = jnp.asarray([1.0, -0.0])

    def step(square: jax.Array, line: jax.Array, t: jax.Array) -> list:
        out = as_loop_fusion(jnp, [square, line], t.astype(jnp.float64))
        assert out[0] is not square and out[1] is line
        return out

    for got, want in zip(jax.jit(step)(square, line, jnp.asarray(t, dtype=jnp.int32)), (square, line), strict=True):
        assert got.dtype == want.dtype
        np.testing.assert_array_equal(np.signbit(np.asarray(got)), np.signbit(np.asarray(want)))
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
