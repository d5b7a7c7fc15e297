"""adaptlr.backends.jax.to_optax: optax loops, jit without recompilation, dtypes, sharding."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import adaptlr

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from adaptlr.backends.jax import to_optax  # noqa: E402
from tests.conftest import max_rel_err  # noqa: E402


def _optimizers():
    return [
        adaptlr.adamw(1e-2, weight_decay=0.1),
        adaptlr.sgd(0.05, momentum=0.9),
        adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5),
        adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2, theta=30.0, theta_max=90.0,
                         patience_epochs=1),
        adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3),
    ]


def _loss(params, x):
    return jnp.sum((params["w"] @ x + params["b"]) ** 2) + jnp.sum(params["nested"][0] ** 2)


def _params(dtype=jnp.float64):
    rng = np.random.default_rng(0)
    tree = {"w": rng.normal(size=(3, 4)), "b": rng.normal(size=3), "nested": (rng.normal(size=(2,)),)}
    return jax.device_put(jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=dtype), tree), jax.devices()[0])


@pytest.mark.parametrize("opt", _optimizers(), ids=lambda o: o.name)
def test_optax_loop_matches_functional_api_and_compiles_once(opt):
    tx = to_optax(opt)
    params = _params()
    state = tx.init(params)
    xs = np.random.default_rng(1).normal(size=(8, 4))

    @jax.jit
    def train_step(params, state, x):
        grads = jax.grad(_loss)(params, x)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    leaves, treedef = jax.tree_util.tree_flatten(_params())
    ref_leaves = [np.asarray(x) for x in leaves]
    ref_state = opt.init(ref_leaves)
    for x in xs:
        params, state = train_step(params, state, jnp.asarray(x))
        grads = jax.tree_util.tree_leaves(jax.grad(_loss)(treedef.unflatten([jnp.asarray(a) for a in ref_leaves]),
                                                          jnp.asarray(x)))
        updates, ref_state = opt.update([np.asarray(g) for g in grads], ref_state, ref_leaves)
        ref_leaves = adaptlr.apply_updates(ref_leaves, updates)
    assert train_step._cache_size() == 1
    assert max_rel_err([np.asarray(a) for a in jax.tree_util.tree_leaves(params)], ref_leaves) <= 1e-12
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(tx.init(params))


def test_flax_style_frozen_tree_and_extra_args():
    flax_core = pytest.importorskip("flax.core", reason="flax is not installed")
    params = flax_core.freeze({"dense": {"kernel": jnp.ones((2, 2)), "bias": jnp.zeros(2)}})
    tx = optax.chain(optax.clip_by_global_norm(1.0), to_optax(adaptlr.adam(0.1)))
    state = tx.init(params)
    updates, state = tx.update(jax.tree_util.tree_map(jnp.ones_like, params), state, params, extra=1)
    assert jax.tree_util.tree_structure(updates) == jax.tree_util.tree_structure(params)


def test_chain_with_extra_args_and_params_required():
    params = {"a": jnp.ones(3)}
    tx = optax.chain(optax.clip_by_global_norm(1.0), to_optax(adaptlr.adam(0.1)))
    state = tx.init(params)
    updates, state = tx.update({"a": jnp.ones(3)}, state, params)
    assert set(updates) == {"a"}
    with pytest.raises(ValueError, match="needs the params"):
        to_optax(adaptlr.adam(0.1)).update({"a": jnp.ones(3)}, to_optax(adaptlr.adam(0.1)).init(params))
    with pytest.raises(TypeError, match="adaptlr Optimizer"):
        to_optax(optax.adam(0.1))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes_preserved(dtype):
    tx = to_optax(adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2))
    params = _params(dtype)
    state = tx.init(params)
    step = jax.jit(lambda p, s: tx.update(jax.tree_util.tree_map(lambda x: x * 0.5 + 1, p), s, p))
    for _ in range(3):
        updates, state = step(params, state)
        params = optax.apply_updates(params, updates)
    assert all(u.dtype == dtype for u in jax.tree_util.tree_leaves(updates))
    assert all(p.dtype == dtype for p in jax.tree_util.tree_leaves(params))
    assert all(s.dtype == dtype for s in jax.tree_util.tree_leaves(state.base))
    assert step._cache_size() == 1


_SHARDING_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np, optax, adaptlr
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from adaptlr.backends.jax import to_optax
    assert len(jax.devices()) == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("d",))
    row = NamedSharding(mesh, P("d"))
    params = {"w": jax.device_put(jnp.ones((8, 3)), row), "b": jax.device_put(jnp.arange(8.0), row)}
    tx = to_optax(adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2))
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.tree_util.tree_map(lambda p: jnp.sin(p) + 0.1, params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), updates, state

    for _ in range(3):
        params, updates, state = step(params, state)
    for tree in (params, updates, state.base.mu, state.adaptations[0].gamma):
        for leaf in jax.tree_util.tree_leaves(tree):
            assert leaf.sharding.is_equivalent_to(row, leaf.ndim), (leaf.shape, leaf.sharding)
    assert step._cache_size() == 1

    # one compilation for every algorithm, DSA's row and column factors included
    makers = [lambda: adaptlr.dsa(adaptlr.adam(1e-2)), lambda: adaptlr.autodrop(adaptlr.sgd(0.1), steps_per_epoch=2),
              lambda: adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-4, granularity="tensor"),
              lambda: adaptlr.eg_step_size(adaptlr.sgd(1e-2, momentum=0.9), 0.05, 0.05)]
    for make in makers:
        tx = to_optax(make())
        params = {"w": jax.device_put(jnp.ones((8, 3)), row), "b": jax.device_put(jnp.arange(8.0), row)}
        state = tx.init(params)
        step = jax.jit(lambda p, s, tx=tx: tx.update(jax.tree_util.tree_map(lambda x: jnp.sin(x) + 0.1, p), s, p))
        for _ in range(3):
            updates, state = step(params, state)
            params = optax.apply_updates(params, updates)
        assert step._cache_size() == 1, (make().name, step._cache_size())

    # the learning-rate-free bases' global sums under NamedSharding equal the unsharded run (float32:
    # XLA may reassociate the sums, so within the tolerance rule for 10 float32 steps)
    from adaptlr.conformance.tolerances import tolerance
    for make in [lambda: adaptlr.prodigy(), lambda: adaptlr.dog(), lambda: adaptlr.dowg(),
                 lambda: adaptlr.dadapt_adam(), lambda: adaptlr.dadapt_sgd(momentum=0.9)]:
        runs = []
        for place in (lambda x: jax.device_put(x, row), lambda x: x):
            tx = to_optax(make())
            params = {"w": place(jnp.linspace(-1.0, 1.0, 24).reshape(8, 3)), "b": place(jnp.arange(8.0) / 8)}
            state = tx.init(params)
            step = jax.jit(lambda p, s, tx=tx: tx.update(jax.tree_util.tree_map(lambda x: jnp.sin(3 * x) + 0.1, p),
                                                         s, p))
            for _ in range(10):
                updates, state = step(params, state)
                params = optax.apply_updates(params, updates)
            runs.append(params)
        for a, b in zip(jax.tree_util.tree_leaves(runs[0]), jax.tree_util.tree_leaves(runs[1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=tolerance("float32", 10), atol=0)
        assert runs[0]["w"].sharding.is_equivalent_to(row, 2)
    print("SHARDING-OK")
""")


def test_sharding_preserved_on_four_host_devices():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, "-c", _SHARDING_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=120)
    assert "SHARDING-OK" in result.stdout, result.stderr[-3000:]
