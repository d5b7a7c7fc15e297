"""The torch adapter's ``"foreach"`` step over chunks: peak memory, aten ops and time per chunk size.

    python docs/scripts/foreach_chunks_table.py [ROUNDS]      # ≈ 50 s on 2 cores with ROUNDS = 9

ResNet-18 shapes (float32, fixed random gradients), AdamW, ActiveLR(AdamW) and Prodigy (whose sums
take two passes over the chunks) through
``adaptlr.backends.torch.Optimizer(fast="foreach")`` with ``foreach_chunk_elements`` set to each
size in turn. Peak extra memory of one step and the aten ops it dispatches come from
``adaptlr bench``'s counters; times are medians over interleaved rounds (every configuration once
per round, in a fresh random order); then the list path (``fast=False``) of AdamW and DSA(AdamW)
updating a few tensors at a time (parts of at most the largest tensor's elements) and in one
update over every tensor. Also printed: what the steps leave alive after they return,
with Python's collector running as usual (× the model's bytes), on the list and foreach paths.
"""

from __future__ import annotations

import gc
import random
import statistics
import sys
import time

import torch

import adaptlr
from adaptlr.backends.bench import _torch_memory, _torch_peak_mode, count_aten_ops, resnet18_shapes
from adaptlr.backends.torch import Optimizer

FACTORIES = {
    "AdamW": lambda: adaptlr.adamw(1e-3, weight_decay=0.01),
    "ActiveLR(AdamW)": lambda: adaptlr.active(adaptlr.adamw(1e-3, weight_decay=0.01), steps_per_epoch=1000),
    "Prodigy (two passes)": lambda: adaptlr.prodigy(weight_decay=0.01),
}
LIST_FACTORIES = {
    "AdamW": FACTORIES["AdamW"],
    "DSA(AdamW)": lambda: adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01), hyper_lr=1e-3),
}


def main(rounds: int) -> None:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in resnet18_shapes()]
    for p in params:
        p.grad = torch.randn(p.shape)
    numels = [p.numel() for p in params]
    largest, model = max(numels) * 4, sum(numels) * 4
    chunks = {"whole lists": 10**12, "2^20": 1 << 20, "2^19": 1 << 19, "largest / 8": -(-max(numels) // 8)}

    print(f"torch {torch.__version__}; {len(params)} tensors, {sum(numels):,} float32 parameters\n")
    print("What the steps leave alive after they return (30 steps, the collector running as usual), × model bytes:")
    for fast in (False, "foreach"):
        opt = Optimizer(params, FACTORIES["AdamW"](), fast=fast)
        opt.step()
        gc.collect()
        mode = _torch_peak_mode(torch)
        levels = []
        with mode:
            for _ in range(30):
                opt.step()
                levels.append(mode.level)
        print(f"  AdamW, fast={fast!r}: median {statistics.median(levels) / model:.2f}, max {max(levels) / model:.2f}")

    configs = []
    for name, make in FACTORIES.items():
        for label, chunk in chunks.items():
            opt = Optimizer(params, make(), fast="foreach")
            opt.foreach_chunk_elements = chunk
            opt.step()
            opt.step()
            configs.append({"name": name, "chunk": label, "opt": opt, "times": [],
                            "peak": _torch_memory(torch, opt.step, "cpu"), "ops": count_aten_ops(opt.step)})
    for name, make in LIST_FACTORIES.items():  # the list path (fast=False) in parts and in one update
        for label in ("parts", "one update"):
            opt = Optimizer(params, make(), fast=False)
            if label == "one update":
                opt._tensor_parts = lambda active: None
            opt.step()
            opt.step()
            configs.append({"name": name, "chunk": f"list path, {label}", "opt": opt, "times": [],
                            "peak": _torch_memory(torch, opt.step, "cpu"), "ops": count_aten_ops(opt.step)})
    order = list(range(len(configs)))
    for _ in range(rounds):
        random.shuffle(order)
        for i in order:
            start = time.perf_counter()
            configs[i]["opt"].step()
            configs[i]["times"].append(time.perf_counter() - start)

    print("\n| algorithm | chunk (elements) | peak extra MB | × largest tensor | aten ops | median ms |")
    print("|---|---|---|---|---|---|")
    for c in configs:
        print(f"| {c['name']} | {c['chunk']} | {c['peak'] / 2**20:.1f} | {c['peak'] / largest:.2f} | {c['ops']} | "
              f"{statistics.median(c['times']) * 1e3:.1f} |")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 9)
