"""Round 27: JAX's jitted steps following their count on the host; XLA:CPU's tiled emitter.

    python docs/scripts/round27_tiled.py tiled ROUNDS      # one 512×512×3×3 float32 tensor: a lone
                                                           # addition against loop fusions
    python docs/scripts/round27_tiled.py variants ROUNDS   # ActiveLR(AdamW), AutoDrop(AdamW) on ResNet-18
                                                           # shapes: each executable of jit_step timed

``tiled``: ``jax.jit`` of ``c + g`` (XLA:CPU emits the lone addition with its tiled emitter, tile by
tile along the last dimension, 3 elements here), ``(c + g)·1.5``, ``c + g`` on the tensors
flattened inside the function (XLA moves the reshapes back out), ``where(t > ∞, NaN, c + g)``
(``adaptlr._ordering.as_loop_fusion``) and ``c + g`` on 1-D tensors of the same size; interleaved,
median ns per element, and whether the optimized HLO has a ``wrapped_add``.

``variants``: ``jit_step(opt, donate=...)`` of ActiveLR(AdamW) and AutoDrop(AdamW), steps_per_epoch
100, after two steps: its executables (the one that decides on the device, ``None``, and the
ordinary step's, ``(False,)``) called directly on the same arguments (without donation, so that a
call may be repeated), interleaved with AdamW's; median ms, and XLA's temporaries of each.
"""

from __future__ import annotations

import inspect
import statistics
import sys
from collections.abc import Callable
from typing import Any


def _interleaved(calls: dict[str, Callable[[], Any]], rounds: int) -> dict[str, float]:
    """``adaptlr bench``'s interleaved timing (one warm-up round) of each ``name: call``; median s."""
    import jax

    from adaptlr.backends.bench import Runner, time_runners

    runners = [Runner("", "jax", name, "", "adaptlr", lambda c=call: jax.block_until_ready(c()))
               for name, call in calls.items()]
    time_runners(runners, rounds)
    return {runner.algorithm: statistics.median(runner.times) for runner in runners}


def tiled(rounds: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (512, 512, 3, 3)
    n = int(np.prod(shape))
    c, g = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))
    c1, g1 = c.reshape(-1), g.reshape(-1)
    t = jnp.asarray(5.0)
    functions = {
        "c + g": (jax.jit(lambda c, g, t: c + g), (c, g, t)),
        "(c + g)·1.5": (jax.jit(lambda c, g, t: (c + g) * 1.5), (c, g, t)),
        "c + g flattened inside": (jax.jit(lambda c, g, t: (c.reshape(-1) + g.reshape(-1)).reshape(c.shape)),
                                   (c, g, t)),
        "where(t > inf, NaN, c + g)": (jax.jit(lambda c, g, t: jnp.where(t > jnp.inf, jnp.nan, c + g)), (c, g, t)),
        "c + g, 1-D tensors": (jax.jit(lambda c, g, t: c + g), (c1, g1, t)),
    }
    medians = _interleaved({k: (lambda f=f, a=a: f(*a)) for k, (f, a) in functions.items()}, rounds)
    print(f"one tensor of {shape} float32, {rounds} interleaved rounds; median ns per element")
    for name, (f, args) in functions.items():
        lone = "wrapped_add" in f.lower(*args).compile().as_text()
        print(f"  {name:30s} {medians[name] / n * 1e9:6.2f}   {'lone addition (wrapped_add)' if lone else ''}")


def variants(rounds: int) -> None:
    import jax
    import jax.numpy as jnp

    import adaptlr
    from adaptlr.backends import bench
    from adaptlr.backends.fast import jit_step

    jax.config.update("jax_enable_x64", True)
    host_params, host_grads = bench._host_data(bench.RESNET18_SHAPES)
    grads = [jnp.asarray(g) for g in host_grads]
    largest = max(p.size for p in host_params) * 4
    calls: dict[str, Callable[[], Any]] = {}
    temps: dict[str, float] = {}
    makers = {"adamw": lambda: adaptlr.adamw(1e-3),
              "active": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100),
              "autodrop": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100)}
    for name, make in makers.items():
        opt = make()
        params = [jnp.asarray(p) for p in host_params]
        state = opt.init(params)
        run = jit_step(opt, donate=False).compile(grads, state, params)
        for _ in range(2):
            params, state = run(grads, state, params)
        args, _ = inspect.getclosurevars(run).nonlocals["arguments"](grads, state, params)
        for answers, executable in run.executables.items():
            key = f"{name} {answers}"
            calls[key] = lambda e=executable, a=args: e(*a)
            temps[key] = executable.memory_analysis().temp_size_in_bytes / largest
    medians = _interleaved(calls, rounds)
    base = medians["adamw None"]
    print(f"ResNet-18 shapes, jit_step without donation, {rounds} interleaved rounds; median ms, × AdamW, "
          "XLA temporaries × the largest tensor")
    for key, median in medians.items():
        print(f"  {key:20s} {median * 1e3:6.1f} ms  {median / base:5.2f}×  temp {temps[key]:.2f}×")


MODES = {"tiled": tiled, "variants": variants}

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in MODES:
        raise SystemExit(__doc__)
    MODES[sys.argv[1]](int(sys.argv[2]))
