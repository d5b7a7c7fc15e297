"""AutoDrop (spec §3): angle vectors, the detector sequence, averaging, memory, the noisy quadratic,
jit, cross-backend agreement, Adam-type bases, and input errors."""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
from conftest import max_rel_err

import adaptlr
from adaptlr._precision import widest_float
from adaptlr.autodrop import (
    AutoDropState,
    DetectorOptions,
    DetectorState,
    autodrop,
    autodrop_detector,
)
from adaptlr.conformance.backends import BACKENDS

# -- helpers -----------------------------------------------------------------------------------------


def _detector_state(theta: float, kappa: float = 1.0) -> DetectorState:
    f = np.float64
    return DetectorState(np.asarray(f("nan")), np.asarray(False), np.asarray(f(theta)), np.asarray(False),
                         np.asarray(0, dtype=np.int32), np.asarray(f(kappa)), np.asarray(0, dtype=np.int32))


def _run_detector(omegas, theta=0.01, kappa=1.0, min_kappa=None, **options):
    """Feed ω_3, ω_4, ... to the detector; return the state after each epoch (index 0 = epoch 3)."""
    opts = DetectorOptions(**{"drop_factor": 0.2, "patience_epochs": 3, "theta_max": 1.0, "grow_theta": True,
                              **options})
    state = _detector_state(theta, kappa)
    history = []
    for omega in omegas:
        defined = np.asarray(not math.isnan(omega))
        state = autodrop_detector(np.asarray(np.float64(omega)), defined, state, opts,
                                  None if min_kappa is None else np.asarray(np.float64(min_kappa)))
        history.append(state)
    return history


def _drive(opt, xs, grads=None):
    """Call ``update`` with constructed params ``x_1, x_2, ...`` (updates not applied); AutoDrop states and updates."""
    state = opt.init(xs[0])
    states, updates = [], []
    for i, x in enumerate(xs):
        g = np.zeros_like(x) if grads is None else grads[i]
        u, state = opt.update(g, state, x)
        states.append(state.adaptations[-1])
        updates.append(u)
    return states, updates, state


# -- the angle ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("s_prev", "s", "expected"), [
    ((1.0, 0.0), (0.0, 1.0), 90.0),
    ((1.0, 0.0), (-1.0, 0.0), 180.0),
    ((1.0, 1.0), (1.0, 0.0), 45.0),
    ((1.0, 0.0), (1.0, 1.0), 45.0),
])
def test_angle_vectors(s_prev, s, expected):
    # x_1 (s_1 unused, so ω_2 is undefined), x_2 = x_1 + s', x_3 = x_2 + s: ω_3 is the angle of s_3 = s and s_2 = s'.
    x1 = np.array([3.0, -2.0])
    x2 = x1 + np.asarray(s_prev)
    x3 = x2 + np.asarray(s)
    states, _, _ = _drive(autodrop(adaptlr.sgd(0.1), steps_per_epoch=1), [x1, x2, x3])
    assert math.isnan(states[0].omega) and math.isnan(states[1].omega)
    assert not states[1].omega_defined and states[2].omega_defined
    assert abs(float(states[2].omega) - expected) < 1e-12


def test_angle_is_global_over_tensors():
    # s' = ((1), (0)), s = ((0), (1)) split over two tensors: orthogonal globally, 90°.
    xs = [{"a": np.zeros(1), "b": np.zeros(1)}, {"a": np.ones(1), "b": np.zeros(1)},
          {"a": np.ones(1), "b": np.ones(1)}]
    opt = autodrop(adaptlr.sgd(0.1), steps_per_epoch=1)
    states, _, _ = _drive(opt, xs, [{"a": np.zeros(1), "b": np.zeros(1)}] * 3)
    assert abs(float(states[2].omega) - 90.0) < 1e-12


def test_angle_only_at_epoch_starts():
    # S = 2: x at steps 1, 3, 5 are x_1, x_2, x_3; the params of steps 2, 4 must not matter.
    junk = np.array([7.0, -3.0])
    xs = [np.zeros(2), junk, np.array([1.0, 0.0]), junk, np.array([1.0, 1.0])]
    states, _, _ = _drive(autodrop(adaptlr.sgd(0.1), steps_per_epoch=2), xs)
    assert math.isnan(states[3].omega)
    assert abs(float(states[4].omega) - 90.0) < 1e-12


