"""Interleaved A/B timings of round 9's changes, in one process (docs/performance.md, round 9).

    python docs/scripts/round9_ab.py adam torch|numpy ROUNDS   # Adam's direction in five passes (before)
                                                               # and four (after): torch adapter default,
                                                               # NumPy functional update + apply_updates
    python docs/scripts/round9_ab.py dsa ROUNDS                # DSA(AdamW) through the torch adapter: whole
                                                               # tensors (fast=False), row blocks (the default),
                                                               # and AdamW's default for the ratio

ResNet-18 parameter shapes, float32, fixed random gradients; each round runs every variant once in
a fresh random order (`adaptlr.backends.bench.time_runners`); prints the median step time and its quartiles.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable

import numpy as np

import adaptlr
from adaptlr.adam import AdamDirection, AdamState
from adaptlr.backends.bench import RESNET18_SHAPES, Runner, time_runners


class FivePasses(AdamDirection):
    """Adam's direction as before round 9: ``(m·inv_bc1) / (sqrt(v)·inv_sqrt_bc2 + ε)``."""

    flat_safe = True  # takes the same fast paths as the kept direction

    def direction(self, grads, state, scalars, layout):
        xp, b1, b2, eps = scalars.xp, self.b1, self.b2, self.eps

        def corrections(t):
            return 1.0 / (1.0 - b1**t), 1.0 / xp.sqrt(1.0 - b2**t)

        mus, nus, directions = [], [], []
        for g, m, nu in zip(grads, layout.leaves(state.mu, "state.mu"), layout.leaves(state.nu, "state.nu")):
            inv_bc1, inv_sqrt_bc2 = scalars.step_scalars("adam-five-passes", g.dtype, corrections)
            m = b1 * m + (1.0 - b1) * g
            nu = b2 * nu + (1.0 - b2) * (g * g)
            directions.append((m * inv_bc1) / (xp.sqrt(nu) * inv_sqrt_bc2 + eps))
            mus.append(m)
            nus.append(nu)
        return directions, AdamState(layout.tree(mus), layout.tree(nus))


def _adamw(five_passes: bool) -> adaptlr.Optimizer:
    opt = adaptlr.adamw(1e-3, weight_decay=0.01)
    if five_passes:
        opt.base.__class__ = FivePasses
    return opt


def _torch_adapter(opt: adaptlr.Optimizer, fast=None, part_elements=None) -> Callable[[], None]:
    import torch

    from adaptlr.backends.torch import Optimizer

    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in RESNET18_SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape) * 0.1
    adapter = Optimizer(params, opt) if fast is None else Optimizer(params, opt, fast=fast)
    adapter.list_part_elements = part_elements
    return adapter.step


def _numpy_functional(opt: adaptlr.Optimizer) -> Callable[[], None]:
    rng = np.random.default_rng(0)
    params = [rng.standard_normal(s, dtype=np.float32) * 0.1 for s in RESNET18_SHAPES]
    grads = [rng.standard_normal(s, dtype=np.float32) * 0.1 for s in RESNET18_SHAPES]
    box = [opt.init(params), params]

    def run() -> None:
        updates, box[0] = opt.update(grads, box[0], box[1])
        box[1] = adaptlr.apply_updates(box[1], updates)

    return run


def interleaved(steps: dict, rounds: int) -> None:
    """``adaptlr bench``'s interleaved timing (two warm-up rounds) of each ``name: step``."""
    runners = [Runner("resnet18", "", name, "", "adaptlr", step) for name, step in steps.items()]
    time_runners(runners, rounds, warmup=2)
    for runner in runners:
        q = statistics.quantiles(runner.times, n=4)
        print(f"{runner.algorithm:34s} {statistics.median(runner.times) * 1e3:7.1f} ms "
              f"({q[0] * 1e3:.1f}-{q[2] * 1e3:.1f})")


def run_mode(modes: dict, argv: list[str], usage: str | None) -> None:
    """``modes[argv[0]](*int(argv[1:]))``: the command line of the A/B scripts (``usage``, their
    docstring, where the mode is missing or unknown)."""
    if not argv or argv[0] not in modes:
        raise SystemExit(usage)
    modes[argv[0]](*(int(a) for a in argv[1:]))


def main(argv: list[str]) -> None:
    if argv[0] == "adam":
        backend, rounds = argv[1], int(argv[2])
        make = _torch_adapter if backend == "torch" else _numpy_functional
        interleaved({f"{backend} before (5 passes)": make(_adamw(True)),
                     f"{backend} after (4 passes)": make(_adamw(False))}, rounds)
    elif argv[0] == "dsa":
        def dsa() -> adaptlr.Optimizer:
            return adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))

        interleaved({"dsa, whole tensors (fast=False)": _torch_adapter(dsa(), fast=False),
                     "dsa, row blocks (the default)": _torch_adapter(dsa()),
                     "adamw, the default": _torch_adapter(_adamw(False))}, int(argv[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
