"""Schedule-Free against ``schedulefree`` 1.4.1 and ``optax.contrib.schedule_free*`` (issue 19).

Float64, 200 steps, parameters of several shapes (0-D included) on the problem of
``lr_free_problem.py``, on every backend (and under ``jax.jit``): the training parameters ``y``
after every step and the evaluation parameters ``x`` after every step (upstream: the reference
versions' ``state["x"]``, else ``y.lerp(z, 1 - 1/β1)`` as their ``eval()``; optax:
``schedule_free_eval_params``), normwise relative error ≤ 1e-12. The cases are the conformance
suite's (:data:`adaptlr.conformance.upstream.CASES`). Then the semantics: the wrapper contract
(``learning_rates``/``lr_summary``, compositions, what cannot wrap it), eval/train views, checkpoints,
skipped non-finite steps.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from lr_free_problem import STEPS, max_err_over_steps, problem

import adaptlr
from adaptlr.conformance import upstream

TOL = upstream.TOLERANCE
CASES = {f"{c.upstream}-{c.settings}": c for c in upstream.CASES if c.algorithm.startswith("schedule_free")}


@functools.cache
def _reference(key: str) -> tuple[list, list]:
    case = CASES[key]
    missing = upstream.missing_modules(case)
    if missing:
        pytest.skip(f"the upstream needs {missing} (pip install schedulefree==1.4.1 / optax)")
    if case.upstream.startswith("optax"):
        from adaptlr.conformance.backends import enable_jax_x64

        enable_jax_x64()
    init, grad = problem()
    return upstream.reference(case, init, grad, STEPS)


def _run(opt, backend, step=None):
    """``(y after each step, x after each step, final state)``; ``x`` from the state's ``z``."""
    init, grad = problem()
    zs: list = []
    trajectory, state = upstream.run(opt, backend, init, grad, STEPS, step, on_step=lambda s: zs.append(
        ([backend.to_numpy(z) for z in s.adaptations[-1].z], float(backend.to_numpy(s.adaptations[-1].b1)))))
    xs = [np.concatenate([np.ravel((y - (1 - b1) * z) / b1) for y, z in zip(ys, z_list)])
          for ys, (z_list, b1) in zip(trajectory, zs)]
    return trajectory, xs, state


def _flat_err(a: list, b: list) -> float:
    return max(float(np.linalg.norm(x - y) / np.linalg.norm(y)) for x, y in zip(a, b))


# these on every backend (the conformance suite's upstream rows run every case on NumPy in the tests and on
# every backend in `adaptlr conformance --checks upstream`)
EVERY_BACKEND = ("schedulefree.AdamWScheduleFree-r-betas-eps-power", "schedulefree.SGDScheduleFree-wd-warmup-r",
                 "optax.contrib.schedule_free_adamw-lr-wd")


@pytest.mark.parametrize("key", EVERY_BACKEND)
def test_matches_upstream(key, backend):
    """Every case runs on NumPy in tests/test_conformance_upstream.py (y, final x); these on every backend
    with x after every step."""
    expected, expected_x = _reference(key)
    opt = CASES[key].build()
    trajectory, xs, state = _run(opt, backend)
    worst_y = max_err_over_steps(trajectory, expected)
    worst_x = _flat_err(xs, expected_x)
    assert worst_y <= TOL, f"{key} on {backend.name}: y max relative error {worst_y:.3e}"
    assert worst_x <= TOL, f"{key} on {backend.name}: x max relative error {worst_x:.3e}"
    # schedule_free_eval_params on the backend's own arrays, after the last step
    params = [backend.asarray(p) for p in trajectory[-1]]
    x = adaptlr.schedule_free_eval_params(state, params)
    got = np.concatenate([np.ravel(backend.to_numpy(p)) for p in x])
    assert np.linalg.norm(got - expected_x[-1]) <= TOL * np.linalg.norm(expected_x[-1])
    # and x differs from y: the test can tell the views apart
    assert np.linalg.norm(got - np.concatenate([np.ravel(p) for p in trajectory[-1]])) > 1e-3


