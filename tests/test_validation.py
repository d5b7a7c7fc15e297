"""Hyper-parameter validation: NumPy scalars accepted like Python numbers, 0-D array learning rates
(any backend, traced under jax.jit / jax.grad, optax.inject_hyperparams), schedules checked in eager
mode with the step named in the error."""

from __future__ import annotations

import math

import numpy as np
import pytest

import adaptlr
from adaptlr._state_tree import to_numpy
from adaptlr.conformance.backends import BACKENDS


def _trajectory(backend, opt, steps: int = 4) -> list[np.ndarray]:
    params = [backend.asarray(np.array([1.0, -2.0, 0.5])), backend.asarray(np.array(0.3))]
    state = opt.init(params)
    out = []
    for _ in range(steps):
        grads = [2 * p + 0.1 for p in params]
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        out.append([to_numpy(p) for p in params])
    return out


# -- NumPy scalar types ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda lr: adaptlr.sgd(lr, momentum=np.float64(0.9)),
    lambda lr: adaptlr.adamw(lr, b1=np.float32(0.9), weight_decay=np.float16(0.01)),
    lambda lr: adaptlr.active(adaptlr.adam(lr), steps_per_epoch=np.int64(2), increase=np.float32(0.5)),
    lambda lr: adaptlr.autodrop(adaptlr.sgd(lr), steps_per_epoch=np.int32(2), patience_epochs=np.int16(1)),
    lambda lr: adaptlr.skip_nonfinite(adaptlr.radam(lr), max_consecutive=np.int8(2)),
], ids=["sgd", "adamw", "active", "autodrop", "skip_nonfinite"])
def test_numpy_scalars_are_accepted_like_python_numbers(make):
    numpy_run = _trajectory(BACKENDS["numpy"], make(np.float32(1e-2)))
    python_run = _trajectory(BACKENDS["numpy"], make(float(np.float32(1e-2))))
    for a, b in zip(numpy_run, python_run):
        for x, y in zip(a, b):
            assert np.array_equal(x, y)


@pytest.mark.parametrize("value,error,match", [
    (np.bool_(True), TypeError, "learning_rate must be a real number, got bool"),
    (np.float64("nan"), ValueError, "learning_rate must be finite"),
    (np.float32(-1.0), ValueError, "learning_rate must be >= 0"),
])
def test_bad_numpy_scalar_learning_rate(value, error, match):
    with pytest.raises(error, match=match):
        adaptlr.adamw(value)


def test_bad_numpy_integer_steps_per_epoch():
    with pytest.raises(ValueError, match=r"steps_per_epoch must be a positive integer, got np.int64\(0\)"):
        adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=np.int64(0))
    with pytest.raises(ValueError, match="steps_per_epoch must be a positive integer"):
        adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=np.float64(4.0))


# -- 0-D array learning rates ---------------------------------------------------------------------------


def test_zero_d_array_learning_rate_equals_float(backend):
    for make in (lambda lr: adaptlr.adamw(lr, weight_decay=0.1),
                 lambda lr: adaptlr.active(adaptlr.sgd(lr, momentum=0.9), steps_per_epoch=1)):
        as_array = _trajectory(backend, make(backend.asarray(0.05)))
        as_float = _trajectory(backend, make(0.05))
        for a, b in zip(as_array, as_float):
            for x, y in zip(a, b):
                assert np.array_equal(x, y)


@pytest.mark.parametrize("value,error,match", [
    (np.ones(2), ValueError, r"must be a number, a 0-D array or a schedule; got an array of shape \(2,\)"),
    (np.asarray(float("nan")), ValueError, "learning_rate must be finite and >= 0, got nan"),
    (np.asarray(-0.1), ValueError, "learning_rate must be finite and >= 0, got -0.1"),
])
def test_bad_array_learning_rate(value, error, match):
    with pytest.raises(error, match=match):
        adaptlr.sgd(value)


def test_torch_tensor_learning_rate_equals_float():
    torch = pytest.importorskip("torch")
    backend = BACKENDS["torch"]
    as_tensor = _trajectory(backend, adaptlr.adamw(torch.tensor(0.05, dtype=torch.float64)))
    as_float = _trajectory(backend, adaptlr.adamw(0.05))
    assert all(np.array_equal(x, y) for a, b in zip(as_tensor, as_float) for x, y in zip(a, b))