def test_zero_displacement_is_undefined_and_never_drops():
    # θ huge: any defined Δ latches. Standing still makes every ω undefined: no latch, no drop.
    xs = [np.ones(3)] * 12
    opt = autodrop(adaptlr.sgd(0.1), steps_per_epoch=1, theta=1000.0, theta_max=1000.0, patience_epochs=1)
    states, _, _ = _drive(opt, xs)
    assert all(math.isnan(s.omega) and not s.omega_defined for s in states)
    assert int(states[-1].drop_count) == 0 and not states[-1].latched and float(states[-1].kappa) == 1.0
    # One zero displacement s_6 in an otherwise moving run (E = 1: every defined Δ latches and drops):
    # ω_6, ω_7 are undefined, so Δ_6, Δ_7, Δ_8 are too; drops at e = 4, 5, then none until e = 9.
    steps = [np.array([1.0, 0.0]), np.array([0.0, 1.0])] * 6
    xs = [np.zeros(2)]
    for i, s in enumerate(steps):
        xs.append(xs[-1] + (0.0 if i == 4 else s))
    states, _, _ = _drive(opt, xs)
    assert [bool(s.omega_defined) for s in states[:9]] == [False, False, True, True, True, False, False, True, True]
    assert [int(s.drop_count) for s in states[:9]] == [0, 0, 0, 1, 2, 2, 2, 2, 3]


# -- the detector ------------------------------------------------------------------------------------


def test_detector_spec_sequence():
    # α·κ_0 = 0.05 (κ_0 = 1, α = 0.05), min_lr = 1e-4 → min κ = 0.002; ω_3, ω_4, ... as in spec §3.
    history = _run_detector([10, 20, 20.005, 50, 60, 60.04, 70, 80], min_kappa=1e-4 / 0.05)
    by_epoch = dict(zip(range(3, 11), history))
    assert [bool(by_epoch[e].latched) for e in range(3, 11)] == [False, False, True, True, False, True, True,
                                                                  False]
    assert [int(by_epoch[e].drop_count) for e in range(3, 11)] == [0, 0, 0, 0, 1, 1, 1, 2]
    assert abs(0.05 * float(by_epoch[7].kappa) - 0.01) < 1e-15
    assert abs(float(by_epoch[7].theta) - 0.05) < 1e-15
    assert abs(0.05 * float(by_epoch[10].kappa) - 0.002) < 1e-15
    assert abs(float(by_epoch[10].theta) - 0.25) < 1e-15
    assert [float(by_epoch[e].omega) for e in range(3, 11)] == [10, 20, 20.005, 50, 60, 60.04, 70, 80]


def test_detector_successive_drops_floor_and_cap():
    # After the spec sequence, a constant ω (Δ = 0 < θ) latches right after each drop: drops every 3 epochs.
    omegas = [10, 20, 20.005, 50, 60, 60.04, 70, 80] + [80.0] * 9
    history = _run_detector(omegas, min_kappa=1e-4 / 0.05)
    lrs, thetas, last = [], [], 0
    for state in history:
        if int(state.drop_count) > last:
            last = int(state.drop_count)
            lrs.append(0.05 * float(state.kappa))
            thetas.append(float(state.theta))
    assert max_rel_err(lrs, [0.01, 0.002, 4e-4, 1e-4, 1e-4]) < 1e-12
    assert max_rel_err(thetas, [0.05, 0.25, 1.0, 1.0, 1.0]) < 1e-12
    # Without the floor the fourth drop gives 8e-5; without growth θ stays 0.01 (so Δ_8 = 0.04 no longer latches).
    history = _run_detector(omegas, kappa=0.05, grow_theta=False, theta=0.01)
    assert int(history[-1].drop_count) == 4
    assert abs(float(history[-1].kappa) - 8e-5) < 1e-18
    assert float(history[-1].theta) == 0.01


