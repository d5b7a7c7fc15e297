"""The donated whole step with and without XLA:CPU's region analysis in copy insertion (round 16;
measured, not yet in the library), interleaved, ResNet-18 shapes.

    python docs/scripts/round16_region.py hypergradient,eg_step_size,dadapt_adam,autodrop 11

For each algorithm: ``fast.jit_step(opt, donate=True)`` as the library compiles it ("now") and the
same step compiled with ``compiler_options={"xla_cpu_copy_insertion_use_region_analysis": True}``
("region"); the f32 copies per parameter and XLA's temporaries of each, then the median step time
and quartiles of ROUNDS interleaved rounds (``round9_ab.interleaved``).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved  # the same timing loop as rounds 9 to 16

from adaptlr.backends import fast
from adaptlr.backends.bench import ALGORITHMS, RESNET18_SHAPES
from adaptlr.backends.xla_copies import copies_per_computation
from adaptlr.core import OptimizerState, apply_updates

jax.config.update("jax_enable_x64", True)  # step scalars in float64, as the bench

DONATED = (3, 4, 5)  # base, adaptations, params
REGION = {"xla_cpu_copy_insertion_use_region_analysis": True}


def _compiler(opt: Any, options: dict | None) -> Callable:
    """``fast.jit_step(opt, donate=True).compile`` with ``compiler_options=options``."""

    def inner(grads: Any, count: Any, lr: Any, base: Any, adaptations: Any, params: Any) -> Any:
        updates, state = opt.update(grads, OptimizerState(count, lr, base, adaptations), params)
        return fast._in_donated_order(apply_updates(params, updates), state, lr)

    jitted = jax.jit(inner, donate_argnums=DONATED, compiler_options=options)

    def compile(grads: Any, state: Any, params: Any) -> Callable:
        compiled = jitted.lower(grads, *state, params).compile()

        def run(grads: Any, state: Any, params: Any) -> Any:
            return fast._from_donated_order(compiled(*fast._donatable((grads, *state, params), DONATED)), state)

        run.as_text = compiled.as_text
        run.temp = compiled.memory_analysis().temp_size_in_bytes
        return run

    return compile


def resnet18_arrays() -> tuple[list, list, int]:
    """``(params, grads, number of parameters)``: fixed random float32 JAX arrays of ResNet-18's shapes."""
    rng = np.random.default_rng(0)
    shapes = list(RESNET18_SHAPES)
    params = [jax.numpy.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for s in shapes]
    grads = [jax.numpy.asarray(rng.standard_normal(s).astype(np.float32) * 0.01) for s in shapes]
    return params, grads, sum(math.prod(s) for s in shapes)


def main(names: list[str], rounds: int) -> None:
    params, grads, n = resnet18_arrays()
    steps = {}
    for name in names:
        for label, options in (("now", None), ("region", REGION)):
            opt = ALGORITHMS[name]()
            box = {"params": [p + 0 for p in params]}
            box["state"] = opt.init(box["params"])
            run = _compiler(opt, options)(grads, box["state"], box["params"])
            copied = sum(e for _, e in copies_per_computation(run.as_text(), "f32").values()) / n
            print(f"{name} {label}: {copied:.2f} copied per parameter, temporaries {run.temp / 2**20:.1f} MiB",
                  flush=True)

            def step(run: Callable = run, box: dict = box) -> None:
                box["params"], box["state"] = run(grads, box["state"], box["params"])
                jax.block_until_ready(box["params"])

            step()
            steps[f"{name} {label}"] = step
    interleaved(steps, rounds)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1].split(","), int(sys.argv[2]))
