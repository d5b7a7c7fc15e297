"""Interleaved A/B of round 16's change (a donated jitted step returns its outputs in the order of
the donated inputs), in one process, JAX on the CPU.

    python docs/scripts/round16_ab.py resnet18 ROUNDS   # ResNet-18 shapes
    python docs/scripts/round16_ab.py small500 ROUNDS   # 500 tensors of 32×64

For AdamW and the five wrappers: ``fast.jit_step(opt, donate=True)`` as before round 16 (outputs
``(new_params, new_state)``) and as now, ``optax.adamw`` jitted without donation and with it,
returning ``(params, state)`` (as its users write it) or ``(state, params)`` (the donated inputs'
order, as ``adaptlr bench`` runs it since round 16), and each step's f32 ``copy`` instructions (elements per parameter).
Float32 params, fixed random gradients, step scalars in float64 (``jax_enable_x64``, as the bench).
Each round runs every variant once in a fresh random order (``adaptlr.backends.bench.time_runners``);
prints the median step time and its quartiles.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved, run_mode  # the same timing loop as rounds 9 to 14

from adaptlr import apply_updates
from adaptlr.backends import fast
from adaptlr.backends.bench import ALGORITHMS, RESNET18_SHAPES
from adaptlr.backends.xla_copies import copies_per_computation
from adaptlr.core import OptimizerState

NAMES = ("adamw", "active", "autodrop", "hypergradient", "dsa", "eg_step_size")
DONATED = (3, 4, 5)  # base, adaptations, params


def _before(opt: Any) -> Any:
    """``fast.jit_step(opt, donate=True)`` as round 15 left it: ``(new_params, new_state)`` out."""

    def inner(grads: Any, count: Any, lr: Any, base: Any, adaptations: Any, params: Any) -> Any:
        updates, state = opt.update(grads, OptimizerState(count, lr, base, adaptations), params)
        return apply_updates(params, updates), fast._without_unchanged_rates(state, lr)

    jitted = jax.jit(inner, donate_argnums=DONATED)

    def compile(grads: Any, state: Any, params: Any) -> Callable:
        compiled = jitted.lower(grads, *state, params).compile()

        def run(grads: Any, state: Any, params: Any) -> Any:
            new_params, new_state = compiled(*fast._donatable((grads, *state, params), DONATED))
            return new_params, fast._with_rates(new_state, state)

        run.as_text = compiled.as_text
        return run

    return compile


def _optax(donated: tuple[int, ...], ordered: bool) -> Any:
    """``optax.adamw``'s jitted step; ``ordered``: it returns ``(state, params)``, the order of the
    donated inputs (as ``adaptlr bench`` runs it since round 16), else ``(params, state)``."""
    tx = optax.adamw(1e-3, weight_decay=1e-2)

    def step(grads: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(grads, state, params)
        new_params = optax.apply_updates(params, updates)
        return (state, new_params) if ordered else (new_params, state)

    def compile(grads: Any, state: Any, params: Any) -> Callable:
        compiled = jax.jit(step, donate_argnums=donated).lower(grads, state, params).compile()

        def run(grads: Any, state: Any, params: Any) -> Any:
            first, second = compiled(grads, state, params)
            return (second, first) if ordered else (first, second)

        run.as_text = compiled.as_text
        return run

    return compile, tx.init


def _stepper(compile: Callable, init: Callable, params: list, grads: list, n: int, label: str) -> Callable[[], None]:
    box = {"params": [p + 0 for p in params]}
    box["state"] = init(box["params"])
    run = compile(grads, box["state"], box["params"])
    copies = copies_per_computation(run.as_text(), "f32")
    print(f"{label:34s} f32 copies: {sum(e for _, e in copies.values()) / n:.2f} elements per parameter", flush=True)

    def step() -> None:
        box["params"], box["state"] = run(grads, box["state"], box["params"])
        jax.block_until_ready(box["params"])

    step()
    return step


def compare(shapes: list, rounds: int) -> None:
    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    params = [jax.numpy.asarray(rng.standard_normal(s).astype(np.float32) * 0.1) for s in shapes]
    grads = [jax.numpy.asarray(rng.standard_normal(s).astype(np.float32) * 0.01) for s in shapes]
    n = sum(math.prod(s) for s in shapes)
    steps = {}
    for name in NAMES:
        opt = ALGORITHMS[name]()
        steps[f"{name} before"] = _stepper(_before(opt), opt.init, params, grads, n, f"{name} before")
        steps[f"{name} now"] = _stepper(fast.jit_step(opt, donate=True).compile, opt.init, params, grads, n,
                                        f"{name} now")
    for label, donated, ordered in (("optax.adamw jit", (), False), ("optax.adamw jit-donate", (1, 2), False),
                                    ("optax.adamw jit-donate, ordered", (1, 2), True)):
        compile, init = _optax(donated, ordered)
        steps[label] = _stepper(compile, init, params, grads, n, label)
    interleaved(steps, rounds)


def main(argv: list[str]) -> None:
    run_mode({"resnet18": lambda rounds: compare(list(RESNET18_SHAPES), rounds),
              "small500": lambda rounds: compare([(32, 64)] * 500, rounds)}, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
