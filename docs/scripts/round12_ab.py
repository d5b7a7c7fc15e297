"""Interleaved A/B of round 12's change (arithmetic into the step's own temporaries), in one process.

    python docs/scripts/round12_ab.py costs              # words moved per parameter (and of them into new
                                                         # tensors) and aten ops per step; the upstreams
    python docs/scripts/round12_ab.py torch ROUNDS       # AdamW and the wrappers, torch adapter default
                                                         # path, out of place (before) and in place
                                                         # (after); torch.optim.AdamW(foreach)
    python docs/scripts/round12_ab.py lr-free ROUNDS     # Prodigy, D-Adapt Adam, DoG: the torch adapter's
                                                         # default before/after, the upstream
    python docs/scripts/round12_ab.py numpy ROUNDS       # AdamW and the wrappers, NumPy update + apply_updates
    python docs/scripts/round12_ab.py foreach ROUNDS     # the foreach path (the GPU default) on the CPU

"Before" runs the same code with ``adaptlr._inplace._fits`` patched to refuse every in-place
operation, so each helper computes out of place as the code did before. ResNet-18 parameter shapes,
float32; each round runs every variant once in a fresh random order
(``adaptlr.backends.bench.time_runners``); prints the median step time and its quartiles.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import adaptlr
import adaptlr._inplace

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from round9_ab import interleaved, run_mode  # the same timing loop as rounds 9 to 11
from round11_ab import LR_FREE, WRAPPERS, _params

WRAPPERS = {**WRAPPERS, "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))}


def _out_of_place(step: Callable[[], object]) -> Callable[[], None]:
    """``step`` with every in-place helper computing out of place (the code before round 12)."""
    fits = adaptlr._inplace._fits

    def run() -> None:
        adaptlr._inplace._fits = lambda a, b: False
        try:
            step()
        finally:
            adaptlr._inplace._fits = fits

    return run


def _adapter(opt: adaptlr.Optimizer, fast: object = "auto") -> Callable[[], None]:
    from adaptlr.backends.torch import Optimizer

    adapter = Optimizer(_params(), opt, fast=fast)
    adapter.step()
    return adapter.step


def _numpy(opt: adaptlr.Optimizer) -> Callable[[], None]:
    import numpy as np

    rng = np.random.default_rng(0)
    params = [p.detach().numpy().copy() for p in _params()]
    grads = [(rng.standard_normal(p.shape) * 0.01).astype(np.float32) for p in params]
    box = {"params": params, "state": opt.init(params)}

    def step() -> None:
        updates, box["state"] = opt.update(grads, box["state"], box["params"])
        box["params"] = adaptlr.apply_updates(box["params"], updates)

    step()
    return step


def pairs_with(before: Callable[[Callable, adaptlr.Optimizer], Callable]) -> Callable[[dict, Callable], dict]:
    """``pairs(makers, build)``: each maker's step built by ``build`` as the round's change left it
    ("after") and as ``before(build, opt)`` builds it ("before")."""

    def pairs(makers: dict, build: Callable) -> dict:
        steps = {}
        for name, make in makers.items():
            steps[f"{name}, before"] = before(build, make())
            steps[f"{name}, after"] = build(make())
        return steps

    return pairs


def costs_with(before: Callable[[Callable, adaptlr.Optimizer], Callable]) -> Callable[[], None]:
    """The ``costs`` mode: ``bench.step_costs`` of one torch adapter step (default path), before
    (``before(_adapter, opt)``) and after (deterministic); ``torch.optim`` and the upstreams."""

    def costs() -> None:
        from adaptlr.backends.bench import RESNET18_SHAPES, step_costs

        n = sum(math.prod(s) for s in RESNET18_SHAPES)
        for name, make in {**WRAPPERS, **LR_FREE}.items():
            for is_before in (True, False):
                c = step_costs(before(_adapter, make()) if is_before else _adapter(make()))
                print(f"{name:14s} {'before' if is_before else 'after ':6s} {c.bytes / 4 / n:6.1f} words/param "
                      f"{c.fresh / 4 / n:6.1f} of them into new tensors {c.launches:6d} aten ops")
        for label, step in {**_foreach_adamw(), **_upstreams()}.items():
            c = step_costs(step)
            print(f"{label:28s} {c.bytes / 4 / n:6.1f} words/param {c.fresh / 4 / n:6.1f} of them into new "
                  f"tensors {c.launches:6d} aten ops")

    return costs


def _before(build: Callable, opt: adaptlr.Optimizer) -> Callable:
    return _out_of_place(build(opt))


def _stepped(optimizer: object) -> Callable[[], object]:
    optimizer.step()  # type: ignore[attr-defined]
    return optimizer.step  # type: ignore[attr-defined]


def _foreach_adamw() -> dict:
    import torch

    return {"torch.optim.AdamW(foreach)": _stepped(torch.optim.AdamW(_params(), lr=1e-3, weight_decay=0.01,
                                                                    foreach=True))}


def _upstreams() -> dict:
    """The upstream PyTorch optimizer of each learning-rate-free base (those installed), stepped once."""
    from adaptlr.backends.bench import _upstream_torch

    found = [_upstream_torch(name) for name in LR_FREE]
    return {label: _stepped(make(_params())) for label, make in (u for u in found if u is not None)}


def modes(pairs: Callable[[dict, Callable], dict], costs: Callable[[], None], wrappers: dict,
          numpy_build: Callable, numpy_makers: dict) -> dict:
    """The timing modes of a round's A/B script, with its own ``pairs(makers, build)`` (each maker's
    step before and after the round's change): ``torch`` (the wrappers on the torch adapter's default
    path, ``torch.optim.AdamW(foreach)``), ``lr-free`` (the learning-rate-free bases, their upstreams),
    ``numpy`` (``numpy_build`` of ``numpy_makers``), ``foreach`` (the GPU default path on the CPU)."""
    foreach_makers = {k: wrappers[k] for k in ("adamw", "active", "eg_step_size")}
    return {
        "costs": costs,
        "torch": lambda rounds: interleaved({**pairs(wrappers, _adapter), **_foreach_adamw()}, rounds),
        "lr-free": lambda rounds: interleaved({**pairs(LR_FREE, _adapter), **_upstreams()}, rounds),
        "numpy": lambda rounds: interleaved(pairs(numpy_makers, numpy_build), rounds),
        "foreach": lambda rounds: interleaved(
            {**pairs(foreach_makers, lambda opt: _adapter(opt, "foreach")), **_foreach_adamw()}, rounds),
    }


def main(argv: list[str]) -> None:
    run_mode(modes(pairs_with(_before), costs_with(_before), WRAPPERS, _numpy, WRAPPERS), argv, __doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