def test_detector_floor_is_the_spec_rule():
    # spec §3: κ ← max(ρ·κ, min_lr/α). With min κ = 0.5 the drop to 0.2 is floored at 0.5; with
    # min κ = 10 > κ = 1 (α already below min_lr) the literal rule raises κ to 10 at the drop.
    history = _run_detector([10.0, 10.0, 10.0, 10.0, 10.0], theta=0.5, min_kappa=0.5)
    assert int(history[-1].drop_count) == 1 and float(history[-1].kappa) == 0.5
    history = _run_detector([10.0, 10.0, 10.0, 10.0, 10.0], theta=0.5, min_kappa=10.0)
    assert int(history[-1].drop_count) == 1 and float(history[-1].kappa) == 10.0


def test_detector_strict_threshold():
    # |Δ| == θ does not latch, just below does; both signs of Δ.
    for theta, omegas in [(0.5, [10.0, 10.5]), (0.5, [10.5, 10.0]), (0.01, [0.0, 0.01])]:
        assert not bool(_run_detector(omegas, theta=theta)[-1].latched)
    for theta, omegas in [(0.5, [10.0, 10.4999]), (0.5, [10.5, 10.0001])]:
        assert bool(_run_detector(omegas, theta=theta)[-1].latched)


def test_detector_undefined_omega_does_not_latch():
    history = _run_detector([10.0, float("nan"), 10.0, 10.0], theta=0.5)
    assert [bool(s.latched) for s in history] == [False, False, False, True]


def test_detector_ignores_delta_while_latched():
    # Latch at ω_4 (Δ = 0); big swings after do not unlatch; drop after E = 3 epochs.
    history = _run_detector([10.0, 10.0, 90.0, 5.0, 170.0], theta=0.5)
    assert [bool(s.latched) for s in history] == [False, True, True, False, False]
    assert int(history[3].drop_count) == 1 and int(history[4].drop_count) == 1


# -- the full optimizer: averaging, κ, memory ---------------------------------------------------------


def test_weighted_average_patience_3():
    # Collinear steps: ω = 0, Δ = 0 < θ; latch at e = 4 (x_4 = 1), drop at e = 6 (x_6 = 3).
    # The update at the drop moves the params to (1·1 + 2·2 + 3·3)/6 (α = 0: the base step is 0).
    xs = [np.array([e - 3.0]) for e in range(1, 8)]
    opt = autodrop(adaptlr.sgd(0.0), steps_per_epoch=1, patience_epochs=3, average=True)
    states, updates, _ = _drive(opt, xs)
    assert [int(s.drop_count) for s in states] == [0, 0, 0, 0, 0, 1, 1]
    assert abs(float((xs[5] + updates[5])[0]) - (1 * 1 + 2 * 2 + 3 * 3) / 6) < 1e-15
    assert all(float(u[0]) == 0.0 for i, u in enumerate(updates) if i != 5)
    assert float(states[5].weighted_param_sum[0]) == 0.0  # A reset at the drop
    assert float(states[4].weighted_param_sum[0]) == 1 * 1 + 2 * 2  # running sum, no snapshots


def test_weighted_average_uses_epoch_starts_only():
    # S = 3: the average is over x_e at epoch starts only; the params at the other steps of a latched
    # epoch (here 100 + t, far from the line) must not enter A. Epoch starts t = 1, 4, 7, ...: x_e = e - 3.
    S, patience = 3, 3
    xs = []
    for e in range(1, 8):
        xs.append(np.array([e - 3.0]))
        xs.extend(np.array([100.0 + 10 * e + k]) for k in range(1, S))
    opt = autodrop(adaptlr.sgd(0.0), steps_per_epoch=S, patience_epochs=patience, average=True)
    states, updates, _ = _drive(opt, xs)
    drop_step = (6 - 1) * S  # 0-based index of the first step of epoch 6 (latched at e = 4)
    assert [int(s.drop_count) for s in states][drop_step - 1:drop_step + 1] == [0, 1]
    assert abs(float((xs[drop_step] + updates[drop_step])[0]) - (1 * 1 + 2 * 2 + 3 * 3) / 6) < 1e-14
    assert all(float(u[0]) == 0.0 for i, u in enumerate(updates) if i != drop_step)
    assert float(states[drop_step - 1].weighted_param_sum[0]) == 1 * 1 + 2 * 2


