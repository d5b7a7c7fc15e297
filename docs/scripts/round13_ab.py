"""Interleaved A/B of round 13's change (the state donated to the parts of a step; the step's 0-D
rate and decay factors once per step), in one process.

    python docs/scripts/round13_ab.py costs              # words moved per parameter (and of them into new
                                                         # tensors) and aten ops per step, before/after;
                                                         # torch.optim and the upstreams
    python docs/scripts/round13_ab.py torch ROUNDS       # AdamW and the wrappers, torch adapter default
                                                         # path, before/after; torch.optim.AdamW(foreach)
    python docs/scripts/round13_ab.py lr-free ROUNDS     # Prodigy, D-Adapt Adam, DoG: the torch adapter's
                                                         # default before/after, the upstream
    python docs/scripts/round13_ab.py numpy ROUNDS       # AdamW and the wrappers, NumPy blocked path
    python docs/scripts/round13_ab.py foreach ROUNDS     # the foreach path (the GPU default) on the CPU

"Before" runs the same code as round 12 did: nothing donated (``adaptlr.Optimizer.donation_safe``
patched to False: each part's new state is copied back into the executor's buffers) and the 0-D
factors ``-α·scale·κ`` and ``α·κ^decay·λ`` computed per part (``adaptlr.core._negative_rate`` and
``_decay_times`` patched to their round-12 form), on round 12's blocks (144K elements on ResNet-18
shapes, ``fast.CPU_BLOCK_LIVE_TEMPORARIES = 16`` when the adapter is built). ResNet-18 parameter
shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import adaptlr
import adaptlr.core
from adaptlr._inplace import mul_

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 14
from round11_ab import WRAPPERS, _params
from round12_ab import costs_with, modes, pairs_with

WRAPPERS = {**WRAPPERS, "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))}


def _round12_negative_rate(scalars: object, alpha: object, scale: object, kappa: object) -> object:
    times = adaptlr.core._times
    return times(times(-alpha, scale), kappa)  # type: ignore[operator]


def _round12_decay_times(scalars: object, alpha: object, decay_kappa: object, lam: float, p: object) -> object:
    return mul_(adaptlr.core._times(alpha, decay_kappa) * lam, p)  # type: ignore[operator]


def _before(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` as round 12 ran it (see the module docstring)."""
    core = adaptlr.core
    saved = (core.Optimizer.donation_safe, core._negative_rate, core._decay_times)

    def run() -> None:
        core.Optimizer.donation_safe = property(lambda self: False)  # type: ignore[assignment]
        core._negative_rate, core._decay_times = _round12_negative_rate, _round12_decay_times
        try:
            step()
        finally:
            core.Optimizer.donation_safe, core._negative_rate, core._decay_times = saved  # type: ignore[misc]

    return run


def _numpy_blocked(opt: adaptlr.Optimizer) -> Callable[[], None]:
    import numpy as np

    from adaptlr.backends.fast import FlatOptimizer, recommended_options

    rng = np.random.default_rng(0)
    params = [p.detach().numpy().copy() for p in _params()]
    grads = [(rng.standard_normal(p.shape) * 0.01).astype(np.float32) for p in params]
    flat = FlatOptimizer(opt, params, **(recommended_options(opt, params) or {}))
    flat_grads = flat.grads
    for g, view in zip(grads, flat_grads):
        view[...] = g.reshape(view.shape)

    def step() -> None:
        flat.step(flat_grads)

    step()
    return step


def _built_before(build: Callable, opt: adaptlr.Optimizer) -> Callable[[], None]:
    """``build(opt)`` with round 12's block size (16 block temporaries in the largest tensor: 144K
    on ResNet-18 shapes), stepped as round 12 stepped."""
    from adaptlr.backends import fast

    saved = fast.CPU_BLOCK_LIVE_TEMPORARIES
    fast.CPU_BLOCK_LIVE_TEMPORARIES = 16
    try:
        return _before(build(opt))
    finally:
        fast.CPU_BLOCK_LIVE_TEMPORARIES = saved


def main(argv: list[str]) -> None:
    numpy_makers = {k: v for k, v in WRAPPERS.items() if k != "dsa"}
    run_mode(modes(pairs_with(_built_before), costs_with(_built_before), WRAPPERS, _numpy_blocked, numpy_makers),
             argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
