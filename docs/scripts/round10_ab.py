"""Interleaved A/B timing of round 10's EG change, in one process (docs/performance.md, round 10).

    python docs/scripts/round10_ab.py ROUNDS [torch|numpy]

EG(AdamW) as before round 10 (the exponent clipped by ``xp.maximum`` then ``xp.minimum``; ``s·p``
formed at full size, then ``α·(s·p)``) and as now (one ``xp.clip``; ``s`` kept apart from ``p``, so
the step is ``((-α·s)·p)·d``), with AdamW for the ratio: through the torch adapter's default path
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
from round9_ab import _numpy_functional, _torch_adapter  # the same set-up as round 9

from adaptlr.backends.bench import Runner, time_runners


class BeforeRound10(EGStepSize):
    """EG as before round 10: a two-op clip, and ``s·p`` handed to the step as one full-size factor."""

    def _clip(self, ctx: StepContext, exponent):
        if self.max_log_step is None:
            return exponent
        high = ctx.scalars.constant(self.max_log_step, exponent.dtype)
        low = ctx.scalars.constant(-self.max_log_step, exponent.dtype)
        return ctx.xp.minimum(ctx.xp.maximum(exponent, low), high)

    def step(self, ctx: StepContext, size: StepSize, state: EGState):
        new_size, new_state = super().step(ctx, StepSize.of(size.alpha), state)
        # super() scaled a fresh size (EG wraps a plain base here: κ_in = 1) by s (0-D) and p;
        # their product at full size, as before
        factors = [s * p for s, p in zip(new_size.scale, new_size.kappa, strict=True)]
        return size.scaled(factors, weight_decay_too=self.scale_weight_decay), new_state


def _eg(before: bool) -> adaptlr.Optimizer:
    opt = adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), scale_lr=1e-3, gain_lr=1e-3)
    if before:
        opt.adaptations[-1].__class__ = BeforeRound10
    return opt


def main(argv: list[str]) -> None:
    if not argv:
        raise SystemExit(__doc__)
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
