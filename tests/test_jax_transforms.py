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


def test_flax_nnx_optimizer_under_nnx_jit_eval_shape_and_donation():
    nnx = pytest.importorskip("flax.nnx", reason="flax is not installed")
    tx = to_optax(adaptlr.hypergradient(adaptlr.adam(1e-2), hyper_lr=1e-4))

    @nnx.jit
    def create():
        model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = create()  # init under nnx.jit
    abstract = nnx.eval_shape(lambda: nnx.Optimizer(nnx.Linear(3, 2, rngs=nnx.Rngs(0)), tx, wrt=nnx.Param))
    assert _shapes(nnx.state(abstract)) == _shapes(nnx.state(optimizer))

    @nnx.jit(donate_argnums=(0, 1))
    def train_step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(model)
        optimizer.update(model, grads)

    x = jnp.ones((4, 3))
    for _ in range(3):
        train_step(model, optimizer, x)
    assert int(optimizer.opt_state.count) == 3


def test_linen_train_state_created_under_jit_and_donated():
    pytest.importorskip("flax.linen", reason="flax is not installed")
    import flax.linen as nn
    from flax.training import train_state

    model = nn.Dense(2)
    x = jnp.ones((4, 3))
    tx = to_optax(adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2))
    state = jax.jit(lambda key: train_state.TrainState.create(
        apply_fn=model.apply, params=model.init(key, x)["params"], tx=tx))(jax.random.key(0))

    @jax.jit
    def loss_grad(state):
        return jax.grad(lambda p: jnp.sum(state.apply_fn({"params": p}, x) ** 2))(state.params)

    step = jax.jit(lambda state: state.apply_gradients(grads=loss_grad(state)), donate_argnums=0)
    for _ in range(3):
        state = step(state)
    assert int(state.step) == 3 and step._cache_size() == 1
