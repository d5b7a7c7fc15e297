"""Interleaved A/B of round 18's change (torch's fused forms of the step's multiply-adds and moving
averages, ``adaptlr.backends.torch_fused``), in one process.

    python docs/scripts/round18_ab.py costs              # words moved per parameter (and of them into new
                                                         # tensors) and aten ops per step, before/after;
                                                         # torch.optim and the upstreams (deterministic)
    python docs/scripts/round18_ab.py torch ROUNDS       # AdamW and the wrappers, torch adapter default
                                                         # path, before/after; torch.optim.AdamW(foreach)
    python docs/scripts/round18_ab.py lr-free ROUNDS     # the learning-rate-free bases on the torch
                                                         # adapter's default path, before/after; upstreams
    python docs/scripts/round18_ab.py foreach ROUNDS     # the foreach path (the GPU default) on the CPU

"Before" runs the standard array-API forms, as round 17 did: ``torch_fused.add_scaled_``,
``add_product_`` and ``lerp`` patched to "not done" (``adaptlr._inplace`` then computes ``c·y`` and
the sum, ``x·y``, ``·c`` and the sum, ``β·x`` and ``+ (1-β)·y``: round 17's operations). ResNet-18
parameter shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import adaptlr

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import run_mode  # the command line of rounds 11 to 18
from round11_ab import WRAPPERS
from round12_ab import costs_with, modes, pairs_with

WRAPPERS = {**WRAPPERS, "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))}


def _unfused(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` with torch's fused forms switched off (the module docstring)."""
    from adaptlr.backends import torch_fused

    saved = (torch_fused.add_scaled_, torch_fused.add_product_, torch_fused.lerp)

    def run() -> None:
        torch_fused.add_scaled_ = torch_fused.add_product_ = lambda *args: False  # type: ignore[assignment]
        torch_fused.lerp = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            step()
        finally:
            torch_fused.add_scaled_, torch_fused.add_product_, torch_fused.lerp = saved  # type: ignore[assignment]

    return run


def _before(build: Callable, opt: adaptlr.Optimizer) -> Callable[[], None]:
    return _unfused(build(opt))


def main(argv: list[str]) -> None:
    all_modes = modes(pairs_with(_before), costs_with(_before), WRAPPERS, None, {})  # type: ignore[arg-type]
    del all_modes["numpy"]  # NumPy has no fused forms: its numbers and operations are round 17's
    run_mode(all_modes, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