def test_optax_inject_hyperparams_around_to_optax():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from adaptlr.backends.jax import to_optax

    factory_calls = []

    def factory(learning_rate):
        factory_calls.append(learning_rate)
        return to_optax(adaptlr.adamw(learning_rate))

    tx = optax.inject_hyperparams(factory)(learning_rate=0.1)
    params = {"w": jnp.array([1.0, -2.0, 0.5])}
    grads = {"w": jnp.array([0.3, -0.1, 0.2])}
    step = jax.jit(tx.update)
    opt_state = tx.init(params)
    reference = to_optax(adaptlr.adamw(0.1))
    ref_state = reference.init(params)
    updates, opt_state = step(grads, opt_state, params)
    ref_updates, ref_state = reference.update(grads, ref_state, params)
    np.testing.assert_allclose(updates["w"], ref_updates["w"], rtol=1e-14)
    # Change the injected learning rate: the next step uses it (the AdamW update -α(d + λθ) is
    # linear in α, and Adam's moments carry over).
    opt_state.hyperparams["learning_rate"] = jnp.asarray(0.01, dtype=opt_state.hyperparams["learning_rate"].dtype)
    updates, opt_state = step(grads, opt_state, params)
    ref_updates, _ = reference.update(grads, ref_state, params)
    np.testing.assert_allclose(updates["w"], 0.1 * ref_updates["w"], rtol=1e-14)
    assert len(factory_calls) == 2  # init, and one trace of the update for both learning rates


@pytest.mark.parametrize("make", [
    lambda lr: adaptlr.adam(lr),
    lambda lr: adaptlr.active(adaptlr.sgd(lr, momentum=0.9), steps_per_epoch=2, increase=0.5),
], ids=["adam", "active(sgdm)"])
@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_jax_grad_of_the_loss_after_k_steps_wrt_learning_rate(make, jit):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if not BACKENDS["jax"].available:
        pytest.skip(BACKENDS["jax"].unavailable_reason())
    BACKENDS["jax"].xp  # noqa: B018 - enables float64 (x64) on first use

    def loss_after(lr, steps=6):
        opt = make(lr)
        params = [jnp.array([1.0, -2.0, 0.5], dtype=jnp.float64)]
        state = opt.init(params)
        for _ in range(steps):
            grads = [2 * params[0] + jnp.sin(params[0])]
            updates, state = opt.update(grads, state, params)
            params = adaptlr.apply_updates(params, updates)
        return jnp.sum(params[0] ** 2)

    grad = jax.jit(jax.grad(loss_after)) if jit else jax.grad(loss_after)
    lr, h = 0.05, 1e-6
    finite_difference = (float(loss_after(lr + h)) - float(loss_after(lr - h))) / (2 * h)
    assert math.isclose(float(grad(jnp.asarray(lr, dtype=jnp.float64))), finite_difference, rel_tol=1e-7)
    assert abs(finite_difference) > 1e-3  # the learning rate matters for this loss


# -- schedules ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad,error,match", [
    (float("nan"), ValueError, "schedule returned nan at step 3; a learning rate must be finite and >= 0"),
    (-0.1, ValueError, "schedule returned -0.1 at step 3"),
    (None, TypeError, "schedule returned None at step 3"),
    ("0.1", TypeError, "schedule returned a str at step 3"),
], ids=["nan", "negative", "none", "str"])
def test_bad_schedule_value_names_the_step(backend, bad, error, match):
    xp = backend.xp

    def schedule(t):
        if bad is None or isinstance(bad, str):
            return 0.1 if int(to_numpy(t)) < 3 else bad
        return xp.where(t < 3, xp.asarray(0.1, dtype=t.dtype, device=backend.device),
                        xp.asarray(bad, dtype=t.dtype, device=backend.device))

    opt = adaptlr.adamw(schedule)
    params = [backend.asarray(np.ones(2))]
    state = opt.init(params)
    for _ in range(2):
        _, state = opt.update(params, state, params)
    with pytest.raises(error, match=match):
        opt.update(params, state, params)


def test_bad_schedule_at_init_names_step_1():
    with pytest.raises(ValueError, match=r"schedule returned -1\.0 at step 1"):
        adaptlr.sgd(lambda t: -1.0 + 0 * t).init([np.ones(2)])


def test_schedule_under_jit_is_not_checked_and_nan_propagates():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    opt = adaptlr.sgd(lambda t: jnp.where(t < 2, 0.1, jnp.nan))
    params = [jnp.ones(2)]
    state = opt.init(params)
    update = jax.jit(opt.update)
    updates, state = update(params, state, params)
    assert np.allclose(np.asarray(updates[0]), -0.1)
    updates, state = update(params, state, params)
    assert np.isnan(np.asarray(updates[0])).all()
    # ... and skip_nonfinite turns that into a skipped step.
    guarded = adaptlr.skip_nonfinite(adaptlr.sgd(lambda t: jnp.where(t < 2, 0.1, jnp.nan)))
    state = guarded.init(params)
    update = jax.jit(guarded.update)
    _, state = update(params, state, params)
    updates, state = update(params, state, params)
    assert np.array_equal(np.asarray(updates[0]), [0.0, 0.0]) and int(state.adaptations[-1].skipped) == 1


def test_torch_adapter_checks_schedule_values_naming_the_step():
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    p = torch.nn.Parameter(torch.ones(2, dtype=torch.float64))
    opt = Optimizer([p], adaptlr.sgd(lambda t: 0.1 if float(t) < 3 else float("nan")))
    for _ in range(2):
        p.grad = torch.ones(2, dtype=torch.float64)
        opt.step()
    p.grad = torch.ones(2, dtype=torch.float64)
    with pytest.raises(ValueError, match="step 3"):
        opt.step()
