"""``adaptlr.backends.jax.to_optax(opt)``: any adaptlr optimizer as an ``optax.GradientTransformation``.

::

    tx = adaptlr.backends.jax.to_optax(adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=S))
    opt_state = tx.init(params)
    updates, opt_state = tx.update(grads, opt_state, params)   # params are required
    params = optax.apply_updates(params, updates)

The params are flattened with ``jax.tree_util`` (so flax ``FrozenDict`` and any registered pytree
work) and the adaptlr optimizer runs on the list of leaves: the optax state is the
:class:`adaptlr.OptimizerState` for that list (a pytree of NamedTuples, lists and arrays), which
:func:`adaptlr.learning_rates`, :func:`adaptlr.lr_summary` and :func:`adaptlr.save_state` accept
directly; load it back with ``adaptlr.load_state(path, like=jax.tree_util.tree_leaves(params))``.
Updates keep each parameter's dtype; under ``jax.jit`` the step compiles once, and elementwise
state keeps the sharding of sharded parameters.

The learning rate is the wrapped optimizer's: a float or a schedule ``t ↦ α_t`` with ``t = 1`` on
the first update (an optax schedule counts from 0: pass ``lambda t: schedule(t - 1)`` to match).
Do not chain ``optax.scale_by_learning_rate`` after it: the adaptlr update already includes ``-α``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptlr import core
from adaptlr._state_tree import from_slots, rebuild_state, slots, split_state
from adaptlr._tree import Layout

__all__ = ["to_optax"]


def to_optax(opt: core.Optimizer) -> optax.GradientTransformationExtraArgs:
    """``opt`` as an optax gradient transformation (``update`` needs ``params``; extra args are ignored).

    Args:
        opt: an adaptlr optimizer (``adaptlr.adamw(1e-3)``, ``adaptlr.autodrop(...)``, ...).
    """
    if not isinstance(opt, core.Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")

    def init(params: Any) -> core.OptimizerState:
        leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(params)]
        if len(_devices(leaves)) <= 1:  # one device, or traced (jit, eval_shape, vmap, grad): no placement
            return opt.init(leaves)
        # Sharded params: build the state in one jitted call, then give per-parameter arrays their
        # parameter's sharding and everything else a replicated one (what the jitted step returns).
        state = jax.jit(opt.init)(leaves)
        return _place(state, leaves)

    def update(updates: Any, state: core.OptimizerState, params: Any = None, **extra_args: Any) -> tuple:
        del extra_args
        if params is None:
            raise ValueError(f"{opt.name} needs the params: call update(grads, state, params)")
        param_leaves, treedef = jax.tree_util.tree_flatten(params)
        grad_leaves = treedef.flatten_up_to(updates)
        new_leaves, new_state = opt.update(list(grad_leaves), state, list(param_leaves))
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _like_param(a: Any, p: Any, replicated: Any) -> Any:
    """The sharding the jitted step gives a per-parameter array ``a`` of parameter ``p``.

    ``p``'s own where the shapes match; for a reduced array such as DSA's row factor (shape
    ``(m, 1)`` of an ``(m, n)`` parameter), ``p``'s partitioning on the axes they share and none on
    the reduced ones (XLA keeps a row sum of row-sharded rows row-sharded); else replicated.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    if a.shape == p.shape:
        return p.sharding
    if not isinstance(p.sharding, NamedSharding) or a.ndim != p.ndim:
        return replicated
    spec = tuple(p.sharding.spec) + (None,) * (p.ndim - len(p.sharding.spec))
    kept = [axis if size == full else None for axis, size, full in zip(spec, a.shape, p.shape)]
    while kept and kept[-1] is None:  # P("d", None) and P("d") are equal but jit caches them apart
        kept.pop()
    return NamedSharding(p.sharding.mesh, PartitionSpec(*kept))


def _devices(leaves: list) -> set:
    """The devices the leaves live on (empty for traced values, which have no sharding to ask)."""
    try:
        return {d for x in leaves for d in x.sharding.device_set}
    except AttributeError:
        return set()


def _place(state: core.OptimizerState, leaves: list) -> core.OptimizerState:
    """``state`` with arrays shaped like their parameter sharded like it and the rest replicated."""
    from jax.sharding import NamedSharding, PartitionSpec

    meshes = [x.sharding.mesh for x in leaves if isinstance(x.sharding, NamedSharding)]
    if meshes:
        replicated = NamedSharding(meshes[0], PartitionSpec())
    else:
        devices = sorted({d for x in leaves for d in x.sharding.device_set}, key=lambda d: d.id)
        replicated = NamedSharding(jax.sharding.Mesh(np.array(devices), ("devices",)), PartitionSpec())
    layout, _ = Layout.of(leaves)
    skeleton, fields = split_state(state, layout.treespec)
    values = []
    for field in fields:
        if field.per_param:
            placed = [
                jax.tree_util.tree_map(lambda a, p=p: jax.device_put(a, _like_param(a, p, replicated)), slot)
                for slot, p in zip(slots(field.value, layout.treespec), leaves)
            ]
            values.append(from_slots(placed, layout.treespec))
        else:
            values.append(jax.device_put(field.value, replicated))
    return rebuild_state(skeleton, values)
