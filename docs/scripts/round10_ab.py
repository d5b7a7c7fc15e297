"""Interleaved A/B timing of round 10's EG change, in one process (docs/performance.md, round 10).

    python docs/scripts/round10_ab.py ROUNDS [torch|numpy]
    python docs/scripts/round10_ab.py costs      # words moved per parameter and aten ops per step
    python docs/scripts/round10_ab.py parts ROUNDS   # DSA(AdamW) on 500 tensors of 32x64, torch adapter
                                                     # default: one part per tensor (before) and parts of
                                                     # LIST_PART_MIN_ELEMENTS (after)

EG(AdamW) as before round 10 (the exponent clipped by ``xp.maximum`` then ``xp.minimum``; ``s·p``
formed at full size, then ``α·(s·p)``) and as now (one ``xp.clip``; ``s`` kept apart from ``p``, so
the step is ``v_t·(-s)``, handed to the update), with AdamW for the ratio: through the torch adapter's default path
(default) or NumPy's functional ``update`` + ``apply_updates``. ResNet-18 parameter shapes, float32,
fixed random gradients; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time, its quartiles and the ratio
to AdamW.
"""

from __future__ import annotations

import statistics
import sys

import adaptlr
from adaptlr.core import StepContext, StepSize
from adaptlr.eg import EGState, EGStepSize

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import _numpy_functional, _torch_adapter, interleaved  # the same set-up as round 9

from adaptlr.backends.bench import Runner, time_runners


class BeforeRound10(EGStepSize):
    """EG as before round 10: a two-op clip, and ``s·p`` handed to the step as one full-size factor."""

    def _clip(self, ctx: StepContext, exponent):
        if self.max_log_step is None:
            return exponent
        high = ctx.scalars.constant(self.max_log_step, exponent.dtype)
        low = ctx.scalars.constant(-self.max_log_step, exponent.dtype)
        return ctx.xp.minimum(ctx.xp.maximum(exponent, low), high)

    def step(self, ctx: StepContext, size: StepSize, state: EGState):  # round 9's EGStepSize.step
        xp, layout, scalars = ctx.xp, ctx.layout, ctx.scalars
        grads = ctx.objective_grads
        gains = [p * xp.exp(self._clip(ctx, scalars.constant(self.gain_lr, g.dtype) * m * g))
                 for p, m, g in zip(layout.leaves(state.gain, "gain"), layout.leaves(state.grad_ema, "ema"), grads)]
        if self.scale == "global":
            by_dtype = {dt: xp.astype(state.scale, dt) for dt in {g.dtype for g in grads}}
            scales = [by_dtype[g.dtype] for g in grads]
        else:
            scales = layout.leaves(state.scale, "state.scale")
        prev_steps = [a * p * d for a, p, d in zip(size.effective(), gains, ctx.directions)]
        beta = self.gain_decay
        grad_emas = [scalars.constant(beta, g.dtype) * m + scalars.constant(1.0 - beta, g.dtype) * g
                     for m, g in zip(layout.leaves(state.grad_ema, "ema"), grads)]
        new_state = EGState(state.scale, layout.tree(gains), layout.tree(grad_emas), layout.tree(prev_steps))
        factors = [s * p for s, p in zip(scales, gains)]  # s·p at full size, then α·(s·p) in the update
        return size.scaled(factors, weight_decay_too=self.scale_weight_decay), new_state


def _eg(before: bool) -> adaptlr.Optimizer:
    opt = adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), scale_lr=1e-3, gain_lr=1e-3)
    if before:
        opt.adaptations[-1].__class__ = BeforeRound10
    return opt


def costs() -> None:
    """``bench.step_costs`` of one step through the torch adapter's default path (deterministic)."""
    import torch

    from adaptlr.backends.bench import RESNET18_SHAPES, step_costs
    from adaptlr.backends.torch import Optimizer

    n = sum(torch.Size(s).numel() for s in RESNET18_SHAPES)
    cases = {"adamw": lambda: adaptlr.adamw(1e-3, weight_decay=0.01),
             "eg, before round 10": lambda: _eg(True), "eg, round 10": lambda: _eg(False),
             "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))}
    for name, make in cases.items():
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in RESNET18_SHAPES]
        for p in params:
            p.grad = torch.randn(p.shape) * 0.1
        adapter = Optimizer(params, make())
        adapter.step()
        c = step_costs(adapter.step)
        print(f"{name:22s} {adapter.fast_path:5s} {c.bytes / 4 / n:6.1f} words/param {c.launches:6d} aten ops")


def parts(rounds: int) -> None:
    """The list step's parts on small tensors, before (one per tensor) and after (at least the minimum)."""
    import torch

    from adaptlr.backends import torch as torch_adapter
    from adaptlr.backends.bench import SMALL_SHAPES, count_aten_ops

    def adapter(minimum: int):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in SMALL_SHAPES]
        for p in params:
            p.grad = torch.randn(p.shape) * 0.1
        opt = torch_adapter.Optimizer(params, adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01)))
        kept = torch_adapter.LIST_PART_MIN_ELEMENTS

        def step() -> None:
            torch_adapter.LIST_PART_MIN_ELEMENTS = minimum
            try:
                opt.step()
            finally:
                torch_adapter.LIST_PART_MIN_ELEMENTS = kept

        step()
        print(f"minimum {minimum:7d}: {count_aten_ops(step)} aten ops per step")
        return step

    steps = {"dsa, a part per tensor": adapter(1),
             "dsa, parts of the minimum": adapter(torch_adapter.LIST_PART_MIN_ELEMENTS)}
    interleaved(steps, rounds)


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
    if argv[0] == "costs":
        costs()
        return
    if argv[0] == "parts":
        parts(int(argv[1]))
        return
    rounds = int(argv[0])
    make = _numpy_functional if len(argv) > 1 and argv[1] == "numpy" else _torch_adapter
    steps = {"adamw": make(adaptlr.adamw(1e-3, weight_decay=0.01)),
             "eg, before round 10": make(_eg(True)),
             "eg, round 10": make(_eg(False))}
    runners = [Runner("resnet18", "", name, "", "adaptlr", step) for name, step in steps.items()]
    time_runners(runners, rounds, warmup=2)
    base = statistics.median(runners[0].times)
    for runner in runners:
        q = statistics.quantiles(runner.times, n=4)
        median = statistics.median(runner.times)
        print(f"{runner.algorithm:22s} {median * 1e3:7.1f} ms ({q[0] * 1e3:.1f}-{q[2] * 1e3:.1f})  "
              f"x{median / base:.2f} adamw")


if __name__ == "__main__":
    main(sys.argv[1:])
