"""Prodigy against ``prodigyopt.Prodigy`` 1.1.2 and ``optax.contrib.prodigy`` (issue 18).

Float64, 200 steps, parameters of several shapes (0-D included) on the problem of
``lr_free_problem.py``, on every backend; the error is the normwise relative error of the
parameters, maximised over steps and tensors (``max_rel_err``), and also that of the estimate ``d``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import max_rel_err
from lr_free_problem import STEPS, max_err_over_steps, run
from lr_free_problem import problem as _problem

import adaptlr
from adaptlr.conformance import upstream

torch = pytest.importorskip("torch", reason="the reference is prodigyopt (PyTorch)")
prodigyopt = pytest.importorskip("prodigyopt", reason="prodigyopt==1.1.2 is the reference (pip install prodigyopt)")

TOL = 1e-12


# adaptlr kwargs; prodigyopt takes the same names except lr/betas.
CASES = {
    "default": {},
    "d0-1e-3": {"d0": 1e-3},
    "decoupled-wd": {"weight_decay": 0.1, "d0": 1e-3},
    "coupled-wd": {"weight_decay": 0.1, "decouple": False, "d0": 1e-3},
    "bias-correction": {"use_bias_correction": True, "d0": 1e-3},
    "safeguard-warmup": {"safeguard_warmup": True, "d0": 1e-4},
    "growth-rate": {"growth_rate": 1.02, "d0": 1e-3},
    "slice-p-3": {"slice_p": 3, "d0": 1e-3},
    "b1-0-beta3-dcoef": {"b1": 0.0, "beta3": 0.9, "d_coef": 0.5, "d0": 1e-3},
    "lr-0.5-eps-wd-all": {"learning_rate": 0.5, "eps": 1e-6, "weight_decay": 0.05, "use_bias_correction": True,
                          "safeguard_warmup": True, "growth_rate": 1.05, "slice_p": 2, "d0": 1e-3},
}


def _upstream_kwargs(kwargs: dict) -> dict:
    out = dict(kwargs)
    out["lr"] = out.pop("learning_rate", 1.0)
    out["betas"] = (out.pop("b1", 0.9), out.pop("b2", 0.999))
    return out


def _reference(kwargs: dict, init, grad):
    params = [torch.tensor(p, dtype=torch.float64) for p in init]
    opt = prodigyopt.Prodigy(params, **_upstream_kwargs(kwargs))
    trajectory, ds = [], []
    for t in range(STEPS):
        for p, g in zip(params, grad([p.detach().numpy() for p in params], t)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        trajectory.append([p.detach().numpy().copy() for p in params])
        ds.append(opt.param_groups[0]["d"])
    return trajectory, ds


def _run(opt, backend, init, grad, step=None):
    """``(trajectory, d after each step, final state)``."""
    return run(opt, backend, init, grad, lambda state: float(backend.to_numpy(state.base.d)), step)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_prodigyopt(case, backend):
    init, grad = _problem()
    expected, expected_d = _reference(CASES[case], init, grad)
    trajectory, ds, _ = _run(adaptlr.prodigy(**CASES[case]), backend, init, grad)
    worst = max_err_over_steps(trajectory, expected)
    worst_d = max_rel_err(ds, expected_d)
    assert worst <= TOL, f"{case} on {backend.name}: params max relative error {worst:.3e}"
    assert worst_d <= TOL, f"{case} on {backend.name}: d max relative error {worst_d:.3e}"
    assert expected_d[-1] > 10 * CASES[case].get("d0", 1e-6), "the problem must make d grow"


def test_jit_matches_prodigyopt(backend):
    if backend.library != "jax":
        pytest.skip("jax.jit of the functional step")
    import jax

    kwargs = CASES["lr-0.5-eps-wd-all"]
    init, grad = _problem()
    expected, expected_d = _reference(kwargs, init, grad)
    opt = adaptlr.prodigy(**kwargs)
    trajectory, ds, _ = _run(opt, backend, init, grad, step=jax.jit(opt.update))
    assert max_err_over_steps(trajectory, expected) <= TOL
    assert max_rel_err(ds, expected_d) <= TOL


OPTAX_CASES = {
    "wd-dcoef-eps": {"weight_decay": 0.05, "d0": 1e-3, "d_coef": 0.8, "eps": 1e-7},
    "wd-safeguard": {"weight_decay": 0.05, "d0": 1e-3, "safeguard_warmup": True},
}


def _optax_reference(kwargs: dict, init, grad):
    """``optax.contrib.prodigy`` with adaptlr's ``kwargs`` (its names: ``estim_lr0`` = ``d0``, ...)."""
    pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    ref = optax.contrib.prodigy(kwargs.get("learning_rate", 1.0),
                                betas=(kwargs.get("b1", 0.9), kwargs.get("b2", 0.999)), beta3=kwargs.get("beta3"),
                                eps=kwargs.get("eps", 1e-8),
                                estim_lr0=kwargs.get("d0", 1e-6), estim_lr_coef=kwargs.get("d_coef", 1.0),
                                weight_decay=kwargs.get("weight_decay", 0.0),
                                safeguard_warmup=kwargs.get("safeguard_warmup", False))
    return upstream.optax_run(ref, lambda state: float(state.estim_lr), init, grad, STEPS)


