"""Interleaved A/B of round 23's change, in one process.

    python docs/scripts/round23_ab.py jax-order ROUNDS   # JAX, ResNet-18 shapes, jit and jit-donate:
                                                         # DSA(AdamW) with the products its sums read
                                                         # made together (before) or one after another
                                                         # (after: adaptlr._reduce.chained_sums), and
                                                         # EG(AdamW) with its gradient average written
                                                         # in any order (before) or after the gains read
                                                         # the old one (after); AdamW; median ms,
                                                         # × AdamW, XLA temp MiB
    python docs/scripts/round23_ab.py jax-temps          # the same steps' XLA temp MiB only
                                                         # (deterministic, no timing)

"Before" compiles the steps as round 22 did (``adaptlr._reduce._after_chain`` and
``adaptlr.eg.after_first_element`` patched to the identity); the same numbers
(``tests/test_sum_chain.py``, ``tests/test_eg.py``). Every step is compiled ahead of time, as
``adaptlr bench`` compiles it; each round runs every variant once, one step each, in a fresh random
order (``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 23
from round22_ab import _report

# each algorithm and the function round 23 added to its step, replaced by the identity for "before"
BEFORE = {"dsa": ("adaptlr._reduce", "_after_chain", lambda xp, term: term),
          "eg_step_size": ("adaptlr.eg", "after_first_element", lambda xp, value, written: value)}
ALGORITHMS = list(BEFORE)


def _runners(before: bool) -> list:
    import importlib

    from adaptlr.backends import bench

    shapes = bench.SETS["resnet18"]
    if not before:
        return [r for r in bench.jax_runners("resnet18", shapes, ["adamw", *ALGORITHMS]) if r.kind == "adaptlr"]
    runners = []
    for name, (module_name, attribute, identity) in BEFORE.items():
        module = importlib.import_module(module_name)
        saved = getattr(module, attribute)
        setattr(module, attribute, identity)
        try:  # compiled as round 22 compiled it
            runners += [r for r in bench.jax_runners("resnet18", shapes, [name]) if r.kind == "adaptlr"]
        finally:
            setattr(module, attribute, saved)
    for runner in runners:
        runner.path += ", before"
    return runners


def jax_order(rounds: int) -> None:
    from adaptlr.backends import bench

    runners = _runners(before=True) + _runners(before=False)
    bench.time_runners(runners, rounds, warmup=2)
    medians = _report("resnet18", runners)
    for path in ("jit", "jit-donate"):
        base = medians[("adamw", path)]
        for name in ALGORITHMS:
            print(f"resnet18  {name:14s} {path:10s} × AdamW: before {medians[(name, path + ', before')] / base:.2f}, "
                  f"after {medians[(name, path)] / base:.2f}")
    _temps(runners)


def _temps(runners: list) -> None:
    largest = max(_sizes())
    for runner in sorted(runners, key=lambda r: (r.algorithm, r.path)):
        temp = runner.memory()
        print(f"resnet18  {runner.algorithm:14s} {runner.path:20s} XLA temp {temp / 2**20:6.1f} MiB "
              f"({temp / largest:.2f} × the largest tensor)")


def _sizes() -> list[int]:
    import math

    from adaptlr.backends import bench

    return [4 * math.prod(s) for s in bench.SETS["resnet18"]]


def jax_temps() -> None:
    _temps(_runners(before=True) + _runners(before=False))


if __name__ == "__main__":
    run_mode({"jax-order": jax_order, "jax-temps": jax_temps}, sys.argv[1:], __doc__)
