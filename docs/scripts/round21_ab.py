"""Interleaved A/B of round 21's changes, in one process.

    python docs/scripts/round21_ab.py numpy-blocks ROUNDS   # NumPy's blocked FlatOptimizer at 128K-element
                                                            # blocks (before), the new default (208K on
                                                            # these shapes: fast.recommended_options) and
                                                            # 256K, every algorithm the bench steps in
                                                            # blocks, the copy bound; median ms, × bound,
                                                            # peak MiB
    python docs/scripts/round21_ab.py row-sums ROUNDS       # DSA, LDoG, HD and EG per tensor on the torch
                                                            # adapter's default path (row blocks), before/
                                                            # after: a row block's second pass makes no
                                                            # sum term and reads its first pass's row sums
    python docs/scripts/round21_ab.py row-donate ROUNDS     # the same four: a writing row block's own rows
                                                            # of the state copied in (before) or donated
                                                            # to its step (after)
    python docs/scripts/round21_ab.py dsa-ops STEPS         # DSA, torch adapter default: time inside each
                                                            # aten operation (round20_ab.py's ops)

ResNet-18 parameter shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Callable

import numpy as np

import adaptlr
from adaptlr._reduce import Term
from adaptlr.backends import part_sums
from adaptlr.backends.bench import RESNET18_SHAPES, Runner, _tracemalloc_peak, time_runners
from adaptlr.backends.fast import FlatOptimizer, flat_safety, recommended_options, sums_replayable

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved, run_mode  # the command line of rounds 11 to 21
from round11_ab import LR_FREE, WRAPPERS
from round12_ab import _adapter, pairs_with
from round20_ab import _patched, ops

ROW_BLOCKED: dict[str, Callable[[], adaptlr.Optimizer]] = {
    "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01)),
    "ldog": lambda: adaptlr.dog(layerwise=True),
    "hd per tensor": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-8, granularity="tensor"),
    "eg per tensor": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), 1e-3, 1e-3, scale="tensor"),
}

NUMPY_MAKERS: dict[str, Callable[[], adaptlr.Optimizer]] = {**WRAPPERS, **LR_FREE,
                                                             "dadapt_sgd": adaptlr.dadapt_sgd}


def _numpy_data() -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s).astype(np.float32) for s in RESNET18_SHAPES]
    grads = [(rng.standard_normal(s) * 0.01).astype(np.float32) for s in RESNET18_SHAPES]
    return params, grads


def numpy_blocks(rounds: int) -> None:
    """NumPy's blocked path at 128K elements per block, the default and 256K (the bench's ``blocked``
    runner)."""
    params, grads = _numpy_data()
    default = recommended_options(adaptlr.adamw(), params)["block_size"]
    runners, peaks = [], {}
    for name, make in NUMPY_MAKERS.items():
        opt = make()
        if not (flat_safety(opt)[1] or sums_replayable(opt)):
            continue
        for block in (1 << 17, default, 1 << 18):
            fo = FlatOptimizer(opt, [p.copy() for p in params], block_size=block)
            fo.step(grads)
            label = f"{name}, {block >> 10}K blocks"
            peaks[label] = _tracemalloc_peak(lambda fo=fo: fo.step(grads))
            runners.append(Runner("resnet18", "numpy", label, "blocked", "adaptlr", lambda fo=fo: fo.step(grads)))
    words = int(3.5 * sum(math.prod(s) for s in RESNET18_SHAPES))
    src, dst = np.ones(words, dtype=np.float32), np.empty(words, dtype=np.float32)
    runners.append(Runner("resnet18", "numpy", "copy bound", "bound", "bound", lambda: np.copyto(dst, src)))
    time_runners(runners, rounds, warmup=2)
    bound = statistics.median(runners[-1].times)
    largest = max(math.prod(s) for s in RESNET18_SHAPES) * 4
    for runner in runners:
        q = statistics.quantiles(runner.times, n=4)
        median = statistics.median(runner.times)
        peak = peaks.get(runner.algorithm)
        extra = f"  peak {peak / 2**20:5.2f} MiB ({peak / largest:.2f}× largest)" if peak is not None else ""
        print(f"{runner.algorithm:28s} {median * 1e3:7.1f} ms ({q[0] * 1e3:.1f}-{q[2] * 1e3:.1f}) "
              f"{median / bound:5.2f}× bound{extra}")


def _eager_term(term: Term, make: Callable[[], object], ndim: int) -> None:
    term._make, term._value, term.ndim = None, make(), ndim


def _before_row_sums(build: Callable, opt: adaptlr.Optimizer) -> Callable[[], None]:
    """Round 20's row-block step: every sum term made when the step names it, every row sum made again
    in the second pass."""
    return _patched(build(opt), [(Term, "__init__", _eager_term),
                                 (part_sums.Recorder, "_own", lambda self, part: part())])


def _row_blocks_copied(build: Callable, opt: adaptlr.Optimizer) -> Callable[[], None]:
    """The row blocks' new state copied into the state, as before they donated it."""
    import contextlib
    import importlib

    adapter = importlib.import_module("adaptlr.backends.torch")
    return _patched(build(opt), [(adapter, "donating", lambda scalars, arrays: contextlib.nullcontext())])


def main(argv: list[str]) -> None:
    modes = {"numpy-blocks": numpy_blocks,
             "row-sums": lambda rounds: interleaved(pairs_with(_before_row_sums)(ROW_BLOCKED, _adapter), rounds),
             "row-donate": lambda rounds: interleaved(pairs_with(_row_blocks_copied)(ROW_BLOCKED, _adapter), rounds),
             "dsa-ops": lambda steps: ops(steps, ("dsa",))}
    run_mode(modes, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
