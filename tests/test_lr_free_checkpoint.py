"""Checkpoints of the learning-rate-free bases across frameworks (issue 18).

A run saved with :func:`adaptlr.save_state` from NumPy after half its steps and resumed from the
file with :func:`adaptlr.load_state` in each other backend equals the uninterrupted NumPy run
(float64, ≤ 1e-12 relative: only the backends' rounding differs), the estimate included.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import max_rel_err
from lr_free_problem import problem

import adaptlr

HALF = 40
MAKERS = {
    "prodigy": lambda: adaptlr.prodigy(d0=1e-3, weight_decay=0.01, use_bias_correction=True),
    "prodigy-b1-0-slice": lambda: adaptlr.prodigy(b1=0.0, d0=1e-3, slice_p=2),
    "dog": lambda: adaptlr.dog(init_eta=1e-3),
    "ldog": lambda: adaptlr.dog(layerwise=True),
    "dowg": lambda: adaptlr.dowg(),
    "dadapt_adam": lambda: adaptlr.dadapt_adam(d0=1e-3, weight_decay=0.01, decouple=True),
    "dadapt_sgd": lambda: adaptlr.dadapt_sgd(d0=1e-3, momentum=0.5),
    "schedule_free_adamw": lambda: adaptlr.schedule_free_adamw(0.01, warmup_steps=5, weight_decay=0.01, r=0.5),
    "mechanic(adamw)-store-delta": lambda: adaptlr.mechanic(adaptlr.adamw(0.01), store_delta=True),
}


def _steps(opt, backend, params, state, grad, start, stop):
    for t in range(start, stop):
        grads = [backend.asarray(g) for g in grad([backend.to_numpy(p) for p in params], t)]
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


@pytest.mark.parametrize("name", list(MAKERS))
def test_resume_in_another_backend_equals_uninterrupted_run(name, backend, tmp_path):
    from adaptlr.conformance.backends import BACKENDS

    numpy = BACKENDS["numpy"]
    opt = MAKERS[name]()
    init, grad = problem()
    params = [numpy.asarray(p) for p in init]
    full, full_state = _steps(opt, numpy, params, opt.init(params), grad, 0, 2 * HALF)
    half, half_state = _steps(opt, numpy, params, opt.init(params), grad, 0, HALF)
    path = tmp_path / "state.npz"
    adaptlr.save_state(path, half_state, optimizer=opt)

    resumed_params = [backend.asarray(p) for p in half]
    state = adaptlr.load_state(path, resumed_params, optimizer=opt)
    resumed, resumed_state = _steps(opt, backend, resumed_params, state, grad, HALF, 2 * HALF)
    assert max_rel_err([backend.to_numpy(p) for p in resumed], full) <= 1e-12
    rates = [backend.to_numpy(r) for r in adaptlr.learning_rates(resumed_state)]
    assert max_rel_err(rates, [np.asarray(r) for r in adaptlr.learning_rates(full_state)]) <= 1e-12


@pytest.mark.parametrize("name", list(MAKERS))
def test_torch_adapter_state_dict_round_trip_continues_exactly(name):
    """``state_dict`` after half the run, loaded into a fresh adapter: the rest equals the uninterrupted run."""
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    init, grad = problem()

    def run(steps, state_dict=None, start=None):
        params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in (start or init)]
        opt = Optimizer(params, MAKERS[name]())
        if state_dict is not None:
            opt.load_state_dict(state_dict)
        for t in steps:
            for p, g in zip(params, grad([p.detach().numpy() for p in params], t)):
                p.grad = torch.tensor(g, dtype=torch.float64)
            opt.step()
        return [p.detach().numpy().copy() for p in params], opt

    full, _ = run(range(2 * HALF))
    half, opt = run(range(HALF))
    resumed, _ = run(range(HALF, 2 * HALF), opt.state_dict(), half)
    assert max_rel_err(resumed, full) == 0.0
