"""Precision: step scalars in the widest float, low-precision params against torch.optim, the counter.

The yardstick for a dtype is the reference library's own distance from its float64 run on the same
problem (:mod:`adaptlr.conformance.precision`): adaptlr in that dtype must be no further than twice
that distance from adaptlr's float64 run, over 200 steps.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import optree
import pytest

import adaptlr
from adaptlr._precision import INT32_MAX, counter_dtype, widest_float
from adaptlr._rectification import rectification_condition
from adaptlr.conformance import precision
from adaptlr.conformance.backends import BACKENDS

torch = pytest.importorskip("torch", reason="the reference optimizers are torch.optim")

STEPS = 200


def _backend(name: str):
    b = BACKENDS[name]
    reason = b.unavailable_reason()
    if reason:
        pytest.skip(f"backend {name}: {reason}")
    return b


@functools.cache
def _reference(base: str, dtype: str) -> float:
    if base == "adabelief":
        pytest.importorskip("adabelief_pytorch", reason="adabelief-pytorch==0.2.1 is the oracle")
    return precision.reference_distance(base, dtype, STEPS)


@functools.cache
def _exact(name: str) -> tuple:
    return tuple(precision.run_adaptlr(_MAKERS[name](adaptlr), BACKENDS["numpy"], "float64", STEPS))


_WRAPPERS = {
    "active(adamw)": ("adamw", lambda a, **kw: a.active(precision.BASES["adamw"](a, **kw), steps_per_epoch=10)),
    "autodrop(sgdm)": ("sgdm", lambda a, **kw: a.autodrop(precision.BASES["sgdm"](a, **kw), steps_per_epoch=10)),
    "hypergradient(adam)": ("adam", lambda a, **kw: a.hypergradient(precision.BASES["adam"](a, **kw), hyper_lr=1e-4)),
    "dsa(adam)": ("adam", lambda a, **kw: a.dsa(precision.BASES["adam"](a, **kw), hyper_lr=0.02)),
    "eg(adam)": ("adam", lambda a, **kw: a.eg_step_size(precision.BASES["adam"](a, **kw), scale_lr=0.05,
                                                         gain_lr=0.05, max_log_step=0.1)),
}
_MAKERS = {**precision.BASES, **{name: make for name, (_, make) in _WRAPPERS.items()}}
_BASE_OF = {**{name: name for name in precision.BASES}, **{name: base for name, (base, _) in _WRAPPERS.items()}}

# (dtype, backend): NumPy and array-api-strict have no bfloat16; JAX's eager steps are slow, so it
# runs the dtype it is used with most.
_DTYPE_BACKENDS = [("float32", "numpy"), ("float32", "torch"), ("float32", "jax"), ("bfloat16", "torch"),
                   ("bfloat16", "jax"), ("float16", "numpy"), ("float16", "torch")]


@pytest.mark.parametrize(("dtype", "backend_name"), _DTYPE_BACKENDS)
@pytest.mark.parametrize("name", list(precision.BASES))
def test_base_in_low_precision_within_twice_the_reference_distance(name, dtype, backend_name):
    b = _backend(backend_name)
    ours = precision.distance(precision.run_adaptlr(_MAKERS[name](adaptlr), b, dtype, STEPS), list(_exact(name)))
    reference = _reference(name, dtype)
    assert ours <= 2 * reference, f"{name} {dtype} on {backend_name}: {ours:.3e} vs reference {reference:.3e}"


@pytest.mark.parametrize(("dtype", "backend_name"), [("bfloat16", "torch"), ("bfloat16", "jax"), ("float16", "torch")])
@pytest.mark.parametrize("name", list(_WRAPPERS))
def test_adaptation_in_low_precision_within_twice_the_base_reference_distance(name, dtype, backend_name):
    b = _backend(backend_name)
    ours = precision.distance(precision.run_adaptlr(_MAKERS[name](adaptlr), b, dtype, STEPS), list(_exact(name)))
    reference = _reference(_BASE_OF[name], dtype)
    assert ours <= 2 * reference, f"{name} {dtype} on {backend_name}: {ours:.3e} vs reference {reference:.3e}"


@pytest.mark.parametrize("backend_name", ["numpy", "torch"])
@pytest.mark.parametrize("name", list(_MAKERS))
def test_float16_params_with_float32_state_stay_finite_and_close(name, backend_name):
    b = _backend(backend_name)
    opt = _MAKERS[name](adaptlr, state_dtype="float32")
    ours = precision.distance(precision.run_adaptlr(opt, b, "float16", STEPS), list(_exact(name)))
    assert math.isfinite(ours)
    assert ours <= 2 * _reference(_BASE_OF[name], "float16")


@pytest.mark.parametrize("backend_name", ["torch", "jax"])
@pytest.mark.parametrize("make", [adaptlr.adam, adaptlr.adamw, adaptlr.radam, adaptlr.adabelief])
def test_bfloat16_first_step_has_full_size(make, backend_name):
    """Adam's first step is ``-α·g/(|g| + ε/sqrt(1-β2))``: in bfloat16, 1 - 0.999 rounds to 0 unless the
    bias corrections are computed wider (it moved nothing before). RAdam and AdaBelief take an
    SGD-momentum first step ``-α·g``."""
    b = _backend(backend_name)
    xp = b.xp
    params = [xp.astype(b.asarray(np.array([1.0, -2.0, 3.0]), "float32"), xp.bfloat16)]
    grads = [xp.astype(b.asarray(np.array([0.5, -0.25, 2.0]), "float32"), xp.bfloat16)]
    opt = make(0.125, weight_decay=0.0)
    updates, _ = opt.update(grads, opt.init(params), params)
    got = b.to_numpy(xp.astype(updates[0], xp.float32))
    expected = -0.125 * np.array([0.5, -0.25, 2.0]) if make in (adaptlr.radam, adaptlr.adabelief) else \
        -0.125 * np.sign([0.5, -0.25, 2.0])
    np.testing.assert_allclose(got, expected, rtol=2**-7)


@pytest.mark.parametrize("backend_name", ["numpy", "torch", "jax"])
def test_state_dtype_float32_rounds_the_bfloat16_or_float16_param_once(backend_name):
    b = _backend(backend_name)
    xp = b.xp
    low = "bfloat16" if backend_name != "numpy" else "float16"
    rng = np.random.default_rng(3)
    p0, g = rng.normal(size=50), rng.normal(size=50)
    params = [xp.astype(b.asarray(p0, "float32"), getattr(xp, low))]
    grads = [xp.astype(b.asarray(g, "float32"), getattr(xp, low))]
    opt = adaptlr.sgd(1e-3, momentum=0.9, state_dtype="float32")
    state = opt.init(params)
    assert state.base.momentum_buffer[0].dtype == xp.float32 and state.learning_rate[0].dtype == xp.float32
    updates, state = opt.update(grads, state, params)
    assert updates[0].dtype == params[0].dtype
    new = adaptlr.apply_updates(params, updates)[0]
    p32, g32 = xp.astype(params[0], xp.float32), xp.astype(grads[0], xp.float32)
    expected = xp.astype(p32 - xp.asarray(1e-3, dtype=xp.float32) * g32, getattr(xp, low))  # one rounding
    assert np.array_equal(b.to_numpy(xp.astype(new, xp.float32)), b.to_numpy(xp.astype(expected, xp.float32)))
    with pytest.raises(ValueError, match="state dtype"):
        adaptlr.sgd(1e-3, momentum=0.9).update(grads, state, params)


def test_state_dtype_is_validated():
    with pytest.raises(ValueError, match="state_dtype"):
        adaptlr.adam(state_dtype="int32")
    assert adaptlr.active(adaptlr.adamw(state_dtype=np.float32), steps_per_epoch=2).state_dtype == "float32"


@pytest.mark.parametrize("backend_name", ["numpy", "array_api_strict", "torch", "jax"])
def test_counter_is_int64_and_steps_past_two_to_the_31(backend_name):
    b = _backend(backend_name)
    xp = b.xp
    params = [b.asarray(np.array([1.0, -1.0]))]
    opt = adaptlr.adam(0.1, eps=0.0)
    state = opt.init(params)
    assert state.count.dtype == xp.int64 == counter_dtype(xp, None)
    state = state._replace(count=xp.asarray(INT32_MAX - 1, dtype=xp.int64, device=b.device))
    for _ in range(3):
        updates, state = opt.update([b.asarray(np.array([2.0, -3.0]))], state, params)
    assert int(state.count) == INT32_MAX + 2
    # at t ~ 2**31 both bias corrections are 1: m = 0.271·g, v = 0.002997·g², step -α·m/sqrt(v)
    m, v = (1 - 0.9**3) * np.array([2.0, -3.0]), (1 - 0.999**3) * np.array([4.0, 9.0])
    np.testing.assert_allclose(b.to_numpy(updates[0]), -0.1 * m / np.sqrt(v), rtol=1e-12)


def test_int32_counter_at_its_limit_raises_in_eager_mode():
    params = [np.ones(2)]
    opt = adaptlr.sgd(0.1)
    state = opt.init(params)._replace(count=np.asarray(INT32_MAX, dtype=np.int32))
    with pytest.raises(OverflowError, match="int32 step counter"):
        opt.update([np.ones(2)], state, params)


def test_int32_counter_saturates_under_jit():
    """JAX without x64 keeps an int32 counter; under jit its value is unknown, so it saturates."""
    b = _backend("jax")
    import jax
    import jax.numpy as jnp

    params = [b.asarray(np.array([1.0, -1.0]))]
    opt = adaptlr.adam(0.1, eps=0.0)
    state = opt.init(params)._replace(count=jnp.asarray(INT32_MAX - 1, dtype=jnp.int32))
    step = jax.jit(opt.update)
    for _ in range(3):
        updates, state = step([b.asarray(np.array([2.0, -3.0]))], state, params)
    assert state.count.dtype == jnp.int32 and int(state.count) == INT32_MAX
    assert np.all(np.isfinite(np.asarray(updates[0])))


def test_widest_float():
    assert widest_float(BACKENDS["numpy"].xp, None) == np.float64
    assert widest_float(torch, "cpu") == torch.float64


def test_rectification_condition_matches_a_finite_difference():
    """κ = max_t |∂ log r_t / ∂ log β2^t| against a central difference of r_t in float64."""
    b2 = 0.999
    rho_inf = 2 / (1 - b2) - 1

    def log_r(t: int, scale: float) -> float:
        b = b2**t * scale
        rho = rho_inf - 2 * t * b / (1 - b)
        return 0.5 * math.log((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))

    h = 1e-9
    numeric = max(abs(log_r(t, 1 + h) - log_r(t, 1 - h)) / (2 * h) for t in range(6, 200))
    assert rectification_condition(b2) == pytest.approx(numeric, rel=1e-4)
    assert adaptlr.radam().scalar_condition == rectification_condition(b2)
    assert adaptlr.adabelief(rectify=False).scalar_condition == pytest.approx(0.5 * 0.999 / 0.001)


NAMED_FACTORIES = {
    "sgd": lambda **kw: adaptlr.sgd(0.1, momentum=0.9, **kw),
    "adam": lambda **kw: adaptlr.adam(**kw),
    "adamw": lambda **kw: adaptlr.adamw(**kw),
    "radam": lambda **kw: adaptlr.radam(**kw),
    "adabelief": lambda **kw: adaptlr.adabelief(**kw),
    "active_sgd": lambda **kw: adaptlr.active_sgd(0.1, momentum=0.9, steps_per_epoch=2, **kw),
    "active_adamw": lambda **kw: adaptlr.active_adamw(steps_per_epoch=2, **kw),
    "active_radam": lambda **kw: adaptlr.active_radam(steps_per_epoch=2, **kw),
    "active_adabelief": lambda **kw: adaptlr.active_adabelief(steps_per_epoch=2, **kw),
    "sgd_hd": lambda **kw: adaptlr.sgd_hd(0.1, hyper_lr=1e-3, momentum=0.9, **kw),
    "sgdn_hd": lambda **kw: adaptlr.sgdn_hd(0.1, hyper_lr=1e-3, **kw),
    "adam_hd": lambda **kw: adaptlr.adam_hd(hyper_lr=1e-3, **kw),
}


@pytest.mark.parametrize("name", list(NAMED_FACTORIES))
def test_every_factory_takes_state_dtype(name):
    opt = NAMED_FACTORIES[name](state_dtype="float32")
    params = [np.ones((2, 3), dtype=np.float16)]
    state = opt.init(params)
    floats = [x for x in optree.tree_leaves((adaptlr.learning_rates(state), state.base)) if x.dtype.kind == "f"]
    assert floats and all(x.dtype == np.float32 for x in floats)
    updates, state = opt.update([np.full((2, 3), 0.5, dtype=np.float16)], state, params)
    assert updates[0].dtype == np.float16 and np.all(np.isfinite(updates[0]))
