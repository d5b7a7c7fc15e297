"""The functional API (issue 2): schedules, jit, clear errors.

Pytrees, dtype/device preservation and purity are checked for every algorithm by tests/test_properties.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import max_rel_err

import adaptlr

FACTORIES = {
    "sgd": lambda lr=0.1: adaptlr.sgd(lr, momentum=0.9),
    "adam": lambda lr=0.1: adaptlr.adam(lr),
    "adamw": lambda lr=0.1: adaptlr.adamw(lr),
    "radam": lambda lr=0.1: adaptlr.radam(lr),
    "adabelief": lambda lr=0.1: adaptlr.adabelief(lr),
}


def test_schedule_scales_the_step(backend):
    """A schedule of t (t = 1 on the first update) gives α_t; the SGD step is exactly -α_t·g."""
    opt = adaptlr.sgd(lambda t: 0.5 / t)
    params = [backend.asarray(np.ones(3))]
    state = opt.init(params)
    np.testing.assert_allclose(backend.to_numpy(adaptlr.learning_rates(state)[0]), 0.5)
    for t in range(1, 5):
        updates, state = opt.update([backend.asarray(np.ones(3))], state, params)
        np.testing.assert_allclose(backend.to_numpy(updates[0]), -0.5 / t, rtol=1e-15)
        np.testing.assert_allclose(backend.to_numpy(adaptlr.learning_rates(state)[0]), 0.5 / t, rtol=1e-15)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_jit_matches_eager(name):
    jax = pytest.importorskip("jax", reason="jax.jit")
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    opt = FACTORIES[name](lambda t: 0.1 / jnp.sqrt(t))
    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "b": jnp.asarray(rng.normal(size=3))}
    state_eager = state_jit = opt.init(params)
    params_eager = params_jit = params
    update = jax.jit(opt.update)
    sizes = []
    for _ in range(8):
        grads_eager = jax.tree_util.tree_map(lambda p: jnp.sin(p) + p, params_eager)
        grads_jit = jax.tree_util.tree_map(lambda p: jnp.sin(p) + p, params_jit)
        u, state_eager = opt.update(grads_eager, state_eager, params_eager)
        params_eager = adaptlr.apply_updates(params_eager, u)
        u, state_jit = update(grads_jit, state_jit, params_jit)
        params_jit = adaptlr.apply_updates(params_jit, u)
        sizes.append(update._cache_size())
    for key in params:
        assert max_rel_err(np.asarray(params_jit[key]), np.asarray(params_eager[key])) <= 1e-14
    # JAX may compile once more when the inputs turn from uncommitted to committed arrays; after
    # that the state structure and dtypes are stable, so nothing recompiles.
    assert sizes[-1] == sizes[2] <= 2, sizes


# -- errors ------------------------------------------------------------------------------------


def test_error_grads_structure_names_the_leaf():
    opt = adaptlr.adam()
    params = {"a": np.ones(2), "b": np.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"missing leaf \['b'\]"):
        opt.update({"a": np.ones(2), "c": np.ones(3)}, state, params)


def test_error_grads_shape_and_dtype_name_the_leaf():
    opt = adaptlr.adam()
    params = {"a": np.ones(2), "b": np.ones(3)}
    state = opt.init(params)
    with pytest.raises(ValueError, match=r"\['b'\] has shape \(4,\)"):
        opt.update({"a": np.ones(2), "b": np.ones(4)}, state, params)
    with pytest.raises(TypeError, match=r"\['b'\] has dtype float32"):
        opt.update({"a": np.ones(2), "b": np.ones(3, dtype=np.float32)}, state, params)


def test_error_mixed_libraries():
    torch = pytest.importorskip("torch")
    opt = adaptlr.sgd(0.1)
    with pytest.raises(TypeError, match=r"mix array libraries.*\['b'\] is a torch"):
        opt.init({"a": np.ones(2), "b": torch.ones(2, dtype=torch.float64)})


def test_error_mixed_devices():
    strict = pytest.importorskip("array_api_strict")
    opt = adaptlr.sgd(0.1)
    params = [strict.ones(2), strict.ones(2, device=strict.Device("device1"))]
    with pytest.raises(ValueError, match=r"different devices.*\[1\]"):
        opt.init(params)


def test_error_wrong_state():
    params = {"a": np.ones(2)}
    with pytest.raises(ValueError, match="state does not belong"):
        adaptlr.adam().update(params, adaptlr.adabelief().init(params), params)
    with pytest.raises(ValueError, match="state does not belong to these params"):
        adaptlr.adam().update(params, adaptlr.adam().init({"b": np.ones(2)}), params)
    with pytest.raises(TypeError, match="OptimizerState"):
        adaptlr.adam().update(params, {"count": 0}, params)


def test_error_integer_params():
    with pytest.raises(TypeError, match=r"parameter \['n'\] has dtype int64"):
        adaptlr.sgd(0.1).init({"n": np.arange(3)})


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: adaptlr.sgd(-0.1), "learning_rate must be >= 0"),
        (lambda: adaptlr.sgd(float("nan")), "learning_rate must be finite"),
        (lambda: adaptlr.adam(b1=1.0), r"b1 must be in \[0.0, 1.0\)"),
        (lambda: adaptlr.adam(b2=-0.1), r"b2 must be in \[0.0, 1.0\)"),
        (lambda: adaptlr.adam(eps=-1e-8), "eps must be >= 0"),
        (lambda: adaptlr.adamw(weight_decay=-1.0), "weight_decay must be >= 0"),
        (lambda: adaptlr.radam(weight_decay=float("inf")), "weight_decay must be finite"),
        (lambda: adaptlr.sgd(0.1, momentum=1.5), r"momentum must be in \[0.0, 1.0\)"),
        (lambda: adaptlr.sgd(0.1, nesterov=True), "nesterov momentum needs momentum > 0"),
        (lambda: adaptlr.adabelief(eps="x"), "eps must be a real number"),
    ],
)
def test_error_bad_hyper_parameters(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()


def test_error_no_arrays():
    with pytest.raises(ValueError, match="no arrays"):
        adaptlr.adam().init({})
    with pytest.raises(TypeError, match="not an array"):
        adaptlr.adam().init([1.0, 2.0])


_SHARDED_SCRIPT = """
import jax, jax.numpy as jnp, numpy as np, adaptlr
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
mesh = Mesh(np.array(jax.devices()), ("x",))
sharding = NamedSharding(mesh, P("x", None))
w = jax.device_put(jnp.ones((8, 4)), sharding)
opts = [adaptlr.adamw(0.1), adaptlr.active_adamw(0.1, steps_per_epoch=2),
        adaptlr.autodrop(adaptlr.sgd(0.1), steps_per_epoch=2), adaptlr.hypergradient(adaptlr.sgd(0.1), 0.1),
        adaptlr.dsa(adaptlr.adam(0.1)), adaptlr.eg_step_size(adaptlr.sgd(0.1), 0.1, 0.1)]
for opt in opts:
    state = opt.init({"w": w})
    for _ in range(3):
        updates, state = jax.jit(opt.update)({"w": w * 0.5}, state, {"w": w})
    assert updates["w"].sharding == sharding, (opt.name, updates["w"].sharding)
    assert np.isfinite(np.asarray(updates["w"])).all()
print("sharded ok", len(opts))
"""


def test_functional_api_on_params_sharded_over_four_devices():
    """0-D state values of sharded params get JAX's default placement; updates keep the sharding."""
    pytest.importorskip("jax")
    import os
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SHARDED_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sharded ok 6" in result.stdout
