"""Paper estimate of the learning-rate-free optimizers' step on an H100/H200 (docs/performance.md).

Not a GPU measurement: one step of each optimizer on the CPU, on ResNet-18 parameter shapes
(float32, after a first step), counted by :func:`adaptlr.backends.bench.step_costs`: the aten
operations it dispatches (kernel launches on a GPU), the host synchronisations (``.item()``; the
upstream packages call it on a dot product or norm of every parameter, so on a GPU each one waits
for the device) and the bytes its operations read and write. The estimate is
``bytes / BANDWIDTH + launches × LAUNCH + syncs × SYNC``.

    python docs/scripts/gpu_estimate_lr_free.py
"""

from __future__ import annotations

import sys
from typing import Any

import torch

import adaptlr
from adaptlr.backends.bench import RESNET18_SHAPES, StepCosts, _upstream_torch, step_costs
from adaptlr.backends.torch import Optimizer

BANDWIDTH = 4.8e12  # bytes/s, H200 HBM3e (H100 SXM: 3.35e12)
LAUNCH = 5e-6  # s per kernel launch from eager PyTorch
SYNC = 15e-6  # s per host synchronisation: a device-to-host copy and the drained queue it waits for

ALGORITHMS = {"prodigy": adaptlr.prodigy, "dadapt_adam": adaptlr.dadapt_adam, "dadapt_sgd": adaptlr.dadapt_sgd,
              "dog": adaptlr.dog}


def _params(seed: int = 0) -> list:
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * 0.1) for s in RESNET18_SHAPES]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g) * 0.01
    return params


def measure(make: Any) -> StepCosts:
    optimizer = make(_params())
    optimizer.step()  # the state exists; later steps are what a training loop repeats
    return step_costs(optimizer.step)


def main() -> int:
    n = sum(torch.Size(s).numel() for s in RESNET18_SHAPES)
    print(f"ResNet-18 shapes: {len(RESNET18_SHAPES)} tensors, {n / 1e6:.1f}M float32 parameters; "
          f"estimate = bytes / {BANDWIDTH / 1e12:.1f} TB/s + launches × {LAUNCH * 1e6:.0f} µs "
          f"+ syncs × {SYNC * 1e6:.0f} µs\n")
    print("| algorithm | path | launches | host syncs | words/param | estimate | × upstream |")
    print("|---|---|---|---|---|---|---|")
    for name, factory in ALGORITHMS.items():
        upstream_name, upstream = _upstream_torch(name)
        rows = [(f"`{upstream_name}`", measure(upstream)),
                ('adapter `fast="foreach"` (the GPU default)',
                 measure(lambda p, factory=factory: Optimizer(p, factory(), fast="foreach")))]
        base = None
        for path, c in rows:
            seconds = c.bytes / BANDWIDTH + c.launches * LAUNCH + c.syncs * SYNC
            base = base or seconds
            print(f"| {name} | {path} | {c.launches} | {c.syncs} | {c.bytes / 4 / n:.0f} | ≈ {seconds * 1e3:.1f} ms "
                  f"| {seconds / base:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
