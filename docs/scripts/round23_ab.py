"""Interleaved A/B of round 23's change, in one process.

    python docs/scripts/round23_ab.py jax-order ROUNDS   # JAX, ResNet-18 shapes, jit and jit-donate:
                                                         # DSA(AdamW) with the products its sums read
                                                         # made together (before) or one after another
                                                         # (after: adaptlr._reduce.chained_sums), and
                                                         # EG(AdamW) with its gradient average written
                                                         # in any order (before) or after the gains read
                                                         # the old one (after), HD(AdamW) with
                                                         # Adam's direction divided last (after) or
                                                         # multiplied last (before), and HD with a
                                                         # rate per element also made to wait for
                                                         # it (after); AdamW; median ms, × AdamW,
                                                         # XLA temp MiB
    python docs/scripts/round23_ab.py adamw-direction ROUNDS  # AdamW alone, jit and jit-donate: Adam's
                                                         # direction multiplied last (before) or
                                                         # divided last (after)
    python docs/scripts/round23_ab.py jax-temps          # the same steps' XLA temp MiB only
                                                         # (deterministic, no timing)
    python docs/scripts/round23_ab.py dsa-compile        # DSA(AdamW)'s donated step on 500 tensors of
                                                         # 32×64 and on ResNet-18 shapes: compile
                                                         # seconds and XLA temp bytes, unchained,
                                                         # chained (terms of at least CHAINED_ELEMENTS),
                                                         # and every term chained
    python docs/scripts/round23_ab.py active-boundary ROUNDS  # ActiveLR(AdamW), ResNet-18 shapes, jit and
                                                         # jit-donate: as it is, and with no epoch-
                                                         # boundary work at all (at_boundary replaced by
                                                         # the identity: what the loop costs); AdamW

"Before" compiles the steps as round 22 did (``adaptlr._reduce._after_chain`` and
``adaptlr.eg.after_first_element`` patched to the identity, ``adaptlr.core.ordered_after`` to
round 22's, which waited for the new 0-D arrays only, Adam's direction to round 22's, the
product last); the same numbers (HD: to rounding)
(``tests/test_sum_chain.py``, ``tests/test_eg.py``, ``tests/test_ordering.py``). Every step is
compiled ahead of time, as ``adaptlr bench`` compiles it; each round runs every variant once, one
step each, in a fresh random order (``adaptlr.backends.bench.time_runners``); prints the median step
time and its quartiles.

Runs on a checkout of rounds 23 to 27 (up to d781dde): round 28 removed the chain it patches
(``_after_chain``, ``CHAINED_ELEMENTS``, ``tests/test_sum_chain.py``; DSA's products are made again
for each sum instead, ``docs/scripts/round28_reads.py``).
"""

from __future__ import annotations

import sys

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 23
from round22_ab import _report


def _round22_ordered_after(xp: object, values: list, before: object, after: object, *,
                           first_elements: bool = True) -> list:
    """``adaptlr._ordering.ordered_after`` as round 22 had it: on the new 0-D arrays only."""
    import optree

    from adaptlr._ordering import jax_traced, wait_for

    if not jax_traced(values):
        return values
    old = set(map(id, optree.tree_leaves(before, none_is_leaf=False)))
    new = [x for x in optree.tree_leaves(after, none_is_leaf=False) if id(x) not in old and x.ndim == 0]
    return wait_for(xp, values, new)


def _round22_adam_direction(self: object, grads: list, state: object, scalars: object, layout: object) -> tuple:
    """``AdamDirection.direction`` as round 22 had it: ``m / (sqrt(v) + ε') · c``, the product last."""
    from adaptlr._inplace import add_, add_product_, ema_donated, mul_donated, mul_into_donated
    from adaptlr.adam import AdamState

    xp, b1, b2, eps = scalars.xp, self.b1, self.b2, self.eps  # type: ignore[attr-defined]

    def corrections(t: object) -> tuple:
        sqrt_bc2 = xp.sqrt(1.0 - b2**t)
        return sqrt_bc2 / (1.0 - b1**t), eps * sqrt_bc2

    into = scalars.directions_into  # type: ignore[attr-defined]
    mus, nus, directions = [], [], []
    for g, m, nu in zip(grads, layout.leaves(state.mu, "state.mu"), layout.leaves(state.nu, "state.nu")):  # type: ignore[attr-defined]
        scale, eps_t = scalars.step_scalars("adam", g.dtype, corrections)  # type: ignore[attr-defined]
        m = ema_donated(scalars, m, g, b1)
        nu = add_product_(mul_donated(scalars, nu, b2), g, g, 1.0 - b2)
        directions.append(mul_into_donated(scalars, into.get(id(g)) if into else None,
                                           m / add_(xp.sqrt(nu), eps_t), scale, x_temporary=True))
        mus.append(m)
        nus.append(nu)
    return directions, AdamState(layout.tree(mus), layout.tree(nus))  # type: ignore[attr-defined]


# each algorithm and what round 23 changed in its step, as round 22 had it, for "before"
BEFORE = {
    "dsa": [("adaptlr._reduce", "_after_chain", lambda xp, term: term),
            ("adaptlr.core", "ordered_after", _round22_ordered_after)],
    "eg_step_size": [("adaptlr.eg", "after_first_element", lambda xp, value, written: value)],
    "adamw": [("adaptlr.adam:AdamDirection", "direction", _round22_adam_direction)],
    "hypergradient": [("adaptlr.adam:AdamDirection", "direction", _round22_adam_direction)],
    "hypergradient_element": [("adaptlr.core", "ordered_after", _round22_ordered_after),
                              ("adaptlr.adam:AdamDirection", "direction", _round22_adam_direction)],
}
ALGORITHMS = list(BEFORE)


