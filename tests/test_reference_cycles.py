"""A step creates no reference cycles, so nothing it made outlives it until the cyclic collector runs.

A recursive closure (a nested function that calls itself) is a cycle: function -> cell -> function.
The state-tree walks were such closures, and each torch adapter step left the new state values of
the list and foreach paths (AdamW: the new moments, twice the model's size) alive after the step,
until Python's cyclic collector happened to run. With the collector disabled these tests see every
cycle a step makes.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

import adaptlr
from tests.conftest import cycles_made_by

FACTORIES = {
    "adamw": lambda: adaptlr.adamw(1e-3, weight_decay=0.01),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=2),
    "autodrop(sgdm)": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2),
    "hypergradient(sgd)": lambda: adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=1e-3),
    "dsa(adam)": lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=1e-3),
    "eg(sgdm)": lambda: adaptlr.eg_step_size(adaptlr.sgd(0.05, momentum=0.9), scale_lr=1e-2, gain_lr=1e-2),
    "prodigy": lambda: adaptlr.prodigy(),
    "schedule_free_adamw": lambda: adaptlr.schedule_free_adamw(1e-2),
}


@pytest.mark.parametrize("name", FACTORIES)
def test_a_numpy_functional_step_makes_no_reference_cycle(name):
    opt = FACTORIES[name]()
    params = [np.linspace(-1.0, 1.0, 12).reshape(4, 3), np.ones(3)]
    state = opt.init(params)
    box = {"params": params, "state": state}

    def step():
        grads = [p * 0.5 + 0.1 for p in box["params"]]
        updates, box["state"] = opt.update(grads, box["state"], box["params"])
        box["params"] = adaptlr.apply_updates(box["params"], updates)

    for _ in range(3):
        assert cycles_made_by(step) == 0


@pytest.mark.parametrize("fast", [False, "foreach", "auto", "flat"])
@pytest.mark.parametrize("name", FACTORIES)
def test_a_torch_adapter_step_makes_no_reference_cycle(name, fast):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(30, 20), (20,), (5, 4, 3)]]
    opt = Optimizer(params, FACTORIES[name](), fast=fast)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        assert cycles_made_by(opt.step) == 0, opt.fast_path
    assert cycles_made_by(opt.state_dict) == 0


@pytest.mark.parametrize("fast", [False, "foreach"])
def test_nothing_a_torch_adapter_step_allocates_outlives_it_but_0d_values(fast):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.bench import _torch_peak_mode
    from adaptlr.backends.torch import Optimizer

    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(300, 200), (200,), (50, 40, 3)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    opt = Optimizer(params, adaptlr.adamw(1e-3), fast=fast)
    opt.step()
    gc.collect()
    gc.disable()
    try:
        mode = _torch_peak_mode(torch)  # live bytes of the storages the steps created
        with mode:
            for _ in range(3):
                opt.step()
        assert mode.level <= 1024, mode.level  # before the fix: the last step's new moments, 2 × the model
    finally:
        gc.enable()
