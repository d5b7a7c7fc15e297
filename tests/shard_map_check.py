"""Run by tests/test_shard_map.py and tests/test_lr_free_sharding.py in a subprocess with 8 host devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/shard_map_check.py adaptations|lr_free

Each algorithm of the set runs inside ``jax.shard_map`` on a 1×8 mesh (``axis_name="d"``) and on a
2×4 mesh (per-parameter partition specs: a 2-D weight split on both axes, a bias on one, a replicated
scalar) next to the plain jitted run; prints one table row per case and SHARD-MAP-OK when every
params/learning-rate error is ≤ 1e-12 (float64) and AutoDrop's drop counts agree.
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import adaptlr
from adaptlr.backends.jax import state_partition_specs, to_optax

jax.config.update("jax_enable_x64", True)
assert len(jax.devices()) == 8, jax.devices()
S = 4
ADAPTATIONS = {
    "adamw": lambda: adaptlr.adamw(0.05, weight_decay=0.01),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(0.05), steps_per_epoch=S),
    "autodrop(sgdm)": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.5), steps_per_epoch=S, theta=20.0,
                                               theta_max=40.0, patience_epochs=1, drop_factor=0.5),
    "hd-global(adam)": lambda: adaptlr.hypergradient(adaptlr.adam(0.02), hyper_lr=1e-3),
    "hd-mult-global(sgd)": lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=0.02, mode="multiplicative"),
    "hd-tensor(sgd)": lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=2e-3, granularity="tensor"),
    "hd-mult-tensor(adam)": lambda: adaptlr.hypergradient(adaptlr.adam(0.02), hyper_lr=0.02, mode="multiplicative",
                                                          granularity="tensor"),
    "eg-global(sgdm)": lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05, momentum=0.9), 0.05, 0.05),
    "eg-tensor(adam)": lambda: adaptlr.eg_step_size(adaptlr.adam(0.02), 0.05, 0.05, scale="tensor"),
    "dsa(adam)": lambda: adaptlr.dsa(adaptlr.adam(0.02), hyper_lr=0.02),
    "dsa(sgd)": lambda: adaptlr.dsa(adaptlr.sgd(0.05), hyper_lr=0.02, structure=("tensor", "row", "col")),
}

LR_FREE = {
    "prodigy": lambda: adaptlr.prodigy(d0=1e-2, weight_decay=0.01),
    "prodigy-coupled-bc-safeguard": lambda: adaptlr.prodigy(d0=1e-2, weight_decay=0.01, decouple=False,
                                                            use_bias_correction=True, safeguard_warmup=True),
    "dog": lambda: adaptlr.dog(reps_rel=1e-2),
    "ldog": lambda: adaptlr.dog(reps_rel=1e-2, layerwise=True, weight_decay=0.01),
    "dowg": lambda: adaptlr.dowg(init_estim_sq_dist=1e-3),
    "dadapt_adam": lambda: adaptlr.dadapt_adam(d0=1e-2, weight_decay=0.01, decouple=True, use_bias_correction=True),
    "dadapt_sgd": lambda: adaptlr.dadapt_sgd(d0=1e-2, momentum=0.5, weight_decay=0.01),
    "mechanic(adamw)": lambda: adaptlr.mechanic(adaptlr.adamw(0.05, weight_decay=0.01), s_decay=0.1, s_init=10.0),
    "mechanic(sgdm)-store-delta": lambda: adaptlr.mechanic(adaptlr.sgd(0.05, momentum=0.5), store_delta=True,
                                                           s_init=10.0),
    "schedule_free_adamw": lambda: adaptlr.schedule_free_adamw(0.05, warmup_steps=2, weight_decay=0.01),
}
MAKERS = {"adaptations": ADAPTATIONS, "lr_free": LR_FREE}[sys.argv[1]]
rng = np.random.default_rng(0)
W16, B8, C = rng.normal(size=(16, 6)), rng.normal(size=8), np.float64(0.7)
W88 = rng.normal(size=(8, 8))
MESHES = {
    "1x8 axis_name='d'": (Mesh(np.array(jax.devices()), ("d",)), {"w": W16, "b": B8},
                          {"axis_name": "d"}, {"w": P("d"), "b": P("d")}),
    "2x4 partition_specs": (Mesh(np.array(jax.devices()).reshape(2, 4), ("a", "b")), {"w": W88, "b": B8, "c": C},
                            "specs", {"w": P("a", "b"), "b": P("b"), "c": P()}),
}
STEPS = 24


def grads_of(params, t):
    return jax.tree_util.tree_map(lambda p: jnp.sin(3 * p + 0.1 * t) + 0.05 * p, params)


worst = {}
for mesh_name, (mesh, init, kwargs, pspecs) in MESHES.items():
    if kwargs == "specs":
        kwargs = {"partition_specs": pspecs}
    for name, make in MAKERS.items():
        opt = make()
        params0 = jax.tree_util.tree_map(jnp.asarray, init)
        plain = to_optax(opt)
        sharded = to_optax(opt, **kwargs)

        def plain_step(params, state, t, plain=plain):
            updates, state = plain.update(grads_of(params, t), state, params)
            return optax.apply_updates(params, updates), state

        def local_step(params, state, t, sharded=sharded):
            updates, state = sharded.update(grads_of(params, t), state, params)
            return optax.apply_updates(params, updates), state

        state0 = plain.init(params0)
        sspecs = state_partition_specs(state0, params0, pspecs)
        sm = jax.jit(jax.shard_map(local_step, mesh=mesh, in_specs=(pspecs, sspecs, P()), out_specs=(pspecs, sspecs)))
        jp = jax.jit(plain_step)
        pa, sa, pb, sb = params0, state0, params0, state0
        err = 0.0
        for t in range(STEPS):
            pa, sa = jp(pa, sa, jnp.asarray(float(t)))
            pb, sb = sm(pb, sb, jnp.asarray(float(t)))
            for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(pb)):
                x, y = np.asarray(x), np.asarray(y)
                err = max(err, float(np.max(np.abs(x - y)) / np.max(np.abs(x))))
        lr_a = jax.tree_util.tree_leaves(adaptlr.learning_rates(sa))
        lr_b = jax.tree_util.tree_leaves(adaptlr.learning_rates(sb))
        for x, y in zip(lr_a, lr_b):
            err = max(err, float(np.max(np.abs(np.asarray(x) - np.asarray(y))) / np.max(np.abs(np.asarray(x)))))
        moved = max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
                    for x, y in zip(jax.tree_util.tree_leaves(pa), jax.tree_util.tree_leaves(params0)))
        assert moved > 0.05, (name, moved)  # the run went somewhere: the sums it depends on were exercised
        extra = f" moved={moved:.2f}"
        if name.startswith("autodrop"):
            da, db = int(sa.adaptations[0].drop_count), int(sb.adaptations[0].drop_count)
            assert da == db and da > 0, (da, db)
            extra += f" drops={da}"
        worst[(mesh_name, name)] = err
        print(f"| {name} | {mesh_name} | {err:.1e} |{extra}")
assert all(e <= 1e-12 for e in worst.values()), worst
print("SHARD-MAP-OK")
