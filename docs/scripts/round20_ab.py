"""Interleaved A/B of round 20's changes, in one process: torch's blocked step replays the aten
operations of a buffer's first writing block on its next blocks (``adaptlr.backends.block_tape``),
the products of a float64 sum are stored in float64 as they are made on torch's CPU
(``adaptlr._inplace.mul_for_sum``: no converted copy for the sum), and EG clips and exponentiates
its gains' exponent in place (``adaptlr._inplace.clip_``, ``exp_``).

    python docs/scripts/round20_ab.py calls              # Python and dispatch cost per step, 51 blocks of
                                                         # 1K elements (ResNet-18's block count), before/after
    python docs/scripts/round20_ab.py torch ROUNDS       # AdamW and the wrappers, torch adapter default
                                                         # path, before/after; torch.optim.AdamW(foreach)
    python docs/scripts/round20_ab.py lr-free ROUNDS     # the learning-rate-free bases, before/after, and
                                                         # their upstream PyTorch optimizers
    python docs/scripts/round20_ab.py blocks ROUNDS      # AdamW, HD and EG with replays at block sizes
                                                         # 64K-512K (the default: 256K on these shapes)
    python docs/scripts/round20_ab.py grouping ROUNDS    # HD and EG with replays: the first pass in
                                                         # groups of blocks (round 19) or block by block
    python docs/scripts/round20_ab.py widened ROUNDS     # HD, EG, Prodigy, DoG with replays: float32
                                                         # products (the sum converts a copy) or float64
    python docs/scripts/round20_ab.py ops STEPS          # AdamW, HD and EG, torch adapter default: time
                                                         # inside each aten operation, by operation

"Before" runs every block's step (``adaptlr.backends.fast.REPLAY_BLOCKS`` patched to False) with
float32 products (``adaptlr.backends.torch_fused.mul_widened`` patched to "not done") and EG's
clip and exp out of place (``torch_fused.clamp_``, ``exp_`` likewise): round 19's step. The
numbers are bit for bit the same either way (``tests/test_block_tape.py``, ``tests/test_inplace.py``).
ResNet-18 parameter shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import adaptlr

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 20
from round11_ab import WRAPPERS
from round12_ab import _adapter, interleaved, modes, pairs_with

WRAPPERS = {**WRAPPERS, "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))}
CALLS = {**{k: WRAPPERS[k] for k in ("adamw", "active", "hypergradient", "eg_step_size")},
         "prodigy": adaptlr.prodigy, "dadapt_adam": adaptlr.dadapt_adam, "dog": adaptlr.dog}


def _patched(step: Callable[[], object], changes: list[tuple[object, str, object]]) -> Callable[[], None]:
    """``step`` run with each ``(module, name, value)`` of ``changes`` set, and restored after."""

    def run() -> None:
        saved = [(module, name, getattr(module, name)) for module, name, _ in changes]
        for module, name, value in changes:
            setattr(module, name, value)
        try:
            step()
        finally:
            for module, name, value in saved:
                setattr(module, name, value)

    return run


def _every_block(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` as round 19 ran it: every block runs the step (no replays), the products of a
    float64 sum stay float32 (the sum converts a copy), EG's clip and exp write new tensors."""
    from adaptlr.backends import fast, torch_fused

    return _patched(step, [(fast, "REPLAY_BLOCKS", False), (torch_fused, "mul_widened", lambda *args: None),
                           (torch_fused, "clamp_", lambda *args: False), (torch_fused, "exp_", lambda *args: False)])


def _before(build: Callable, opt: adaptlr.Optimizer) -> Callable[[], None]:
    return _every_block(build(opt))


def calls() -> None:
    """The step's time with 51 blocks of 1,024 elements: the per-block cost, not the arithmetic."""
    import torch

    from adaptlr.backends import fast

    for name, make in CALLS.items():
        for is_before in (True, False):
            params, grads = [torch.zeros(51 << 10)], [torch.full((51 << 10,), 0.01)]
            fo = fast.FlatOptimizer(make(), params, block_size=1 << 10)

            def step(fo: fast.FlatOptimizer = fo, params: list = params, grads: list = grads) -> None:
                fo.step_on(params, grads)

            run = _every_block(step) if is_before else step
            for _ in range(5):
                run()
            totals = []
            for _ in range(9):
                start = time.perf_counter()
                for _ in range(20):
                    run()
                totals.append((time.perf_counter() - start) / 20)
            print(f"{name:14s} {'before' if is_before else 'after ':6s} step {statistics.median(totals) * 1e3:6.2f} ms"
                  f"  ({statistics.median(totals) / 51 * 1e6:5.1f} µs per block; medians of 9 x 20 steps)")