def test_jit_matches_schedulefree(backend):
    if backend.library != "jax":
        pytest.skip("jax.jit of the functional step")
    import jax

    key = "schedulefree.AdamWScheduleFree-r-betas-eps-power"
    expected, expected_x = _reference(key)
    opt = CASES[key].build()
    trajectory, xs, _ = _run(opt, backend, step=jax.jit(opt.update))
    assert max_err_over_steps(trajectory, expected) <= TOL
    assert _flat_err(xs, expected_x) <= TOL


def test_a_setting_that_is_not_the_upstream_fails():
    """optax's warm-up is one step behind in the inner optimizer (its schedule counts from 0)."""
    case = upstream.UpstreamCase("schedule_free_sgd", "optax.contrib.schedule_free_sgd", "warmup",
                                 {"learning_rate": 0.1, "warmup_steps": 10})
    if upstream.missing_modules(case):
        pytest.skip("optax")
    from adaptlr.conformance.backends import BACKENDS, enable_jax_x64

    enable_jax_x64()
    (row,) = upstream.upstream_rows([BACKENDS["numpy"]], 1, [case])
    assert row.status == "fail" and row.max_rel_err_params > 1e-3


# -- the wrapper contract ----------------------------------------------------------------------------

def _quadratic_run(opt, steps=30, params=None):
    params = params or {"a": np.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": np.array(0.5)}
    state = opt.init(params)
    for t in range(steps):
        grads = {k: v * (1.0 + 0.1 * np.cos(t)) for k, v in params.items()}
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


def test_learning_rates_and_summary_report_warmup_and_averaging_weight():
    opt = adaptlr.schedule_free_adamw(0.01, warmup_steps=10, weight_decay=0.1)
    _, state = _quadratic_run(opt, steps=4)
    rates = adaptlr.learning_rates(state)
    np.testing.assert_allclose(float(rates["a"]), 0.01 * 4 / 10, rtol=1e-15)
    summary = adaptlr.lr_summary(state, flat=True)
    # c_4 = ω_4 / Σω with ω_t = (0.01·t/10)²
    c4 = 16 / (1 + 4 + 9 + 16)
    np.testing.assert_allclose(summary["c/['a']/max"], c4, rtol=1e-14)
    assert summary["warmup"] == pytest.approx(0.4)
    _, state = _quadratic_run(opt, steps=12)
    np.testing.assert_allclose(float(adaptlr.learning_rates(state)["b"]), 0.01, rtol=1e-15)


def test_sgd_closed_form_first_steps():
    """Gradient descent on f = ‖w‖²/2 with c_1 = 1, c_2 = 1/2 (constant lr, power 2): by hand."""
    opt = adaptlr.schedule_free_sgd(0.5, momentum=0.9)
    y = {"w": np.array([2.0])}
    state = opt.init(y)
    z, x = 2.0, 2.0
    for t in (1, 2, 3):
        updates, state = opt.update(y, state, y)
        z = z - 0.5 * float(y["w"][0])
        x = (1 - 1 / t) * x + z / t
        y = adaptlr.apply_updates(y, updates)
        assert float(y["w"][0]) == pytest.approx(0.1 * z + 0.9 * x, rel=1e-15)
        assert float(adaptlr.schedule_free_eval_params(state, y)["w"][0]) == pytest.approx(x, rel=1e-14)


def test_compositions_run_and_step_size_adaptations_cannot_wrap_it():
    inner = adaptlr.active(adaptlr.adamw(0.01, b1=0.0), steps_per_epoch=5)
    params, _ = _quadratic_run(adaptlr.schedule_free(inner), steps=12)
    assert all(np.all(np.isfinite(v)) for v in params.values())
    guarded = adaptlr.skip_nonfinite(adaptlr.schedule_free_adamw(0.01))
    _quadratic_run(guarded, steps=3)
    with pytest.raises(ValueError, match="cannot wrap schedule_free"):
        adaptlr.active(adaptlr.schedule_free_adamw(0.01), steps_per_epoch=5)
    with pytest.raises(ValueError, match="b1 must be in"):
        adaptlr.schedule_free_sgd(0.1, momentum=0.0)
    with pytest.raises(ValueError, match="wrapped once"):
        adaptlr.schedule_free_eval_params(adaptlr.adamw(0.1).init({"w": np.ones(2)}), {"w": np.ones(2)})


def test_eval_and_train_params_are_inverse():
    opt = adaptlr.schedule_free_sgd(0.1, momentum=0.8)
    y, state = _quadratic_run(opt, steps=5)
    x = adaptlr.schedule_free_eval_params(state, y)
    back = adaptlr.schedule_free_train_params(state, x)
    for k in y:
        np.testing.assert_allclose(back[k], y[k], rtol=1e-14, atol=1e-15)
        assert not np.allclose(x[k], y[k])


def test_nonfinite_step_leaves_both_views_untouched():
    opt = adaptlr.skip_nonfinite(adaptlr.schedule_free_adamw(0.01, warmup_steps=3))
    y, state = _quadratic_run(opt, steps=4)
    x = adaptlr.schedule_free_eval_params(state, y)
    bad = {k: np.full_like(v, np.nan) for k, v in y.items()}
    updates, new_state = opt.update(bad, state, y)
    y2 = adaptlr.apply_updates(y, updates)
    x2 = adaptlr.schedule_free_eval_params(new_state, y2)
    for k in y:
        np.testing.assert_array_equal(y2[k], y[k])
        np.testing.assert_array_equal(x2[k], x[k])
    assert int(new_state.count) == int(state.count)


def test_checkpoint_resume_is_bit_identical(tmp_path):
    opt = adaptlr.schedule_free_adamw(0.01, warmup_steps=3, weight_decay=0.1, r=0.5)
    params = {"a": np.linspace(-1.0, 1.0, 6).reshape(2, 3), "b": np.array(0.5)}

    def steps(params, state, ts):
        for t in ts:
            grads = {k: v * (1.0 + 0.1 * np.cos(t)) for k, v in params.items()}
            updates, state = opt.update(grads, state, params)
            params = adaptlr.apply_updates(params, updates)
        return params, state

    mid, mid_state = steps(params, opt.init(params), range(5))
    end, end_state = steps(mid, mid_state, range(5, 10))
    adaptlr.save_state(tmp_path / "sf.npz", mid_state, optimizer=opt)
    loaded = adaptlr.load_state(tmp_path / "sf.npz", mid, optimizer=opt, strict=True)
    resumed, resumed_state = steps(mid, loaded, range(5, 10))
    x_end = adaptlr.schedule_free_eval_params(end_state, end)
    x_resumed = adaptlr.schedule_free_eval_params(resumed_state, resumed)
    for k in end:
        np.testing.assert_array_equal(resumed[k], end[k])
        np.testing.assert_array_equal(x_resumed[k], x_end[k])


def test_torch_compile_fullgraph_of_the_functional_step():
    torch = pytest.importorskip("torch")
    opt = adaptlr.schedule_free_adamw(0.01, warmup_steps=3, weight_decay=0.1)
    params = [torch.linspace(-1.0, 1.0, 6, dtype=torch.float64).reshape(2, 3), torch.tensor(0.5, dtype=torch.float64)]
    state = opt.init(params)
    compiled = torch.compile(opt.update, fullgraph=True, backend="eager")
    eager_params, eager_state = params, state
    for _ in range(3):
        grads = [p * 1.5 for p in params]
        updates, state = compiled(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        e_updates, eager_state = opt.update([p * 1.5 for p in eager_params], eager_state, eager_params)
        eager_params = adaptlr.apply_updates(eager_params, e_updates)
    for a, b in zip(params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=0.0)
