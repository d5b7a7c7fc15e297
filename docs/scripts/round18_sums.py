"""Round 18: how much of the torch default step is the float64 accumulation of its sums?

    python docs/scripts/round18_sums.py block          # one 256K-element float32 block: sum in float64
                                                       # (torch converts the block first), in float32, sqrt
    python docs/scripts/round18_sums.py steps ROUNDS   # Prodigy, HD(AdamW), D-Adapt Adam on the torch adapter's
                                                       # default path: the library's sums against sums in
                                                       # float32 (a measurement only: the spec asks float64)

The ``steps`` comparison patches ``adaptlr._reduce.Reducer.total`` to sum each term in its own dtype
and cast the total; ResNet-18 parameter shapes, interleaved, median of ``ROUNDS``.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable

import torch

import adaptlr._reduce as reduce_module
from adaptlr.backends.bench import ALGORITHMS, resnet18_shapes
from adaptlr.backends.torch import Optimizer


def _median_us(f: Callable[[], object], repeats: int = 300) -> float:
    for _ in range(20):
        f()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        f()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def block() -> None:
    x = torch.randn(1 << 18)
    v = x.abs()
    print(f"sum, float64 accumulation  {_median_us(lambda: torch.sum(x, dtype=torch.float64)):6.1f} µs")
    print(f"sum, float32               {_median_us(lambda: torch.sum(x)):6.1f} µs")
    print(f"sqrt                       {_median_us(lambda: torch.sqrt(v)):6.1f} µs")


def _float32_total(self: reduce_module.Reducer, terms: object, dtype: object = None) -> object:
    total = reduce_module.add_all(self.xp, [self.xp.sum(t) for t in terms])  # type: ignore[attr-defined]
    return total if dtype is None else self.xp.astype(total, dtype)


def steps(rounds: int) -> None:
    library_total = reduce_module.Reducer.total

    def params() -> list:
        made = [torch.randn(s, requires_grad=True) for s in resnet18_shapes()]
        for p in made:
            p.grad = torch.randn(p.shape) * 1e-3
        return made

    runs = {}
    for name in ("prodigy", "hypergradient", "dadapt_adam"):
        runs[f"{name}, float64 sums"] = (Optimizer(params(), ALGORITHMS[name]()), library_total)
        runs[f"{name}, float32 sums"] = (Optimizer(params(), ALGORITHMS[name]()), _float32_total)
    times: dict = {k: [] for k in runs}
    try:
        for r in range(rounds + 2):
            for label, (opt, total) in runs.items():
                reduce_module.Reducer.total = total  # type: ignore[method-assign]
                start = time.perf_counter()
                opt.step()
                if r >= 2:  # two warm-up rounds
                    times[label].append(time.perf_counter() - start)
    finally:
        reduce_module.Reducer.total = library_total  # type: ignore[method-assign]
    for label, measured in times.items():
        print(f"{label:28s} {statistics.median(measured) * 1e3:6.1f} ms")


def main(argv: list[str]) -> None:
    if argv[:1] == ["block"]:
        block()
    elif argv[:1] == ["steps"] and len(argv) == 2:
        steps(int(argv[1]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
