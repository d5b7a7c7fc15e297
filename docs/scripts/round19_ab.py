"""Interleaved A/B of round 19's change (the first pass of a blocked step whose sums all come before
its base direction runs over several blocks per call, ``adaptlr.backends.fast.FIRST_PASS_BLOCKS_PER_CALL``;
EG's two passes fewer, HD's copy of the direction gone), in one process.

    python docs/scripts/round19_ab.py costs              # words moved per parameter and aten ops per
                                                         # step, before/after (deterministic)
    python docs/scripts/round19_ab.py calls              # Python and dispatch cost per step, 51 blocks of
                                                         # 1K elements (ResNet-18's block count): the
                                                         # first pass and the writing pass, before/after
    python docs/scripts/round19_ab.py torch ROUNDS       # AdamW and the wrappers, torch adapter default
                                                         # path, before/after; torch.optim.AdamW(foreach)
    python docs/scripts/round19_ab.py summing ROUNDS     # AdamW, HD and EG only, torch adapter default
    python docs/scripts/round19_ab.py numpy ROUNDS       # HD and EG through NumPy's blocked FlatOptimizer

Round 19 also writes EG's ``v_t`` into its state array where the executor donated it
(``adaptlr._inplace.mul_into_donated``: ``torch.mul(out=)``, no copy back), likewise Adam's
direction into HD's ``d_{t-1}`` (``Scalars.directions_into``), and gives EG's moving average
Python-float weights (torch's one-pass ``lerp``, as Adam's). "Before" runs round 18's step:
the first pass one block per call (``fast.sums_before_direction`` patched to False: ``FlatOptimizer``
then passes no ``first_pass_groups`` to ``part_sums.run_parts``), ``torch_fused.mul_into`` patched
to "not done", EG's average with 0-D weights.
ResNet-18 parameter shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import adaptlr

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 19
from round11_ab import WRAPPERS
from round12_ab import _adapter, costs_with, interleaved, modes, pairs_with

WRAPPERS = {**WRAPPERS, "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))}
SUMMING = {k: WRAPPERS[k] for k in ("adamw", "hypergradient", "eg_step_size")}


def _round18_ema(scalars: object, x: object, y: object, beta: float, one_minus_beta: float) -> object:
    """EG's moving average as round 18 made it: 0-D weights (two passes on torch, no ``lerp``)."""
    return _EMA(scalars, x, y, scalars.constant(beta, y.dtype), scalars.constant(one_minus_beta, y.dtype))  # type: ignore[attr-defined]


_EMA = adaptlr._inplace.ema_donated


def _one_block_per_call(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` as round 18 ran it (the module docstring)."""
    from adaptlr.backends import fast, torch_fused

    eg = sys.modules["adaptlr.eg"]
    saved = fast.sums_before_direction, torch_fused.mul_into, eg.ema_donated

    def run() -> None:
        fast.sums_before_direction = lambda opt: False  # type: ignore[assignment]
        torch_fused.mul_into = lambda *args: False  # type: ignore[assignment]
        eg.ema_donated = _round18_ema
        try:
            step()
        finally:
            fast.sums_before_direction, torch_fused.mul_into, eg.ema_donated = saved

    return run


def _before(build: Callable, opt: adaptlr.Optimizer) -> Callable[[], None]:
    return _one_block_per_call(build(opt))


def _numpy_blocked(opt: adaptlr.Optimizer) -> Callable[[], None]:
    """NumPy's blocked ``FlatOptimizer`` (128K-element blocks, its large-model default) on ResNet-18 shapes."""
    import numpy as np

    from adaptlr.backends.bench import RESNET18_SHAPES
    from adaptlr.backends.fast import FlatOptimizer

    rng = np.random.default_rng(0)
    params = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in RESNET18_SHAPES]
    grads = [(rng.standard_normal(s) * 0.01).astype(np.float32) for s in RESNET18_SHAPES]
    fo = FlatOptimizer(opt, params, block_size=1 << 17)
    fo.step(grads)
    return lambda: fo.step(grads)


def _stepper(fo: object, params: list, grads: list) -> Callable[[], None]:
    return lambda: fo.step_on(params, grads)  # type: ignore[attr-defined]


def calls() -> None:
    """Each pass's time per step with 51 blocks of 1,024 elements: the per-call cost, not the arithmetic."""
    import torch

    from adaptlr.backends import fast, part_sums

    spent = {True: 0.0, False: 0.0}
    run_parts = part_sums.run_parts

    def timed(fn: Callable, write: bool) -> Callable:
        def run(*args: object) -> None:
            start = time.perf_counter()
            try:
                fn(*args)
            finally:
                spent[write] += time.perf_counter() - start
        return run

    def timed_run_parts(xp, parts, run_part, sums, rows=False, first_pass_groups=None):  # type: ignore[no-untyped-def]
        def part(p: object, reducer: object, write: bool, donate: bool) -> None:
            timed(run_part, write)(p, reducer, write, donate)
        groups = None if first_pass_groups is None else (first_pass_groups[0], timed(first_pass_groups[1], False))
        return run_parts(xp, parts, part, sums, rows, groups)

    part_sums.run_parts = timed_run_parts  # type: ignore[assignment]
    for name, make in SUMMING.items():
        for is_before in (True, False):
            params, grads = [torch.zeros(51 << 10)], [torch.full((51 << 10,), 0.01)]
            fo = fast.FlatOptimizer(make(), params, block_size=1 << 10)
            step = _stepper(fo, params, grads)
            step = _one_block_per_call(step) if is_before else step
            totals, first, writing = [], [], []
            for _ in range(5):
                step()
            for _ in range(9):
                spent[True] = spent[False] = 0.0
                start = time.perf_counter()
                for _ in range(20):
                    step()
                totals.append((time.perf_counter() - start) / 20)
                first.append(spent[False] / 20)
                writing.append(spent[True] / 20)
            print(f"{name:14s} {'before' if is_before else 'after ':6s} step {statistics.median(totals) * 1e3:6.2f} ms"
                  f"  first pass {statistics.median(first) * 1e3:5.2f} ms  writing pass "
                  f"{statistics.median(writing) * 1e3:5.2f} ms  (medians of 9 x 20 steps)")
    part_sums.run_parts = run_parts  # type: ignore[assignment]


def main(argv: list[str]) -> None:
    all_modes = modes(pairs_with(_before), costs_with(_before), WRAPPERS, _numpy_blocked, SUMMING)
    all_modes["calls"] = calls
    all_modes["summing"] = lambda rounds: interleaved(pairs_with(_before)(SUMMING, _adapter), rounds)
    del all_modes["lr-free"], all_modes["foreach"]  # unchanged: no sums before the direction, no donation
    run_mode(all_modes, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