def _with_element_hd() -> None:
    """HD with a rate per element, as a bench algorithm (the bench runs HD's global rate)."""
    import adaptlr
    from adaptlr.backends import bench

    bench.ALGORITHMS.setdefault("hypergradient_element", lambda: adaptlr.hypergradient(
        adaptlr.adamw(1e-3), hyper_lr=1e-8, granularity="element"))


def _target(name: str) -> object:
    """The module ``name``, or ``module:Class``'s class."""
    import importlib

    module, _, attribute = name.partition(":")
    found = importlib.import_module(module)
    return getattr(found, attribute) if attribute else found


def _runners(before: bool) -> list:
    from adaptlr.backends import bench

    _with_element_hd()
    shapes = bench.SETS["resnet18"]
    if not before:
        return [r for r in bench.jax_runners("resnet18", shapes, ALGORITHMS) if r.kind == "adaptlr"]
    runners = []
    for name, changes in BEFORE.items():
        modules = [(_target(m), attribute, value) for m, attribute, value in changes]
        saved = [(module, attribute, getattr(module, attribute)) for module, attribute, _ in modules]
        for module, attribute, value in modules:
            setattr(module, attribute, value)
        try:  # compiled as round 22 compiled it
            runners += [r for r in bench.jax_runners("resnet18", shapes, [name]) if r.kind == "adaptlr"]
        finally:
            for module, attribute, value in saved:
                setattr(module, attribute, value)
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


def adamw_direction(rounds: int) -> None:
    """AdamW alone, its direction divided last (after) or multiplied last (before)."""
    from adaptlr.backends import bench

    global BEFORE, ALGORITHMS
    BEFORE, ALGORITHMS = {"adamw": BEFORE["adamw"]}, ["adamw"]
    runners = _runners(before=True) + _runners(before=False)
    bench.time_runners(runners, rounds, warmup=2)
    _report("resnet18", runners)


def jax_temps() -> None:
    _temps(_runners(before=True) + _runners(before=False))


def dsa_compile() -> None:
    import math
    import time

    import jax
    import jax.numpy as jnp
    import numpy as np

    import adaptlr
    from adaptlr import _reduce
    from adaptlr.backends import bench
    from adaptlr.backends.fast import jit_step

    jax.config.update("jax_enable_x64", True)  # as the bench and the tests run
    rng = np.random.default_rng(0)
    saved = (_reduce._after_chain, _reduce.CHAINED_ELEMENTS)
    variants = {"unchained (before)": (_unchained_term, saved[1]), "chained (after)": saved,
                "every term chained": (saved[0], 0)}
    for set_name in ("small500", "resnet18"):
        shapes = bench.SETS[set_name]
        params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
        largest = 4 * max(math.prod(s) for s in shapes)
        warm = adaptlr.adamw(1e-3)  # the process's one-time compile costs, before the timed ones
        jit_step(warm, donate=True).compile(params, warm.init(params), params)
        for label, (after_chain, elements) in variants.items():
            _reduce._after_chain, _reduce.CHAINED_ELEMENTS = after_chain, elements
            try:
                opt = adaptlr.dsa(adaptlr.adamw(1e-3))
                start = time.perf_counter()
                compiled = jit_step(opt, donate=True).compile(params, opt.init(params), params)
                seconds = time.perf_counter() - start
            finally:
                _reduce._after_chain, _reduce.CHAINED_ELEMENTS = saved
            temp = compiled.memory_analysis().temp_size_in_bytes
            print(f"{set_name:9s} dsa jit-donate, {label:20s} compile {seconds:5.1f} s, XLA temp {temp:,} bytes "
                  f"({temp / largest:.4f} × the largest tensor)")


def active_boundary(rounds: int) -> None:
    import importlib

    from adaptlr.backends import bench

    active = importlib.import_module("adaptlr.active")
    shapes = bench.SETS["resnet18"]
    runners = [r for r in bench.jax_runners("resnet18", shapes, ["adamw", "active"]) if r.kind == "adaptlr"]
    saved = active.at_boundary
    active.at_boundary = lambda xp, pred, boundary, operands, scalars=None, **options: tuple(operands)
    try:  # not ActiveLR any more: what its step costs without the boundary's loop
        without = [r for r in bench.jax_runners("resnet18", shapes, ["active"]) if r.kind == "adaptlr"]
    finally:
        active.at_boundary = saved
    for runner in without:
        runner.path += ", no boundary work"
    runners += without
    bench.time_runners(runners, rounds, warmup=2)
    medians = _report("resnet18", runners)
    for path in ("jit", "jit-donate"):
        base = medians[("adamw", path)]
        print(f"resnet18  active {path} × AdamW: {medians[('active', path)] / base:.2f}, "
              f"no boundary work {medians[('active', path + ', no boundary work')] / base:.2f}")


def _unchained_term(xp: object, term: object) -> object:
    return term


if __name__ == "__main__":
    run_mode({"jax-order": jax_order, "jax-temps": jax_temps, "dsa-compile": dsa_compile,
              "active-boundary": active_boundary, "adamw-direction": adamw_direction}, sys.argv[1:], __doc__)
