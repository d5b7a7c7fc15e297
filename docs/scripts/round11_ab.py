"""Interleaved A/B of round 11's changes, in one process (docs/performance.md, round 11).

    python docs/scripts/round11_ab.py costs               # words moved per parameter and aten ops per step
    python docs/scripts/round11_ab.py wrappers ROUNDS     # AdamW, ActiveLR, AutoDrop, HD, EG: the torch
                                                          # adapter's blocks with copies (before) and on the
                                                          # parameters' own storage (after), foreach AdamW
    python docs/scripts/round11_ab.py lr-free ROUNDS      # Prodigy, D-Adapt Adam, DoG: the list path (the
                                                          # default before), blocks as before (copies, 0-D
                                                          # work per block), blocks now, the upstream

"Before" is round 10's code path, rebuilt here: the adapter copied every parameter and gradient into
its flat buffers before a blocked step and the parameters out after it (``FlatOptimizer.step`` on
the flat buffers, patched into the instance's ``step_on``), and each block repeated the step's 0-D
work (``Scalars.once`` patched to compute every time, for that step only). ResNet-18 parameter
shapes, float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import adaptlr
from adaptlr.core import Scalars

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved, run_mode  # the same timing loop as rounds 9 and 10

WRAPPERS: dict[str, Callable[[], adaptlr.Optimizer]] = {
    "adamw": lambda: adaptlr.adamw(1e-3, weight_decay=0.01),
    "active": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100),
    "autodrop": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100),
    "hypergradient": lambda: adaptlr.hypergradient(adaptlr.adamw(1e-3), hyper_lr=1e-8),
    "eg_step_size": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-3), scale_lr=1e-3, gain_lr=1e-3),
}
LR_FREE: dict[str, Callable[[], adaptlr.Optimizer]] = {
    "prodigy": adaptlr.prodigy, "dadapt_adam": adaptlr.dadapt_adam, "dog": adaptlr.dog}


def _params() -> list:
    import torch

    from adaptlr.backends.bench import RESNET18_SHAPES

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in RESNET18_SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape) * 0.01
    return params


def _adapter(opt: adaptlr.Optimizer, fast: object = "auto", before: bool = False) -> Callable[[], None]:
    """The torch adapter's step; ``before``: round 10's blocked step (copies, 0-D work per block)."""
    import torch

    from adaptlr.backends.torch import Optimizer

    adapter = Optimizer(_params(), opt, fast=fast)
    adapter.step()
    if not before:
        return adapter.step
    assert adapter.fast_path == "blocked", adapter.fast_path
    fo = adapter._flat.fo

    def step_with_copies(params, grads, *, alpha=None, weight_decay=None) -> None:
        torch._foreach_copy_(fo.params, params)
        torch._foreach_copy_(fo.grads, grads)
        fo.step(None, alpha=alpha, weight_decay=weight_decay)
        torch._foreach_copy_(params, fo.params)

    fo.step_on = step_with_copies

    def step() -> None:
        kept = Scalars.once
        Scalars.once = lambda self, key, inputs, make: make(*inputs)  # every block computes it
        try:
            adapter.step()
        finally:
            Scalars.once = kept

    step()
    return step


def costs() -> None:
    """``bench.step_costs`` of one step, before and after (deterministic)."""
    from adaptlr.backends.bench import RESNET18_SHAPES, step_costs

    n = sum(math.prod(s) for s in RESNET18_SHAPES)
    cases = [(name, make, "auto") for name, make in WRAPPERS.items()]
    cases += [(name, make, {"block_size": 147456}) for name, make in LR_FREE.items()]
    for name, make, fast in cases:
        for before in (True, False):
            c = step_costs(_adapter(make(), fast, before))
            print(f"{name:14s} {'before' if before else 'after ':6s} {c.bytes / 4 / n:6.1f} words/param "
                  f"{c.launches:6d} aten ops")
    for name, make in LR_FREE.items():
        c = step_costs(_adapter(make(), False))
        print(f"{name:14s} list   {c.bytes / 4 / n:6.1f} words/param {c.launches:6d} aten ops")


def wrappers(rounds: int) -> None:
    import torch

    steps = {}
    for name, make in WRAPPERS.items():
        steps[f"{name}, before"] = _adapter(make(), before=True)
        steps[f"{name}, after"] = _adapter(make())
    native = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=0.01, foreach=True)
    native.step()
    steps["torch.optim.AdamW(foreach)"] = native.step
    interleaved(steps, rounds)


def lr_free(rounds: int) -> None:
    from adaptlr.backends.bench import _upstream_torch

    steps = {}
    for name, make in LR_FREE.items():
        steps[f"{name}, list"] = _adapter(make(), False)
        steps[f"{name}, blocks before"] = _adapter(make(), {"block_size": 147456}, before=True)
        steps[f"{name}, blocks after"] = _adapter(make())
        upstream = _upstream_torch(name)
        if upstream is not None:
            native = upstream[1](_params())
            native.step()
            steps[f"{name}, {upstream[0]}"] = native.step
    interleaved(steps, rounds)


def main(argv: list[str]) -> None:
    modes = {"costs": costs, "wrappers": wrappers, "lr-free": lr_free}
    run_mode(modes, argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