def test_drop_scales_the_same_step_and_learning_rates():
    # S = 2, constant gradient 1 on a moving line: the step at the drop already uses ρ·κ.
    xs = [np.array([float(i)]) for i in range(12)]
    grads = [np.ones(1)] * 12
    opt = autodrop(adaptlr.sgd(0.1), steps_per_epoch=2, patience_epochs=1, drop_factor=0.5)
    states, updates, state = _drive(opt, xs, grads)
    # Epoch starts t = 1, 3, 5, 7: ω defined from e = 3 (t = 5), Δ from e = 4 (t = 7): latch and drop.
    assert [float(u[0]) for u in updates[:8]] == [-0.1] * 6 + [-0.05, -0.05]
    assert float(adaptlr.learning_rates(state)) == 0.1 * 0.5 ** int(states[-1].drop_count)
    assert set(states[-1].signals(None)) == {"omega", "theta", "latched", "drop_count", "kappa"}


def test_min_lr_floor_in_optimizer():
    xs = [np.array([float(i)]) for i in range(10)]
    opt = autodrop(adaptlr.sgd(0.1), steps_per_epoch=1, patience_epochs=1, drop_factor=0.1, min_lr=0.005,
                   theta=1.0, theta_max=1.0)
    states, _, state = _drive(opt, xs)
    assert [int(s.drop_count) for s in states][-1] >= 2
    assert abs(float(adaptlr.learning_rates(state)) - 0.005) < 1e-15


def test_state_holds_no_epoch_snapshots():
    params = {"w": np.ones((4, 3)), "b": np.ones(3)}
    shapes = {(4, 3), (3,)}
    for patience in (3, 50):
        for average in (False, True):
            opt = autodrop(adaptlr.sgd(0.1), steps_per_epoch=2, patience_epochs=patience, average=average)
            state = opt.init(params).adaptations[0]
            assert isinstance(state, AutoDropState)
            tree_fields = [f for f in state._fields if isinstance(getattr(state, f), dict)]
            assert tree_fields == ["previous_params", "previous_displacement"] + (
                ["weighted_param_sum"] if average else [])
            for f in tree_fields:
                assert {v.shape for v in getattr(state, f).values()} == shapes
            for f in set(state._fields) - set(tree_fields) - {"weighted_param_sum"}:
                assert np.asarray(getattr(state, f)).shape == (), f
            assert (state.weighted_param_sum is None) == (not average)


def test_float32_params_accumulate_in_float64():
    xs = [np.array([0.0, 0.0], np.float32), np.array([1.0, 0.0], np.float32), np.array([1.0, 1.0], np.float32)]
    opt = autodrop(adaptlr.sgd(0.1), steps_per_epoch=1)
    states, updates, _ = _drive(opt, xs, [np.ones(2, np.float32)] * 3)
    assert states[-1].kappa.dtype == np.float64 and states[-1].omega.dtype == np.float64
    assert all(u.dtype == np.float32 for u in updates)
    assert states[-1].previous_params.dtype == np.float32
    assert float(states[-1].omega) == 90.0


def test_widest_float_falls_back_without_float64():
    class NoFloat64:  # a namespace like JAX without x64: float64 requests give float32
        float64 = np.float64
        float32 = np.float32

        @staticmethod
        def asarray(x, dtype=None, device=None):
            return np.asarray(x, dtype=np.float32)

        result_type = staticmethod(np.result_type)

    class RaisesOnFloat64(NoFloat64):  # a namespace like PyTorch on MPS: float64 requests raise
        @staticmethod
        def asarray(x, dtype=None, device=None):
            raise TypeError("Cannot convert a MPS Tensor to float64 dtype")

    assert widest_float(NoFloat64, "cpu") == np.float32
    assert widest_float(RaisesOnFloat64, "cpu") == np.float32
    assert widest_float(np, "cpu") == np.float64


# -- the noisy quadratic ----------------------------------------------------------------------------