@pytest.mark.parametrize("case", list(OPTAX_CASES))
def test_matches_optax_contrib_prodigy(case, backend):
    """``optax.contrib.prodigy`` is Prodigy with bias correction, decoupled decay, unbounded growth."""
    kwargs = OPTAX_CASES[case]
    init, grad = _problem()
    expected, expected_d = _optax_reference(kwargs, init, grad)
    opt = adaptlr.prodigy(use_bias_correction=True, **kwargs)
    trajectory, ds, _ = _run(opt, backend, init, grad)
    worst, worst_d = max_err_over_steps(trajectory, expected), max_rel_err(ds, expected_d)
    assert worst <= TOL, f"{case} on {backend.name}: params max relative error {worst:.3e}"
    assert worst_d <= TOL, f"{case} on {backend.name}: d max relative error {worst_d:.3e}"


def test_torch_adapter_equals_functional():
    from adaptlr.backends.torch import Optimizer
    from adaptlr.conformance.backends import BACKENDS

    kwargs = CASES["lr-0.5-eps-wd-all"]
    init, grad = _problem()
    expected, expected_d, _ = _run(adaptlr.prodigy(**kwargs), BACKENDS["torch"], init, grad)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in init]
    opt = Optimizer(params, adaptlr.prodigy(**kwargs), fast=False)
    worst = 0.0
    for step in range(STEPS):
        for p, g in zip(params, grad([p.detach().numpy() for p in params], step)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        worst = max(worst, max_rel_err([p.detach().numpy() for p in params], expected[step]))
    assert worst == 0.0 or worst <= TOL
    d = float(opt.functional_state.base.d)
    assert d == pytest.approx(expected_d[-1], rel=TOL)


def test_learning_rates_and_summary_report_d():
    opt = adaptlr.prodigy(learning_rate=0.5, use_bias_correction=True, d0=1e-3)
    init, grad = _problem()
    params = [np.asarray(p) for p in init]
    state = opt.init(params)
    for t in range(5):
        updates, state = opt.update(grad(params, t), state, params)
        params = adaptlr.apply_updates(params, updates)
    t = 6  # the next step's bias correction
    expected = 0.5 * float(state.base.d) * math.sqrt(1 - 0.999**t) / (1 - 0.9**t)
    for rate in adaptlr.learning_rates(state):
        assert float(rate) == pytest.approx(expected, rel=1e-15)
    summary = adaptlr.lr_summary(state, flat=True)
    assert summary["d"] == float(state.base.d) and "d_hat" in summary and "d_max" in summary


def test_zero_gradients_do_not_move():
    """Σ|s| = 0: no step and no change of d (prodigyopt returns early), without NaN."""
    opt = adaptlr.prodigy(weight_decay=0.1)
    params = [np.ones(3)]
    state = opt.init(params)
    updates, state = opt.update([np.zeros(3)], state, params)
    assert np.all(updates[0] == 0) and float(state.base.d) == 1e-6 and float(state.base.numerator) == 0


def test_a_step_with_no_weighted_gradients_keeps_d_and_the_reported_rate():
    """Σ|s| = 0 with ``d > d_0`` and ``d_max`` above ``d``: ``d``, ``d_max`` and the rate the next
    step applies (``lr_scale = d·c_{t+1}``) stay; the growth-capped ``min(d_max, d·growth)`` is not
    taken (it is only where something moved)."""
    opt = adaptlr.prodigy(growth_rate=2.0)
    params = [np.ones(3)]
    state = opt.init(params)
    base = state.base._replace(d=np.asarray(2e-6), d_max=np.asarray(5e-6), lr_scale=np.asarray(2e-6))
    updates, state = opt.update([np.zeros(3)], state._replace(base=base), params)
    assert np.all(updates[0] == 0)
    assert float(state.base.d) == 2e-6 and float(state.base.d_max) == 5e-6
    assert float(state.base.lr_scale) == 2e-6  # not min(5e-6, 2·2e-6) = 4e-6


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"learning_rate": 0.0}, "learning_rate"), ({"b1": 1.0}, "b1"), ({"beta3": -0.1}, "beta3"),
    ({"eps": 0.0}, "eps"), ({"d0": 0.0}, "d0"), ({"d_coef": -1.0}, "d_coef"),
    ({"growth_rate": 0.5}, "growth_rate"), ({"slice_p": 0}, "slice_p"), ({"weight_decay": -1.0}, "weight_decay"),
])
def test_bad_hyper_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        adaptlr.prodigy(**kwargs)


def test_torch_adapter_with_a_late_parameter_matches_prodigyopt():
    """A parameter without a gradient for the first steps (progressive unfreezing): both skip it, and
    the estimate keeps counting the optimizer's steps (prodigyopt's ``k``)."""
    from adaptlr.backends.torch import Optimizer

    kwargs = {"d0": 1e-3, "use_bias_correction": True, "weight_decay": 0.01}
    init, grad = _problem()
    ours = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in init]
    theirs = [torch.tensor(p, dtype=torch.float64) for p in init]
    opt = Optimizer(ours, adaptlr.prodigy(**kwargs), fast=False)
    ref = prodigyopt.Prodigy(theirs, **_upstream_kwargs(kwargs))
    worst = 0.0
    for t in range(60):
        for params in (ours, theirs):
            for i, (p, g) in enumerate(zip(params, grad([p.detach().numpy() for p in params], t))):
                p.grad = None if (i == 1 and t < 5) else torch.tensor(g, dtype=torch.float64)
        opt.step()
        ref.step()
        worst = max(worst, max_rel_err([p.detach().numpy() for p in ours], [p.numpy() for p in theirs]))
    assert worst <= TOL
    assert float(opt.functional_state.base.d) == pytest.approx(ref.param_groups[0]["d"], rel=TOL)
