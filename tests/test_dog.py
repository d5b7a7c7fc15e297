"""DoG / LDoG against ``dog_optimizer`` 1.0.3 and ``optax.contrib.dog``; DoWG against ``optax.contrib.dowg``.

Float64, 200 steps, parameters of several shapes (0-D included), on every backend; the error is the
normwise relative error of the parameters maximised over steps and tensors, and that of ``η``.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import max_rel_err
from lr_free_problem import STEPS, max_err_over_steps, run
from lr_free_problem import problem as _problem

import adaptlr

TOL = 1e-12


def _run(opt, backend, init, grad, step=None):
    """``(trajectory, the per-tensor step sizes α·η after each step, final state)``."""
    return run(opt, backend, init, grad,
               lambda state: [float(backend.to_numpy(r)) for r in adaptlr.learning_rates(state)], step)


# -- DoG / LDoG vs dog_optimizer ------------------------------------------------------------------

DOG_CASES = {
    "dog-default": {},
    "dog-reps-1e-4-wd": {"reps_rel": 1e-4, "weight_decay": 0.05},
    "dog-init-eta-lr": {"init_eta": 1e-3, "learning_rate": 0.8, "eps": 1e-6},
    "ldog-default": {"layerwise": True},
    "ldog-init-eta-wd": {"layerwise": True, "init_eta": 1e-3, "weight_decay": 0.05},
}


def _dog_reference(kwargs: dict, init, grad):
    torch = pytest.importorskip("torch")
    dog = pytest.importorskip("dog", reason="dog-optimizer==1.0.3 is the reference (pip install dog-optimizer)")
    kwargs = dict(kwargs)
    cls = dog.LDoG if kwargs.pop("layerwise", False) else dog.DoG
    if "learning_rate" in kwargs:
        kwargs["lr"] = kwargs.pop("learning_rate")
    params = [torch.tensor(p, dtype=torch.float64) for p in init]
    opt = cls(params, **kwargs)
    trajectory, etas = [], []
    for t in range(STEPS):
        for p, g in zip(params, grad([p.numpy() for p in params], t)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        trajectory.append([p.numpy().copy() for p in params])
        etas.append([float(e) for e in opt.param_groups[0]["eta"]])
    return trajectory, etas


@pytest.mark.parametrize("case", list(DOG_CASES))
def test_dog_matches_dog_optimizer(case, backend):
    init, grad = _problem()
    expected, expected_eta = _dog_reference(DOG_CASES[case], init, grad)
    trajectory, etas, _ = _run(adaptlr.dog(**DOG_CASES[case]), backend, init, grad)
    worst, worst_eta = max_err_over_steps(trajectory, expected), max_err_over_steps(etas, expected_eta)
    assert worst <= TOL, f"{case} on {backend.name}: params max relative error {worst:.3e}"
    assert worst_eta <= TOL, f"{case} on {backend.name}: eta max relative error {worst_eta:.3e}"
    assert max(expected_eta[-1]) > 100 * max(expected_eta[1]), "the problem must make η grow"


def test_dog_jit(backend):
    if backend.library != "jax":
        pytest.skip("jax.jit of the functional step")
    import jax

    kwargs = DOG_CASES["ldog-init-eta-wd"]
    init, grad = _problem()
    expected, _ = _dog_reference(kwargs, init, grad)
    opt = adaptlr.dog(**kwargs)
    trajectory, _, _ = _run(opt, backend, init, grad, step=jax.jit(opt.update))
    assert max_err_over_steps(trajectory, expected) <= TOL


# -- vs optax.contrib ------------------------------------------------------------------------------

OPTAX_DOG_CASES = {
    "heuristic": ({"reps_rel": 1e-5}, {"init_step": ("heuristic", 1e-5)}),
    "learning-rate-wd": ({"init_eta": 1e-3, "weight_decay": 0.05, "eps": 1e-6},
                         {"init_step": ("learning_rate", 1e-3), "weight_decay": 0.05, "eps": 1e-6}),
}
OPTAX_DOWG_CASES = {
    "default": ({}, {}),
    "sq-dist-wd-lr-eps": ({"learning_rate": 0.7, "init_estim_sq_dist": 1e-6, "weight_decay": 0.05, "eps": 1e-6},
                          {"learning_rate": 0.7, "init_estim_sq_dist": 1e-6, "weight_decay": 0.05, "eps": 1e-6}),
}


def _optax_reference(transform, init, grad):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    params = [jax.numpy.asarray(p, dtype=jax.numpy.float64) for p in init]
    state = transform.init(params)
    step = jax.jit(transform.update)
    out = []
    for t in range(STEPS):
        grads = [jax.numpy.asarray(g) for g in grad([np.asarray(p) for p in params], t)]
        updates, state = step(grads, state, params)
        params = optax.apply_updates(params, updates)
        out.append([np.asarray(p) for p in params])
    return out


@pytest.mark.parametrize("case", list(OPTAX_DOG_CASES))
def test_dog_matches_optax(case, backend):
    optax = pytest.importorskip("optax")
    ours, theirs = OPTAX_DOG_CASES[case]
    init, grad = _problem()
    expected = _optax_reference(optax.contrib.dog(**theirs), init, grad)
    trajectory, _, _ = _run(adaptlr.dog(**ours), backend, init, grad)
    worst = max_err_over_steps(trajectory, expected)
    assert worst <= TOL, f"{case} on {backend.name}: params max relative error {worst:.3e}"


@pytest.mark.parametrize("case", list(OPTAX_DOWG_CASES))
def test_dowg_matches_optax(case, backend):
    optax = pytest.importorskip("optax")
    ours, theirs = OPTAX_DOWG_CASES[case]
    init, grad = _problem()
    expected = _optax_reference(optax.contrib.dowg(**theirs), init, grad)
    trajectory, etas, _ = _run(adaptlr.dowg(**ours), backend, init, grad)
    worst = max_err_over_steps(trajectory, expected)
    assert worst <= TOL, f"{case} on {backend.name}: params max relative error {worst:.3e}"
    assert etas[-1][0] > 100 * etas[0][0], "the problem must make η grow"


def test_dowg_jit(backend):
    if backend.library != "jax":
        pytest.skip("jax.jit of the functional step")
    import jax

    optax = pytest.importorskip("optax")
    ours, theirs = OPTAX_DOWG_CASES["sq-dist-wd-lr-eps"]
    init, grad = _problem()
    expected = _optax_reference(optax.contrib.dowg(**theirs), init, grad)
    opt = adaptlr.dowg(**ours)
    trajectory, _, _ = _run(opt, backend, init, grad, step=jax.jit(opt.update))
    assert max_err_over_steps(trajectory, expected) <= TOL


# -- adapters, reporting, errors -------------------------------------------------------------------

@pytest.mark.parametrize("make", [lambda: adaptlr.dog(init_eta=1e-3, weight_decay=0.05),
                                  lambda: adaptlr.dog(layerwise=True), lambda: adaptlr.dowg(weight_decay=0.05)],
                         ids=["dog", "ldog", "dowg"])
def test_torch_adapter_equals_functional(make):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer
    from adaptlr.conformance.backends import BACKENDS

    init, grad = _problem()
    expected, _, state = _run(make(), BACKENDS["torch"], init, grad)
    params = [torch.nn.Parameter(torch.tensor(p, dtype=torch.float64)) for p in init]
    opt = Optimizer(params, make(), fast=False)
    worst = 0.0
    for step in range(STEPS):
        for p, g in zip(params, grad([p.detach().numpy() for p in params], step)):
            p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
        worst = max(worst, max_rel_err([p.detach().numpy() for p in params], expected[step]))
    assert worst <= TOL
    assert np.allclose(np.asarray(adaptlr.learning_rates(opt.functional_state)[0]),
                       np.asarray(adaptlr.learning_rates(state)[0]), rtol=TOL, atol=0)


def test_learning_rates_and_summary_report_eta():
    opt = adaptlr.dog(learning_rate=0.5, layerwise=True)
    init, grad = _problem()
    params = [np.asarray(p) for p in init]
    state = opt.init(params)
    for t in range(3):
        updates, state = opt.update(grad(params, t), state, params)
        params = adaptlr.apply_updates(params, updates)
    g = grad(params, 3)
    updates, new_state = opt.update(g, state, params)
    for u, gi, rate in zip(updates, g, adaptlr.learning_rates(new_state)):
        np.testing.assert_allclose(u, -float(rate) * gi, rtol=1e-15)
    summary = adaptlr.lr_summary(new_state, flat=True)
    assert any(k.startswith("eta/") for k in summary) and any(k.startswith("rbar/") for k in summary)


@pytest.mark.parametrize(("make", "match"), [
    (lambda: adaptlr.dog(learning_rate=0.0), "learning_rate"), (lambda: adaptlr.dog(reps_rel=0.0), "reps_rel"),
    (lambda: adaptlr.dog(init_eta=-1.0), "init_eta"), (lambda: adaptlr.dog(eps=-1.0), "eps"),
    (lambda: adaptlr.dog(weight_decay=-1.0), "weight_decay"), (lambda: adaptlr.dowg(eps=0.0), "eps"),
    (lambda: adaptlr.dowg(init_estim_sq_dist=0.0), "init_estim_sq_dist"),
])
def test_bad_hyper_parameters(make, match):
    with pytest.raises(ValueError, match=match):
        make()