def _noisy_quadratic_omegas(dim: int, epochs: int, seed: int = 0, lam: float = 1.0, sigma: float = 1.0,
                            steps: int = 50, lr: float = 0.01) -> np.ndarray:
    """ω_e of SGD on (λ/2)‖x‖² with N(0, σ²) gradient noise, started from the stationary distribution."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=dim) * math.sqrt(lr * sigma**2 / (lam * (2 - lr * lam)))
    opt = autodrop(adaptlr.sgd(lr), steps_per_epoch=steps, theta=1e-9, theta_max=1e-9)
    state = opt.init(x)
    omegas = []
    for t in range(epochs * steps + 1):
        u, state = opt.update(lam * x + sigma * rng.normal(size=dim), state, x)
        x = x + u
        if t % steps == 0 and t >= 2 * steps:
            omegas.append(float(state.adaptations[0].omega))
    return np.asarray(omegas)


def test_noisy_quadratic_angle():
    r = (1 - 0.01) ** 50
    expected = math.degrees(math.acos(-(1 - r) / 2))
    assert abs(expected - 101.4) < 0.05
    omegas = _noisy_quadratic_omegas(20000, 12)
    assert len(omegas) == 11 and np.all(np.isfinite(omegas))
    assert abs(omegas.mean() - expected) < 1.0


# -- jit and backends --------------------------------------------------------------------------------

_H = np.array([1.0, 0.7, 0.4, 0.2, 0.1, 0.05])
_THETA = 2.0


def _problem_opt():
    return autodrop(adaptlr.sgd(0.3, momentum=0.5), steps_per_epoch=3, theta=_THETA, theta_max=20.0,
                    patience_epochs=2, drop_factor=0.5, average=True, min_lr=0.02)


def _problem_grad(x, t):
    return _H * x + 0.1 * np.sin(np.arange(6) * t)


def _run_problem(backend, update=None, epochs=30):
    """Params after every step and the AutoDrop state at every epoch start, as NumPy."""
    opt = _problem_opt()
    x = backend.asarray(np.random.default_rng(0).normal(size=6))
    params = {"w": x}
    state = opt.init(params)
    update = update or opt.update
    trajectory, records = [], []
    for t in range(1, 3 * epochs + 1):
        g = backend.asarray(_problem_grad(backend.to_numpy(params["w"]), t))
        u, state = update({"w": g}, state, params)
        params = adaptlr.apply_updates(params, u)
        trajectory.append(backend.to_numpy(params["w"]))
        if (t - 1) % 3 == 0:
            a = state.adaptations[0]
            records.append({f: backend.to_numpy(getattr(a, f)) for f in
                            ("omega", "theta", "latched", "drop_count", "kappa")})
    return trajectory, records


@functools.cache
def _eager_run(name: str):
    return _run_problem(BACKENDS[name])


def _numpy_reference():
    return _eager_run("numpy")


def test_problem_stays_far_from_threshold():
    _, records = _numpy_reference()
    assert int(records[-1]["drop_count"]) >= 3
    for prev, rec in itertools.pairwise(records):
        delta = rec["omega"] - prev["omega"]
        if np.isfinite(delta):
            assert abs(abs(delta) - prev["theta"]) > 0.1


def test_backends_agree(backend):
    trajectory, records = _eager_run(backend.name)
    ref_trajectory, ref_records = _numpy_reference()
    for rec, ref in zip(records, ref_records):
        for f in ("latched", "drop_count", "kappa", "theta"):
            assert np.array_equal(rec[f], ref[f]), f
        assert np.isnan(rec["omega"]) == np.isnan(ref["omega"])
        if not np.isnan(ref["omega"]):
            assert max_rel_err(rec["omega"], ref["omega"]) <= 1e-12
    assert max_rel_err(trajectory, ref_trajectory) <= 1e-12


def test_jit_matches_eager():
    jax_backend = BACKENDS["jax"]
    if not jax_backend.available:
        pytest.skip(f"jax: {jax_backend.unavailable_reason()}")
    import jax

    eager_trajectory, eager_records = _eager_run("jax")
    jitted = jax.jit(_problem_opt().update)
    jit_trajectory, jit_records = _run_problem(jax_backend, update=jitted)
    assert int(eager_records[-1]["drop_count"]) >= 3
    for rec, ref in zip(jit_records, eager_records):
        for f in ("latched", "drop_count", "kappa", "theta"):
            assert np.array_equal(rec[f], ref[f]), f
    assert max_rel_err(jit_trajectory, eager_trajectory) <= 1e-12
    assert jitted._cache_size() == 1


# -- Adam-type bases -----------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_weight_decay", [False, True])
@pytest.mark.parametrize("base", ["adam", "adamw"])
def test_wraps_adam_types(base, scale_weight_decay):
    rng = np.random.default_rng(1)
    make = {"adam": lambda: adaptlr.adam(0.01, weight_decay=0.1),
            "adamw": lambda: adaptlr.adamw(0.01, weight_decay=0.1)}[base]
    opt = autodrop(make(), steps_per_epoch=2, theta=500.0, theta_max=500.0, patience_epochs=2,
                   scale_weight_decay=scale_weight_decay)
    plain = make()
    x = rng.normal(size=5)
    state, plain_state = opt.init(x), plain.init(x)
    for t in range(1, 25):
        g = rng.normal(size=5)
        u, state = opt.update(g, state, x)
        plain_u, plain_state = plain.update(g, plain_state, x)
        kappa = float(state.adaptations[0].kappa)
        decay = 0.01 * 0.1 * x if base == "adamw" and not scale_weight_decay else 0.0
        assert max_rel_err(u, kappa * (plain_u + decay) - decay) < 1e-12, t
        x = x + u
    assert int(state.adaptations[0].drop_count) >= 3
    assert float(adaptlr.learning_rates(state)) == 0.01 * kappa


# -- input errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"drop_factor": 0.0}, ValueError, "drop_factor"),
    ({"drop_factor": 1.0}, ValueError, "drop_factor"),
    ({"drop_factor": 1.5}, ValueError, "drop_factor"),
    ({"theta": 0.0}, ValueError, "theta"),
    ({"theta": -1.0}, ValueError, "theta"),
    ({"theta_max": 0.0}, ValueError, "theta_max"),
    ({"theta": 2.0, "theta_max": 1.0}, ValueError, "theta_max"),
    ({"patience_epochs": 0}, ValueError, "patience_epochs"),
    ({"patience_epochs": -3}, ValueError, "patience_epochs"),
    ({"patience_epochs": 2.5}, ValueError, "patience_epochs"),
    ({"min_lr": -1e-4}, ValueError, "min_lr"),
    ({"steps_per_epoch": 0}, ValueError, "steps_per_epoch"),
    ({"average": 1}, TypeError, "average"),
    ({"grow_theta": None}, TypeError, "grow_theta"),
])
def test_bad_input(kwargs, error, match):
    args = {"steps_per_epoch": 10, **kwargs}
    with pytest.raises(error, match=match):
        autodrop(adaptlr.sgd(0.1), **args)


def test_opt_must_be_an_optimizer():
    with pytest.raises(TypeError, match="opt"):
        autodrop("sgd", steps_per_epoch=10)
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="opt"):
        autodrop(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), steps_per_epoch=10)


def test_jax_without_x64_accumulates_in_float32():
    # JAX's default (no x64) has no float64: the sums and κ/θ/ω fall back to float32, also under jit.
    if not BACKENDS["jax"].available:
        pytest.skip(f"jax: {BACKENDS['jax'].unavailable_reason()}")
    import os
    import subprocess
    import sys

    code = """
