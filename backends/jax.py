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

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from adaptlr import core
from adaptlr._state_tree import from_slots, rebuild_state, slots, split_state
from adaptlr._tree import Layout

__all__ = ["complete_sum", "state_partition_specs", "to_optax"]


def complete_sum(partial: Any, axis_names: tuple) -> Any:
    """The sum of ``partial`` over the devices of the mesh axes ``axis_names`` (inside ``shard_map``).

    Args:
        partial: this device's partial sum (an array or a tree of arrays).
        axis_names: the mesh axes the parameters are split over.

    Returns:
        ``jax.lax.psum(partial, axis_names)``: the complete sum, on every device.
    """
    return jax.lax.psum(partial, axis_names)


def to_optax(opt: core.Optimizer, *, axis_name: Any = None,
             partition_specs: Any = None) -> optax.GradientTransformationExtraArgs:
    """``opt`` as an optax gradient transformation (``update`` needs ``params``; extra args are ignored).

    Args:
        opt: an adaptlr optimizer (``adaptlr.adamw(1e-3)``, ``adaptlr.autodrop(...)``, ...).
        axis_name: inside ``jax.shard_map`` with split parameters, the mesh axis (or axes) over
            which the algorithm's sums over parameters are completed across the shards (see
            :meth:`adaptlr.Optimizer.update`).
        partition_specs: with ``axis_name``, the partition specs of the parameters (a tree like
            the params).
    """
    if not isinstance(opt, core.Optimizer):
        raise TypeError(f"opt must be an adaptlr Optimizer (adaptlr.adamw(...), ...), got {type(opt).__name__}")

    def init(params: Any) -> core.OptimizerState:
        leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(params)]
        devices = _devices(leaves)
        named = any(isinstance(x.sharding, jax.sharding.NamedSharding) for x in leaves) if devices else False
        if not devices or (len(devices) == 1 and not named):  # traced (jit, eval_shape, vmap, grad) or plain
            return opt.init(leaves)
        # Params on a mesh: build the state in one jitted call, then give per-parameter arrays their
        # parameter's sharding and everything else a replicated one (what the jitted step returns).
        state = jax.jit(opt.init)(leaves)
        return _place(state, leaves)

    def update(updates: Any, state: Any, params: Any = None, **extra_args: Any) -> tuple[Any, core.OptimizerState]:
        # state: the OptimizerState of init (typed as optax's OptState, which update_fn must accept)
        del extra_args
        if params is None:
            raise ValueError(f"{opt.name} needs the params: call update(grads, state, params)")
        param_leaves, treedef = jax.tree_util.tree_flatten(params)
        grad_leaves = treedef.flatten_up_to(updates)
        specs = None if partition_specs is None else list(treedef.flatten_up_to(partition_specs))
        new_leaves, new_state = opt.update(list(grad_leaves), state, list(param_leaves), axis_name=axis_name,
                                           partition_specs=specs)
        return jax.tree_util.tree_unflatten(treedef, new_leaves), new_state

    return optax.GradientTransformationExtraArgs(init, update)


def _like_param(a: Any, p: Any, replicated: Any) -> Any:
    """The sharding the jitted step gives a per-parameter array ``a`` of parameter ``p``.

    ``p``'s own where the shapes match; for a reduced array such as DSA's row factor (shape
    ``(m, 1)`` of an ``(m, n)`` parameter), ``p``'s partitioning on the axes they share and none on
    the reduced ones (XLA keeps a row sum of row-sharded rows row-sharded); else replicated.
    """
    from jax.sharding import NamedSharding

    if a.shape == p.shape:
        return p.sharding
    if not isinstance(p.sharding, NamedSharding):
        return replicated
    mesh = p.sharding.mesh
    return NamedSharding(mesh, _spec_like(a.shape, p.shape, p.sharding.spec, dict(mesh.shape)))


def _spec_like(shape: tuple, param_shape: tuple, param_spec: Any, axis_sizes: dict | None = None) -> Any:
    """``param_spec`` kept on the dimensions where ``shape`` matches ``param_shape``, None elsewhere.

    With ``axis_sizes`` (of the mesh), a reduced dimension also keeps its axes where their size
    divides it, as XLA does (a column sum of shape ``(1, n)`` stays "sharded" on a 1-device axis).
    """
    from jax.sharding import PartitionSpec

    if len(shape) != len(param_shape) or param_spec is None:
        return PartitionSpec()
    spec = tuple(param_spec) + (None,) * (len(param_shape) - len(param_spec))

    def keeps(axis: Any, size: int, full: int) -> bool:
        if size == full:
            return True
        names = (axis,) if isinstance(axis, str) else tuple(axis or ())
        return axis_sizes is not None and bool(names) and size % math.prod(axis_sizes[n] for n in names) == 0

    kept = [axis if keeps(axis, size, full) else None for axis, size, full in zip(spec, shape, param_shape)]
    while kept and kept[-1] is None:  # P("d", None) and P("d") are equal but jit caches them apart
        kept.pop()
    return PartitionSpec(*kept)


def state_partition_specs(state: core.OptimizerState, params: Any, param_specs: Any) -> Any:
    """Partition specs for ``state`` (of ``to_optax(opt).init(params)``) matching the params' specs.

    For ``jax.shard_map``'s ``in_specs``/``out_specs``: per-parameter arrays are split like their
    parameter (reduced ones, such as DSA's row and column factors, on the dimensions they keep),
    everything else (the step counter, learning rates, global scalars) is replicated.

    Args:
        state: the optax state of :func:`to_optax` (an :class:`adaptlr.OptimizerState`).
        params: the params it was made for (global shapes).
        param_specs: a tree like ``params`` of ``PartitionSpec`` (None: replicated).
    """
    from jax.sharding import PartitionSpec

    leaves, treedef = jax.tree_util.tree_flatten(params)
    specs = treedef.flatten_up_to(param_specs)
    layout, _ = Layout.of(leaves)
    skeleton, fields = split_state(state, layout.treespec)
    values = []
    for field in fields:
        if field.per_param:
            placed = [jax.tree_util.tree_map(lambda a, p=p, spec=spec: _spec_like(a.shape, p.shape, spec), slot)
                      for slot, p, spec in zip(slots(field.value, layout.treespec), leaves, specs)]
            values.append(from_slots(placed, layout.treespec))
        else:
            values.append(jax.tree_util.tree_map(lambda _a: PartitionSpec(), field.value))
    return rebuild_state(skeleton, values)


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
