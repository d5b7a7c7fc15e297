"""Interleaved A/B timings of round 5's two changes, old and new code in one process (docs/performance.md).

    python docs/scripts/round5_ab.py boundary ROUNDS        # JAX: lax.cond (kept) vs a loop run 0 or 1 times
    python docs/scripts/round5_ab.py dsa numpy|torch|jax ROUNDS   # DSA: a third tensor reduction (old) vs
                                                                  # the tensor sums from the row sums (new)
    python docs/scripts/round5_ab.py dsa-kinds ROUNDS       # JAX jit: DSA with one factor kind at a time

ResNet-18 parameter shapes, float32, fixed random gradients; each round runs every variant once in
a fresh random order; prints the median step time and its ratio to AdamW of the same run.
"""

from __future__ import annotations

import importlib
import random
import sys
import time
from collections.abc import Callable

import numpy as np

import adaptlr
from adaptlr.backends.bench import RESNET18_SHAPES

_dsa = importlib.import_module("adaptlr.dsa")


def _old_slice_sums(reduce, i, x, kinds) -> dict:
    return {kind: _dsa._slice_sum(reduce, i, x, kind) for kind in kinds}


def _jax_runner(opt, params: list, grads: list, donate: bool = False) -> Callable[[], None]:
    import jax

    def step(g, s, p):
        updates, s = opt.update(g, s, p)
        return adaptlr.apply_updates(p, updates), s

    jitted = jax.jit(step, donate_argnums=(1, 2) if donate else ())
    box = [opt.init(params), [x + 0 for x in params]]

    def run() -> None:
        p, s = jitted(grads, box[0], box[1])
        jax.block_until_ready((p, s))
        box[1], box[0] = p, s

    run()  # compiles with the hook in place now
    return run


def boundary_runners() -> dict:
    import jax
    import jax.numpy as jnp

    import adaptlr.backends.jax_boundary as hook

    jax.config.update("jax_enable_x64", True)
    kept = hook.only_when

    def loop(pred, work, operands):
        """The alternative measured and not kept: the carry stays in place, but the step is slower
        with the state donated (and has no reverse-mode derivative without a custom JVP)."""
        def body(carry):
            return jnp.zeros_like(carry[0]), tuple(work(*carry[1]))

        return jax.lax.while_loop(lambda carry: carry[0], body, (pred, tuple(operands)))[1]

    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.1) for s in RESNET18_SHAPES]
    grads = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.1) for s in RESNET18_SHAPES]
    runners = {}
    for donate in (False, True):
        tag = "jit-donate" if donate else "jit"
        runners[f"adamw {tag}"] = _jax_runner(adaptlr.adamw(1e-3), params, grads, donate)
        for name, wrap in (("active", adaptlr.active), ("autodrop", adaptlr.autodrop)):
            for variant, fn in (("cond", kept), ("loop", loop)):
                hook.only_when = fn
                runners[f"{name} {tag} {variant}"] = _jax_runner(wrap(adaptlr.adamw(1e-3), steps_per_epoch=1000),
                                                                 params, grads, donate)
    hook.only_when = kept
    return runners


def dsa_runners(backend: str) -> dict:
    new = _dsa._slice_sums
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32) * 0.1 for s in RESNET18_SHAPES]
    grads = [rng.standard_normal(s, dtype=np.float32) * 0.1 for s in RESNET18_SHAPES]
    variants = (("adamw", lambda: adaptlr.adamw(1e-3), new), ("dsa old", lambda: adaptlr.dsa(adaptlr.adamw(1e-3)),
                _old_slice_sums), ("dsa new", lambda: adaptlr.dsa(adaptlr.adamw(1e-3)), new))
    runners = {}
    for name, make, sums in variants:
        _dsa._slice_sums = sums
        if backend == "jax":
            import jax
            import jax.numpy as jnp

            jax.config.update("jax_enable_x64", True)
            run = _jax_runner(make(), [jnp.asarray(p) for p in params], [jnp.asarray(g) for g in grads])
        elif backend == "torch":
            import torch

            from adaptlr.backends.torch import Optimizer

            tensors = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in params]
            for t, g in zip(tensors, grads):
                t.grad = torch.from_numpy(g.copy())
            adapter = Optimizer(tensors, make())

            def run(adapter=adapter, sums=sums) -> None:
                _dsa._slice_sums = sums
                adapter.step()
        else:
            opt = make()
            box = [opt.init(params), [p.copy() for p in params]]

            def run(opt=opt, box=box, sums=sums) -> None:
                _dsa._slice_sums = sums
                updates, box[0] = opt.update(grads, box[0], box[1])
                box[1] = adaptlr.apply_updates(box[1], updates)
        run()
        runners[name] = run
    return runners


def dsa_kind_runners() -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.1) for s in RESNET18_SHAPES]
    grads = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.1) for s in RESNET18_SHAPES]
    runners = {"adamw": _jax_runner(adaptlr.adamw(1e-3), params, grads),
               "dsa default": _jax_runner(adaptlr.dsa(adaptlr.adamw(1e-3)), params, grads)}
    for kind in _dsa.KINDS:
        runners[f"dsa {kind}"] = _jax_runner(adaptlr.dsa(adaptlr.adamw(1e-3), structure=(kind,)), params, grads)
    return runners


def main(argv: list[str]) -> int:
    if argv[0] == "boundary":
        runners, rounds = boundary_runners(), int(argv[1])
    elif argv[0] == "dsa-kinds":
        runners, rounds = dsa_kind_runners(), int(argv[1])
    else:
        runners, rounds = dsa_runners(argv[1]), int(argv[2])
    times: dict[str, list[float]] = {k: [] for k in runners}
    for _ in range(rounds):
        order = list(runners)
        random.shuffle(order)
        for k in order:
            start = time.perf_counter()
            runners[k]()
            times[k].append(time.perf_counter() - start)
    for k, v in times.items():
        base = next(b for b in times if b.startswith("adamw") and b.split(" ")[1:2] == k.split(" ")[1:2]) \
            if argv[0] == "boundary" else "adamw"
        print(f"{k:24s} {np.median(v) * 1e3:7.1f} ms  {np.median(v) / np.median(times[base]):.2f}x adamw")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