def blocks(rounds: int) -> None:
    """AdamW, HD and EG on the torch adapter's blocked path at several block sizes (replays on)."""
    steps = {}
    for name in ("adamw", "hypergradient", "eg_step_size"):
        for size in (16, 17, 18, 19):
            steps[f"{name}, {1 << (size - 10)}K blocks"] = _adapter(WRAPPERS[name](), {"block_size": 1 << size})
    interleaved(steps, rounds)


def _block_by_block(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` with the first pass of HD and EG one block per call (each replayed), not in groups."""
    from adaptlr.backends import fast

    return _patched(step, [(fast, "sums_before_direction", lambda opt: False)])


def grouping(rounds: int) -> None:
    steps = {}
    for name in ("adamw", "hypergradient", "eg_step_size"):
        steps[f"{name}, groups"] = _adapter(WRAPPERS[name]())
        steps[f"{name}, block by block"] = _block_by_block(_adapter(WRAPPERS[name]()))
    interleaved(steps, rounds)


def _narrow(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` with the products of its float64 sums in float32 (the sums convert a copy of each)."""
    from adaptlr.backends import torch_fused

    return _patched(step, [(torch_fused, "mul_widened", lambda *args: None)])


def widened(rounds: int) -> None:
    makers = {"hypergradient": WRAPPERS["hypergradient"], "eg_step_size": WRAPPERS["eg_step_size"],
              "prodigy": adaptlr.prodigy, "dog": adaptlr.dog}
    steps = {}
    for name, make in makers.items():
        steps[f"{name}, float32 products"] = _narrow(_adapter(make()))
        steps[f"{name}, float64 products"] = _adapter(make())
    interleaved(steps, rounds)


def timed_ops() -> object:
    """A ``TorchDispatchMode`` that times each aten operation's call by name (``spent``, ``calls``;
    ``elements``: the largest input's elements of each full-size one that computes). The mode's own
    Python is outside the timed call, but a step runs slower under it."""
    import collections

    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Timed(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.spent: collections.Counter = collections.Counter()
            self.calls: collections.Counter = collections.Counter()
            self.elements: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            start = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            sizes = [a.numel() for a in args if isinstance(a, torch.Tensor)]
            key = func.overloadpacket.__name__ + ("" if max(sizes, default=0) > 1 else " (0-D)")
            self.spent[key] += time.perf_counter() - start
            self.calls[key] += 1
            if not key.endswith("(0-D)") and key not in ("slice", "view", "detach", "empty_like"):
                self.elements[key] += max(sizes, default=0)
            return out

    return Timed()


def time_ops(step: Callable[[], object], steps: int) -> Any:
    """``step`` run twice, then ``steps`` times under :func:`timed_ops`; the mode, with its counts."""
    for _ in range(2):
        step()
    timed: Any = timed_ops()
    with timed:
        for _ in range(steps):
            step()
    return timed


def ops(steps: int, names: tuple[str, ...] = ("adamw", "hypergradient", "eg_step_size")) -> None:
    """Where a step's time goes by aten operation (:func:`timed_ops`)."""
    for name in names:
        timed = time_ops(_adapter(WRAPPERS[name]()), steps)
        print(f"{name}: {sum(timed.spent.values()) / steps * 1e3:.1f} ms per step inside aten operations")
        for key, seconds in timed.spent.most_common(8):
            print(f"  {key:20s} {seconds / steps * 1e3:6.2f} ms  {timed.calls[key] // steps:4d} calls")


def main(argv: list[str]) -> None:
    all_modes = modes(pairs_with(_before), lambda: None, WRAPPERS, lambda opt: None, {})
    all_modes["calls"] = calls
    all_modes["blocks"] = blocks
    all_modes["grouping"] = grouping
    all_modes["widened"] = widened
    all_modes["ops"] = ops
    for unchanged in ("costs", "numpy", "foreach"):  # the same operations; NumPy and foreach take no replays
        del all_modes[unchanged]
    run_mode(all_modes, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
