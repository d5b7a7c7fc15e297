"""Round 25: the torch adapter's row blocks against their size, and the block temporaries each
algorithm keeps alive.

    python docs/scripts/round25_rows.py live              # block temporaries per algorithm (peak counter)
    python docs/scripts/round25_rows.py sizes ROUNDS      # step time and peak against the row-block size

ResNet-18 parameter shapes (float32, the largest tensor 512×512×3×3 = 2,359,296 elements) through
``adaptlr.backends.torch.Optimizer`` with ``list_part_elements`` set (every tensor above it in
blocks of its rows). ``live``: for each algorithm, at 256K- and 576K-element blocks, the peak
extra memory of a step (``adaptlr.backends.bench``'s peak counter, the largest of 4 steps after 2,
ActiveLR with 2 steps per epoch so that they include epoch boundaries) × the largest tensor and
÷ one block: the count its parts declare (``row_block_temporaries``) must be at least the latter.
``sizes``: DSA, DSA(Adam, λ), HD and EG per tensor at 256K to 1152K elements per block, each
step timed in rounds interleaved over the sizes (median ms of 2 steps per round) and the peak.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from round9_ab import run_mode
from round12_ab import _params

import adaptlr as A
from adaptlr.backends.bench import _torch_memory
from adaptlr.backends.torch import Optimizer

LARGEST = 512 * 512 * 3 * 3
ROW = 512 * 3 * 3  # elements per row of the largest tensors

MAKERS: dict[str, Callable[[], A.Optimizer]] = {
    "dsa(adamw)": lambda: A.dsa(A.adamw(1e-3)),
    "dsa(adam, λ)": lambda: A.dsa(A.adam(1e-3, weight_decay=0.01)),
    "dsa(sgd, momentum)": lambda: A.dsa(A.sgd(1e-3, momentum=0.9)),
    "dsa(radam)": lambda: A.dsa(A.radam(1e-3)),
    "dsa(adabelief)": lambda: A.dsa(A.adabelief(1e-3)),
    "dsa(radam, λ)": lambda: A.dsa(A.radam(1e-3, weight_decay=0.01)),
    "dsa(active(adamw))": lambda: A.dsa(A.active(A.adamw(1e-3), steps_per_epoch=2)),
    "dsa(active(adam, λ))": lambda: A.dsa(A.active(A.adam(1e-3, weight_decay=0.01), steps_per_epoch=2)),
    "dsa(adamw), element factors": lambda: A.dsa(A.adamw(1e-3), structure=("tensor", "row", "col", "element")),
    "dsa(adam, λ), element factors": lambda: A.dsa(A.adam(1e-3, weight_decay=0.01),
                                                   structure=("tensor", "row", "col", "element")),
    "hd per tensor (adamw)": lambda: A.hypergradient(A.adamw(1e-3), 1e-8, granularity="tensor"),
    "hd per tensor (adam, λ)": lambda: A.hypergradient(A.adam(1e-3, weight_decay=0.01), 1e-8, granularity="tensor"),
    "hd per tensor (active(adamw))": lambda: A.hypergradient(A.active(A.adamw(1e-3), steps_per_epoch=2), 1e-8,
                                                             granularity="tensor"),
    "eg per tensor (adamw)": lambda: A.eg_step_size(A.adamw(1e-3), 1e-3, 1e-3, scale="tensor"),
    "eg per tensor (adam, λ)": lambda: A.eg_step_size(A.adam(1e-3, weight_decay=0.01), 1e-3, 1e-3, scale="tensor"),
    "ldog": lambda: A.dog(layerwise=True),
    "ldog, λ": lambda: A.dog(layerwise=True, weight_decay=0.01),
}


def _adapter(name: str, elements: int) -> Optimizer:
    opt = Optimizer(_params(), MAKERS[name]())
    opt.list_part_elements = elements
    opt.step()
    opt.step()
    return opt


def live() -> None:
    for name in MAKERS:
        cells = []
        for elements in (1 << 18, 36 << 14):
            opt = _adapter(name, elements)
            peak = max(_torch_memory(torch, opt.step, "cpu") or 0 for _ in range(4)) / 4
            block = elements // ROW * ROW
            cells.append(f"{elements}: {peak / LARGEST:5.2f}× largest, {peak / block:5.2f} blocks")
        print(f"{name:32s} " + " | ".join(cells), flush=True)


def sizes(rounds: int) -> None:
    names = ("dsa(adamw)", "dsa(adam, λ)", "hd per tensor (adamw)", "eg per tensor (adamw)")
    steps = {}
    for name in names:
        for elements in (1 << 18, 24 << 14, 36 << 14, 48 << 14, 72 << 14):
            opt = _adapter(name, elements)
            steps[name, elements] = (opt.step, _torch_memory(torch, opt.step, "cpu") or 0, [])
    for _ in range(rounds):
        for step, _, times in steps.values():
            start = time.perf_counter()
            step()
            step()
            times.append((time.perf_counter() - start) / 2 * 1e3)
    for (name, elements), (_, peak, times) in steps.items():
        print(f"{name:24s} {elements:8d} elements per block {statistics.median(times):7.1f} ms, "
              f"peak {peak / 4 / LARGEST:5.2f}× the largest tensor")


if __name__ == "__main__":
    run_mode({"live": live, "sizes": sizes}, sys.argv[1:], __doc__)