import jax, jax.numpy as jnp, adaptlr
opt = adaptlr.autodrop(adaptlr.sgd(0.1), steps_per_epoch=1, theta=100.0, theta_max=100.0, patience_epochs=1)
x = jnp.asarray([1.0, 2.0], dtype=jnp.float32)
state, update = opt.init(x), jax.jit(opt.update)
for t in range(6):
    u, state = update(x * 0.5 + jnp.asarray([0.0, 0.1 * t], dtype=jnp.float32), state, x)
    x = x + u
a = state.adaptations[0]
print(a.kappa.dtype, a.omega.dtype, u.dtype, int(a.drop_count))
"""
    env = {**os.environ, "JAX_ENABLE_X64": "0", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["float32", "float32", "float32", "3"]


def test_composes_with_active():
    xs = [np.array([float(i), 0.0]) for i in range(8)]
    opt = autodrop(adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=1.0), steps_per_epoch=1,
                   patience_epochs=1, drop_factor=0.5, theta=10.0, theta_max=10.0)
    state = opt.init(xs[0])
    for x in xs:
        _, state = opt.update(np.ones(2), state, x)
    gamma = state.adaptations[0].gamma
    kappa = float(state.adaptations[1].kappa)
    assert int(state.adaptations[1].drop_count) == 5 and kappa == 0.5**5
    assert np.allclose(adaptlr.learning_rates(state), 0.1 * gamma * kappa, rtol=1e-15, atol=0)
