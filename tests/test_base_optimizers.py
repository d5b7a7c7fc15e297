"""Base optimizers (spec §1) against their oracles: torch.optim and adabelief-pytorch 0.2.1.

Float64, 60 steps, parameters of several shapes and a nonlinear gradient; every backend runs the
same problem and must match the reference within the tolerance rule of
:mod:`adaptlr.conformance.tolerances` (1.7e-13 plus 4 ulps times the condition of the optimizer's
step scalars: 8.7e-11 for RAdam and AdaBelief, whose ``ρ_t - 4`` cancels at the first rectified
steps, so that an ulp of difference in a backend's ``pow`` cannot fail a correct implementation).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import max_rel_err

import adaptlr
from adaptlr.conformance.tolerances import tolerance

torch = pytest.importorskip("torch", reason="the reference optimizers are torch.optim")

SHAPES = [(3, 4), (5,), (2, 3, 2), ()]
STEPS = 60


def _problem(rng: np.random.Generator):
    init = [rng.normal(size=s) for s in SHAPES]
    coeffs = [rng.normal(size=s) for s in SHAPES]

    def grad(params):  # ∇ Σ (a·sin θ + θ⁴/4): nonlinear, bounded below
        return [np.cos(p) * a + p**3 for p, a in zip(params, coeffs)]

    return init, grad


def _adabelief(params, **kwargs):
    adabelief_pytorch = pytest.importorskip("adabelief_pytorch", reason="adabelief-pytorch==0.2.1 is the oracle")
    return adabelief_pytorch.AdaBelief(params, print_change_log=False, **kwargs)


CASES = {
    "sgd": (lambda: adaptlr.sgd(0.01), lambda p: torch.optim.SGD(p, lr=0.01)),
    "sgd-momentum-dampening-wd": (
        lambda: adaptlr.sgd(0.01, momentum=0.9, dampening=0.2, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9, dampening=0.2, weight_decay=0.05),
    ),
    "sgd-nesterov-wd": (
        lambda: adaptlr.sgd(0.01, momentum=0.8, nesterov=True, weight_decay=0.05),
        lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.8, nesterov=True, weight_decay=0.05),
    ),
    "adam-wd": (lambda: adaptlr.adam(0.02, weight_decay=0.1), lambda p: torch.optim.Adam(p, lr=0.02, weight_decay=0.1)),
    "adamw": (lambda: adaptlr.adamw(0.02, weight_decay=0.1), lambda p: torch.optim.AdamW(p, lr=0.02, weight_decay=0.1)),
    "radam-coupled": (
        lambda: adaptlr.radam(0.02, weight_decay=0.1),
        lambda p: torch.optim.RAdam(p, lr=0.02, weight_decay=0.1),
    ),
    "radam-decoupled": (
        lambda: adaptlr.radam(0.02, weight_decay=0.1, decoupled_weight_decay=True),
        lambda p: torch.optim.RAdam(p, lr=0.02, weight_decay=0.1, decoupled_weight_decay=True),
    ),
    "adabelief-default": (lambda: adaptlr.adabelief(0.02), lambda p: _adabelief(p, lr=0.02)),
    "adabelief-decoupled-wd": (
        lambda: adaptlr.adabelief(0.02, weight_decay=0.1),
        lambda p: _adabelief(p, lr=0.02, weight_decay=0.1),
    ),
    "adabelief-coupled-wd": (
        lambda: adaptlr.adabelief(0.02, weight_decay=0.1, decoupled_weight_decay=False),
        lambda p: _adabelief(p, lr=0.02, weight_decay=0.1, weight_decouple=False),
    ),
    "adabelief-no-rectify": (
        lambda: adaptlr.adabelief(0.02, rectify=False),
        lambda p: _adabelief(p, lr=0.02, rectify=False),
    ),
    "adabelief-no-rectify-coupled": (
        lambda: adaptlr.adabelief(0.02, weight_decay=0.1, rectify=False, decoupled_weight_decay=False),
        lambda p: _adabelief(p, lr=0.02, weight_decay=0.1, rectify=False, weight_decouple=False),
    ),
}


def _reference_trajectory(make_reference, init, grad):
    params = [torch.tensor(p, dtype=torch.float64) for p in init]
    opt = make_reference(params)
    out = []
    for _ in range(STEPS):
        for p, g in zip(params, grad([p.numpy() for p in params])):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        out.append([p.detach().numpy().copy() for p in params])
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_library(case, backend, rng):
    make, make_reference = CASES[case]
    init, grad = _problem(rng)
    expected = _reference_trajectory(make_reference, init, grad)

    opt = make()
    params = [backend.asarray(p) for p in init]
    state = opt.init(params)
    worst = 0.0
    for step in range(STEPS):
        grads = [backend.asarray(g) for g in grad([backend.to_numpy(p) for p in params])]
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        worst = max(worst, max_rel_err([backend.to_numpy(p) for p in params], expected[step]))
    tol = tolerance("float64", STEPS, scalar_condition=opt.scalar_condition)
    assert worst <= tol, f"{case} on {backend.name}: max relative error {worst:.3e} > {tol:.3e}"


def test_radam_switches_to_rectified_steps_at_step_6():
    """ρ_t > 5 first holds at t = 6 for β2 = 0.999: before, d = m̂ (an SGD-momentum step)."""
    opt = adaptlr.radam(1.0, eps=0.0)
    params = [np.zeros(1)]
    state = opt.init(params)
    for t in range(1, 8):
        updates, state = opt.update([np.ones(1)], state, params)
        # constant gradient 1: m̂ = 1 exactly, v̂ = 1, so the step is -1 before and -r_t after
        beta2 = 0.999
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * t * beta2**t / (1 - beta2**t)
        expected = 1.0
        if rho_t > 5:
            expected = np.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
        assert (rho_t > 5) == (t >= 6)
        rtol = tolerance("float64", 1, scalar_condition=opt.scalar_condition)
        np.testing.assert_allclose(-updates[0], expected, rtol=rtol)
