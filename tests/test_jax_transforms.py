"""JAX: ``init`` under transformations, donation of a fresh state, one compilation per step."""

from __future__ import annotations

import numpy as np
import pytest

import adaptlr

jax = pytest.importorskip("jax", reason="JAX is not installed")
jnp = jax.numpy
optax = pytest.importorskip("optax", reason="optax is not installed")
from adaptlr.backends.jax import to_optax  # noqa: E402

MAKERS = {
    "adamw": lambda: adaptlr.adamw(1e-2),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2),
    "autodrop(sgdm)": lambda: adaptlr.autodrop(adaptlr.sgd(0.1, momentum=0.9), steps_per_epoch=2),
    "hd-tensor(adam)": lambda: adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-4, granularity="tensor"),
    "hd-global(sgd)": lambda: adaptlr.hypergradient(adaptlr.sgd(1e-2), hyper_lr=1e-4),
    "dsa(adam)": lambda: adaptlr.dsa(adaptlr.adam(1e-2), min_lr=1e-5, max_lr=1.0),
    "eg-tensor(sgdm)": lambda: adaptlr.eg_step_size(adaptlr.sgd(1e-2, momentum=0.9), 0.05, 0.05,
                                                          scale="tensor"),
    "schedule(radam)": lambda: adaptlr.radam(lambda t: 1e-2 / (1.0 + 0.1 * t)),
}


def _params():
    return {"w": jnp.asarray(np.linspace(-1.0, 1.0, 12).reshape(3, 4)), "b": jnp.asarray(np.array([0.5, -0.5]))}


def _loss(params):
    return jnp.sum(params["w"] ** 2) + jnp.sum(jnp.cos(params["b"]))


def _shapes(tree):
    return jax.tree_util.tree_map(lambda x: (x.shape, x.dtype), tree)


@pytest.mark.parametrize("name", list(MAKERS))
def test_init_under_jit_eval_shape_vmap_and_grad(name):
    opt = MAKERS[name]()
    params = _params()
    for init in (opt.init, to_optax(opt).init):
        eager = init(params)
        assert _shapes(jax.jit(init)(params)) == _shapes(eager)
        assert _shapes(jax.eval_shape(init, params)) == _shapes(jax.tree_util.tree_map(jnp.asarray, eager))
        batched = jax.vmap(init)(jax.tree_util.tree_map(lambda x: jnp.stack([x, 2 * x]), params))
        assert jax.tree_util.tree_leaves(batched)[0].shape[0] == 2
        # grad through init: the state's moments are zeros, so d/dθ Σ(state) = 0 and the loss term remains
        g = jax.grad(lambda p, init=init: sum(jnp.sum(x) for x in jax.tree_util.tree_leaves(init(p))
                                              if jnp.issubdtype(x.dtype, jnp.floating)) * 0.0 + _loss(p))(params)
        np.testing.assert_allclose(np.asarray(g["w"]), 2 * np.asarray(params["w"]))


@pytest.mark.parametrize("name", list(MAKERS))
def test_fresh_state_can_be_donated_and_the_step_compiles_once(name):
    opt = MAKERS[name]()
    tx = to_optax(opt)
    params = _params()  # ordinary uncommitted arrays, no device_put

    def train_step(params, state):
        updates, state = tx.update(jax.grad(_loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    step = jax.jit(train_step, donate_argnums=(0, 1))
    state = tx.init(params)
    leaves = [x for x in jax.tree_util.tree_leaves(state) if hasattr(x, "unsafe_buffer_pointer")]
    pointers = [x.unsafe_buffer_pointer() for x in leaves]
    assert len(set(pointers)) == len(pointers), "state leaves share a buffer"
    reference_params, reference_state = _params(), tx.init(_params())
    for _ in range(5):
        params, state = step(params, state)
        reference_params, reference_state = train_step(reference_params, reference_state)
    assert step._cache_size() == 1
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(reference_params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12)
