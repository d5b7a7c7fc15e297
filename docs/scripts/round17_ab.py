"""Round 17: HD, EG and D-Adaptation read the old state before the step overwrites it
(``adaptlr._ordering``), A/B on ResNet-18 shapes, interleaved.

    python docs/scripts/round17_ab.py hypergradient,eg_step_size,dadapt_adam,dadapt_sgd 11

For each algorithm of ``adaptlr.backends.bench.ALGORITHMS``, ``fast.jit_step(opt, donate=True)`` and
``donate=False``, "before" (the gradients not made to wait for the adaptations' sums: round 16's
step) and "after" (the library now): the f32 elements XLA copies per parameter and its temporaries
(× the largest tensor, deterministic on a given jax/jaxlib), then the median step time and quartiles
of ROUNDS interleaved rounds (``round9_ab.interleaved``). "before" replaces ``ordered_after`` (the
adaptations' sums, in ``adaptlr.core``) and ``wait_for`` (D-Adaptation's, in ``adaptlr.dadapt``) by
the identity.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jax

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved  # the same timing loop as rounds 9 to 16
from round16_region import resnet18_arrays

import adaptlr.core
from adaptlr.backends import fast
from adaptlr.backends.bench import ALGORITHMS
from adaptlr.backends.xla_copies import copies_per_computation

jax.config.update("jax_enable_x64", True)  # step scalars in float64, as the bench


def _unordered(xp: Any, values: list, *sums: Any) -> list:
    """Round 16's step: the gradients as they are."""
    return values


def _compiled(opt: Any, donate: bool, ordered: bool, grads: list, state: Any, params: list) -> Callable:
    """``fast.jit_step(opt, donate=donate)`` compiled for these arrays, with or without the ordering."""
    dadapt = sys.modules["adaptlr.dadapt"]  # (adaptlr.dadapt_adam, the function, hides the module)
    saved = adaptlr.core.ordered_after, dadapt.wait_for
    if not ordered:
        adaptlr.core.ordered_after = dadapt.wait_for = _unordered
    try:
        return fast.jit_step(opt, donate=donate).compile(grads, state, params)
    finally:
        adaptlr.core.ordered_after, dadapt.wait_for = saved


def main(names: list[str], rounds: int) -> None:
    params, grads, n = resnet18_arrays()
    largest = max(math.prod(p.shape) for p in params) * 4
    print(f"jax {jax.__version__}, {jax.default_backend()}; {n / 1e6:.1f}M float32 parameters")
    steps = {}
    for name in names:
        for donate in (True, False):
            for label, ordered in (("before", False), ("after", True)):
                opt = ALGORITHMS[name]()
                box = {"params": [p + 0 for p in params]}
                box["state"] = opt.init(box["params"])
                run = _compiled(opt, donate, ordered, grads, box["state"], box["params"])
                copied = sum(e for _, e in copies_per_computation(run.as_text(), "f32").values()) / n
                temp = run.memory_analysis().temp_size_in_bytes / largest
                key = f"{name} {'donate' if donate else 'jit'} {label}"
                print(f"{key}: {copied:.2f} copied per parameter, temporaries {temp:.2f} × largest", flush=True)

                def step(run: Callable = run, box: dict = box) -> None:
                    box["params"], box["state"] = run(grads, box["state"], box["params"])
                    jax.block_until_ready(box["params"])

                step()
                steps[key] = step
    interleaved(steps, rounds)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(sys.argv[1].split(","), int(sys.argv[2]))
