"""Mechanic against ``mechanic_pytorch.mechanize`` 0.0.1 (issue 19).

Float64, 200 steps, parameters of several shapes (0-D included), the upstream rows' problem with
gradient noise 3 (see :data:`adaptlr.conformance.upstream.CASES`: on the noise-0.3 problem Mechanic's
scale amplifies a 1-ulp change of ``x_0`` to 1e-10..1e-9), on every backend and under ``jax.jit``:
the parameters after every step and the scale ``Σ s`` after every step, normwise relative error
within each case's tolerance (:attr:`adaptlr.conformance.upstream.UpstreamCase.tolerance`: the
documented rule with Mechanic's condition, :data:`~adaptlr.conformance.upstream.MECHANIC_CONDITION`,
measured below; 1.1e-12 on an AVX-512 machine where an AVX2 one gives 3.7e-13). Then the
wrapper's semantics (learning rates, compositions, the torch adapter, checkpoints). Sharded runs:
``tests/shard_map_check.py lr_free``.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import max_rel_err
from lr_free_problem import STEPS, max_err_over_steps

import adaptlr
from adaptlr.conformance import upstream

CASES = {c.settings: c for c in upstream.CASES if c.algorithm == "mechanic"}
EVERY_BACKEND = ("adamw-wd-s_decay-betas", "sgd-momentum-wd-store-delta")


@functools.cache
def _reference(key: str) -> tuple[list, list]:
    case = CASES[key]
    missing = upstream.missing_modules(case)
    if missing:
        pytest.skip(f"the upstream needs {missing} (pip install mechanic-pytorch==0.0.1)")
    init, grad = upstream.problem(noise=case.noise)
    return upstream.reference(case, init, grad, STEPS)


def _run(case, backend, step=None):
    init, grad = upstream.problem(noise=case.noise)
    scales: list = []
    def record(state):
        scales.append(float(backend.to_numpy(state.adaptations[-1].total())))

    trajectory, state = upstream.run(case.build(), backend, init, grad, STEPS, step, on_step=record)
    return trajectory, scales, state


@pytest.mark.parametrize("key", EVERY_BACKEND)
def test_matches_mechanic_pytorch(key, backend):
    """Every case runs on NumPy in tests/test_conformance_upstream.py (params, final scale); these on every
    backend with the scale after every step."""
    expected, expected_s = _reference(key)
    trajectory, scales, _ = _run(CASES[key], backend)
    worst = max_err_over_steps(trajectory, expected)
    worst_s = max_rel_err(scales, expected_s)
    tol = CASES[key].tolerance
    assert worst <= tol, f"{key} on {backend.name}: params max relative error {worst:.3e}"
    assert worst_s <= tol, f"{key} on {backend.name}: scale max relative error {worst_s:.3e}"
    assert expected_s[-1] > 1e3 * 1e-8, "the scale must grow from ~1e-8 for the test to mean anything"


def test_jit_matches_mechanic_pytorch(backend):
    if backend.library != "jax":
        pytest.skip("jax.jit of the functional step")
    import jax

    case = CASES["adamw-wd-s_decay-betas"]
    expected, expected_s = _reference(case.settings)
    opt = case.build()
    trajectory, scales, _ = _run(case, backend, step=jax.jit(opt.update))
    assert max_err_over_steps(trajectory, expected) <= case.tolerance
    assert max_rel_err(scales, expected_s) <= case.tolerance


@pytest.mark.parametrize("key", list(CASES))
def test_mechanic_condition_covers_its_measured_sensitivity(key):
    """``MECHANIC_CONDITION`` (``c_algorithm`` of the tolerance rule: how much the optimizer's own
    dynamics amplify rounding) is measured, not tuned to one machine: every gradient changed by ±1 ulp
    (a fixed random sign per element) at every step moves a Mechanic run on its problem by at most
    ``MECHANIC_CONDITION`` times what it moves its inner optimizer's run (at least ``sqrt(K)·eps``,
    the random walk of that change); for the most sensitive case by more than a quarter of that."""
    from adaptlr.conformance.backends import BACKENDS

    init, grad = upstream.problem(noise=3.0)
    eps = float(np.finfo(np.float64).eps)

    def perturbed(params, t):
        signs = np.random.default_rng([7, t])
        return [g * (1.0 + eps * signs.choice([-1.0, 1.0], size=np.shape(g))) for g in grad(params, t)]

    def moved(build):
        plain, _ = upstream.run(build(), BACKENDS["numpy"], init, grad, STEPS)
        changed, _ = upstream.run(build(), BACKENDS["numpy"], init, perturbed, STEPS)
        return max_err_over_steps(changed, plain)

    case = CASES[key]
    name, inner = case.kwargs["inner"]
    inner_moved = max(moved(lambda: getattr(adaptlr, name)(**inner)), np.sqrt(STEPS) * eps)
    amplification = moved(case.build) / inner_moved
    assert amplification <= upstream.MECHANIC_CONDITION
    if key == "adamw-wd-s_decay-betas":
        assert amplification > upstream.MECHANIC_CONDITION / 4


def test_learning_rates_report_the_scale_and_summary_shows_s():
    opt = adaptlr.mechanic(adaptlr.sgd(0.1), s_init=1e-3)
    params = {"w": np.array([1.0, -2.0, 0.5]), "b": np.array(0.3)}
    state = opt.init(params)
    for _ in range(5):
        updates, state = opt.update(params, state, params)
        params = adaptlr.apply_updates(params, updates)
    scale = float(sum(float(x) for x in state.adaptations[0].s))
    assert scale > 0
    np.testing.assert_allclose(float(adaptlr.learning_rates(state)["w"]), 0.1 * scale, rtol=1e-15)
    summary = adaptlr.lr_summary(state)
    assert summary["s"] == pytest.approx(scale, rel=1e-15)
    assert set(summary["s_per_beta"]) == {"min", "median", "max"}


def test_compositions():
    params = {"w": np.linspace(-1.0, 1.0, 6), "b": np.array(0.3)}
    for opt in (adaptlr.mechanic(adaptlr.autodrop(adaptlr.sgd(0.1, momentum=0.9), steps_per_epoch=3)),
                adaptlr.skip_nonfinite(adaptlr.mechanic(adaptlr.adamw(0.01))),
                adaptlr.mechanic(adaptlr.schedule_free_sgd(0.1))):
        p, state = params, opt.init(params)
        for t in range(12):
            updates, state = opt.update({k: v * (1 + 0.1 * t) for k, v in p.items()}, state, p)
            p = adaptlr.apply_updates(p, updates)
        assert all(np.all(np.isfinite(v)) for v in p.values()), opt.name
    with pytest.raises(ValueError, match="cannot wrap mechanic"):
        adaptlr.hypergradient(adaptlr.mechanic(adaptlr.sgd(0.1)), hyper_lr=1e-3)
    with pytest.raises(ValueError, match="betas"):
        adaptlr.mechanic(adaptlr.sgd(0.1), betas=())


def test_torch_adapter_matches_mechanize_adamw(tmp_path):
    torch = pytest.importorskip("torch")
    mechanic_pytorch = pytest.importorskip("mechanic_pytorch")
    from adaptlr.backends.torch import Optimizer

    x = torch.randn(32, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(2))

    def model():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()

    def train(m, o, steps):
        for _ in range(steps):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()

    ref_model, ours = model(), model()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # mechanic_pytorch makes its scalars in the default dtype
    try:
        ref = mechanic_pytorch.mechanize(torch.optim.AdamW)(ref_model.parameters(), lr=0.01)
        opt = Optimizer(ours.parameters(), adaptlr.mechanic(adaptlr.adamw(0.01)))
        train(ref_model, ref, 30)
        train(ours, opt, 30)
    finally:
        torch.set_default_dtype(default)
    for a, b in zip(ours.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
    # a checkpoint of the adapter continues bit-identically
    saved_model, saved = {k: v.clone() for k, v in ours.state_dict().items()}, opt.state_dict()
    import copy

    saved = copy.deepcopy(saved)
    train(ours, opt, 5)
    resumed = model()
    resumed.load_state_dict(saved_model)
    ropt = Optimizer(resumed.parameters(), adaptlr.mechanic(adaptlr.adamw(0.01)))
    ropt.load_state_dict(saved)
    train(resumed, ropt, 5)
    for a, b in zip(resumed.parameters(), ours.parameters()):
        assert torch.equal(a, b)
