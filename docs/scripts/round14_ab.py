"""Interleaved A/B of round 14's changes (D-Adapt SGD over parts of the model; the epoch boundary
read on the host once per step), in one process.

    python docs/scripts/round14_ab.py dadapt-sgd ROUNDS  # D-Adapt SGD: whole lists (the torch adapter's
                                                         # default before round 14) and the default now
                                                         # (blocks), dadaptation.DAdaptSGD; words moved,
                                                         # aten ops and peak temporaries of each
    python docs/scripts/round14_ab.py boundary ROUNDS    # AdamW, ActiveLR, AutoDrop, torch adapter default:
                                                         # the boundary read per block (before) and once
                                                         # per step; torch.optim.AdamW(foreach)

ResNet-18 parameter shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import adaptlr

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved, run_mode  # the same timing loop as rounds 9 to 13
from round11_ab import WRAPPERS, _params
from round12_ab import _adapter, _foreach_adamw, _stepped


def _per_block_boundary(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` with the boundary read on the host in every part (``at_boundary`` without the step's
    scalars, as before round 14)."""
    modules = [sys.modules["adaptlr.active"], sys.modules["adaptlr.autodrop"]]

    def per_part(xp: object, pred: object, boundary: Callable, operands: tuple, scalars: object = None,
                 **options: object) -> tuple:
        return adaptlr._boundary.at_boundary(xp, pred, boundary, operands, **options)  # type: ignore[arg-type]

    def run() -> None:
        for module in modules:
            module.at_boundary = per_part  # type: ignore[attr-defined]
        try:
            step()
        finally:
            for module in modules:
                module.at_boundary = adaptlr._boundary.at_boundary  # type: ignore[attr-defined]

    return run


def dadapt_sgd(rounds: int) -> None:
    import torch

    from adaptlr.backends.bench import RESNET18_SHAPES, _torch_memory, _upstream_torch, step_costs

    n = sum(math.prod(s) for s in RESNET18_SHAPES)
    steps = {"dadapt_sgd, whole lists (fast=False)": _adapter(adaptlr.dadapt_sgd(), False),
             "dadapt_sgd, the default (blocks)": _adapter(adaptlr.dadapt_sgd())}
    upstream = _upstream_torch("dadapt_sgd")
    if upstream is not None:
        label, make = upstream
        steps[label] = _stepped(make(_params()))
    for label, step in steps.items():
        c = step_costs(step)
        print(f"{label:38s} {c.bytes / 4 / n:6.1f} words/param {c.launches:6d} aten ops "
              f"{(_torch_memory(torch, step, 'cpu') or 0) / 2**20:7.1f} MB peak temporaries")
    interleaved(steps, rounds)


def boundary(rounds: int) -> None:
    steps: dict = {"adamw": _adapter(WRAPPERS["adamw"]())}
    for name in ("active", "autodrop"):
        after = _adapter(WRAPPERS[name]())
        steps[f"{name}, boundary read per block"] = _per_block_boundary(after)
        steps[f"{name}, once per step"] = after
    interleaved({**steps, **_foreach_adamw()}, rounds)


def main(argv: list[str]) -> None:
    modes = {"dadapt-sgd": dadapt_sgd, "boundary": boundary}
    run_mode(modes, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
