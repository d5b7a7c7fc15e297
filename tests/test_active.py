"""ActiveLR (spec §2): the spec's test vectors, identity with the base, epoch timing, weight decay,
jax.jit, cross-backend agreement, schedules, composition and input errors."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import max_rel_err

import adaptlr
from adaptlr.active import ActiveState

# -- helpers ------------------------------------------------------------------------------------------


def _run(backend, opt, init, grad, steps, *, dtype="float64", update=None):
    """Run ``steps`` updates; the gradient is computed in NumPy from the current params.

    Returns per step (lists of NumPy arrays): params after the step, updates, γ after the step
    (of the outermost ActiveLR), learning_rates after the step; and the final state.
    """
    params = [backend.asarray(x, dtype) for x in init]
    state = opt.init(params)
    update = update or opt.update
    trace = {"params": [], "updates": [], "gamma": [], "prev_sum": [], "lr": []}
    for _ in range(steps):
        grads = [backend.asarray(g, dtype) for g in grad([backend.to_numpy(p) for p in params])]
        updates, state = update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        trace["params"].append([backend.to_numpy(p) for p in params])
        trace["updates"].append([backend.to_numpy(u) for u in updates])
        actives = [a for a in state.adaptations if isinstance(a, ActiveState)]
        if actives:
            trace["gamma"].append([backend.to_numpy(g) for g in actives[-1].gamma])
            trace["prev_sum"].append([backend.to_numpy(g) for g in actives[-1].prev_epoch_grad_sum])
        trace["lr"].append([backend.to_numpy(np_lr) for np_lr in adaptlr.learning_rates(state)])
    return trace, state


def _scalar_trace(trace, key):
    return np.array([float(step[0]) for step in trace[key]])


def _quadratic(ws):  # f = ½ w²
    return [w.copy() for w in ws]


# -- spec §2 test vectors (exact, float64) ------------------------------------------------------------


def test_vector_alpha_0_1(backend):
    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0, decrease=0.5)
    trace, _ = _run(backend, opt, [np.array(1.0)], _quadratic, 10)
    gamma = _scalar_trace(trace, "gamma")
    w = _scalar_trace(trace, "params")
    assert np.array_equal(gamma, [1, 3, 5, 7, 9, 11, 13, 6.5, 3.25, 5.25])
    exact_w = [0.9, 0.81, 0.567, 0.2835, 0.08505, 0.008505, -0.0008505, 0.00025515, 8.93025e-5, 6.02791875e-5]
    assert max_rel_err(w, exact_w) < 1e-13
    spec_w = [0.9, 0.81, 0.567, 0.2835, 0.08505, 0.008505, -0.0008505, 0.00025515, 8.93025e-5, 6.027919e-5]
    assert np.allclose(w, spec_w, rtol=1e-7, atol=0)  # the spec rounds the last value to 7 digits


def test_vector_alpha_1_5(backend):
    opt = adaptlr.active(adaptlr.sgd(1.5), steps_per_epoch=1, increase=2.0, decrease=0.5)
    trace, _ = _run(backend, opt, [np.array(1.0)], _quadratic, 5)
    assert np.array_equal(_scalar_trace(trace, "gamma"), [1, 0.5, 0.25, 2.25, 4.25])
    # w_t = w_{t-1}·(1 - α·γ_used); γ_used is the γ after the previous step
    assert np.array_equal(_scalar_trace(trace, "params"), [-0.5, 0.25, 0.0625, 0.0390625, -0.0927734375])


def test_constant_gradient_grows_linearly_after_two_epochs():
    S, h, alpha, c, epochs = 3, 0.25, 0.1, 0.7, 7
    opt = adaptlr.active(adaptlr.sgd(alpha), steps_per_epoch=S, increase=h)
    from adaptlr.conformance.backends import BACKENDS

    trace, _ = _run(BACKENDS["numpy"], opt, [np.zeros(2)], lambda ws: [np.full(2, c)], S * epochs)
    used = [1.0 if e <= 2 else 1.0 + h * (e - 2) for e in range(1, epochs + 1) for _ in range(S)]
    gamma_after = np.array([g[0] for g in trace["gamma"]])
    gamma_used = np.concatenate([np.ones((1, 2)), gamma_after[:-1]])
    assert np.array_equal(gamma_used, np.repeat(np.array(used)[:, None], 2, axis=1))
    assert np.array_equal(gamma_after[-1], np.full(2, 1 + h * (epochs - 1)))
    updates = np.array([u[0] for u in trace["updates"]])
    assert max_rel_err(updates, -alpha * c * np.repeat(np.array(used)[:, None], 2, axis=1)) < 1e-15


@pytest.mark.parametrize("decrease", [0.5, 0.3])
def test_zero_gradient_shrinks_every_epoch(decrease):
    from adaptlr.conformance.backends import BACKENDS

    S = 2
    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=S, decrease=decrease)
    trace, _ = _run(BACKENDS["numpy"], opt, [np.ones(3)], lambda ws: [np.zeros(3)], S * 7)
    for E in range(2, 8):  # a zero product counts as a flip
        assert max_rel_err(trace["gamma"][E * S - 1][0], np.full(3, decrease ** (E - 1))) < 1e-15
    assert np.array_equal(trace["gamma"][S - 1][0], np.ones(3))


def test_even_steps_per_epoch_blind_spot():
    from adaptlr.conformance.backends import BACKENDS

    def epoch_end_gammas(S, epochs):
        opt = adaptlr.active(adaptlr.sgd(1.5), steps_per_epoch=S, increase=2.0, decrease=0.5)
        trace, _ = _run(BACKENDS["numpy"], opt, [np.array(1.0)], _quadratic, S * epochs)
        return _scalar_trace(trace, "gamma")[S - 1 :: S], _scalar_trace(trace, "params")

    # S = 2: a period-2 oscillation sums to one sign every epoch, so γ only grows and GD diverges.
    gammas, w = epoch_end_gammas(2, 40)
    assert np.array_equal(gammas[:5], [1, 3, 1.5, 3.5, 5.5])
    assert np.array_equal(gammas[2:], 1.5 + 2.0 * np.arange(38))
    assert abs(w[-1]) > 1e100
    # S = 3: the oscillation flips the epoch sums, so γ is decreased again and stays bounded.
    gammas, _ = epoch_end_gammas(3, 40)
    assert np.array_equal(gammas[:5], [1, 0.5, 0.25, 2.25, 4.25])
    assert gammas.max() < 4.3


# -- identity with the base, epoch timing, weight decay -------------------------------------------------

SHAPES = [(3, 2), (4,), ()]


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    init = [rng.normal(size=s) for s in SHAPES]
    coeffs = [rng.normal(size=s) for s in SHAPES]

    def grad(ws):  # ∇ Σ (a·sin w + w⁴/4)
        return [np.cos(w) * a + w**3 for w, a in zip(ws, coeffs)]

    return init, grad


BASES = {
    "sgd-momentum": (adaptlr.sgd, dict(learning_rate=0.05, momentum=0.9, weight_decay=0.01), adaptlr.active_sgd),
    "adamw": (adaptlr.adamw, dict(learning_rate=0.05, weight_decay=0.1), adaptlr.active_adamw),
    "radam": (adaptlr.radam, dict(learning_rate=0.05, weight_decay=0.1, decoupled_weight_decay=True),
              adaptlr.active_radam),
    "adabelief": (adaptlr.adabelief, dict(learning_rate=0.05, weight_decay=0.1), adaptlr.active_adabelief),
}


@pytest.mark.parametrize("name", list(BASES))
def test_no_increase_no_decrease_equals_base_bitwise(backend, name):
    base, kwargs, preset = BASES[name]
    init, grad = _problem()
    reference, _ = _run(backend, base(**kwargs), init, grad, 12)
    wrapped, _ = _run(backend, preset(**kwargs, steps_per_epoch=2, increase=0.0, decrease=1.0), init, grad, 12)
    for key in ("params", "updates", "lr"):
        for ref_step, act_step in zip(reference[key], wrapped[key]):
            for r, a in zip(ref_step, act_step):
                assert np.array_equal(np.broadcast_to(r, a.shape), a), key


@pytest.mark.parametrize("name", list(BASES))
def test_presets_equal_active_of_base(name):
    base, kwargs, preset = BASES[name]
    from adaptlr.conformance.backends import BACKENDS

    init, grad = _problem()
    a, _ = _run(BACKENDS["numpy"], preset(**kwargs, steps_per_epoch=2, increase=0.4), init, grad, 8)
    b, _ = _run(BACKENDS["numpy"], adaptlr.active(base(**kwargs), 2, increase=0.4), init, grad, 8)
    assert all(np.array_equal(x, y) for sa, sb in zip(a["params"], b["params"]) for x, y in zip(sa, sb))
    with pytest.raises(TypeError):
        preset(**kwargs)  # steps_per_epoch is required


def test_gamma_changes_first_after_the_update_of_step_2S():
    from adaptlr.conformance.backends import BACKENDS

    S, h, alpha, c = 3, 0.5, 0.1, 2.0
    opt = adaptlr.active(adaptlr.sgd(alpha), steps_per_epoch=S, increase=h)
    trace, _ = _run(BACKENDS["numpy"], opt, [np.array(0.0)], lambda ws: [np.array(c)], 2 * S + 1)
    lr = _scalar_trace(trace, "lr")
    updates = _scalar_trace(trace, "updates")
    assert np.array_equal(lr[: 2 * S - 1], np.full(2 * S - 1, alpha))  # after steps 1 .. 2S-1
    assert lr[2 * S - 1] == alpha * (1 + h)  # decided at step 2S, used from step 2S+1 on
    assert np.array_equal(updates[: 2 * S], np.full(2 * S, -alpha * c))  # step 2S itself uses γ = 1
    assert updates[2 * S] == -alpha * (1 + h) * c


@pytest.mark.parametrize("scale_weight_decay", [False, True])
def test_decoupled_weight_decay_not_scaled_by_gamma(scale_weight_decay):
    """AdamW with β1 = β2 = ε = 0 has d_t = sign(g): the update is known in closed form."""
    from adaptlr.conformance.backends import BACKENDS

    S, h, alpha, lam, c, steps = 2, 1.0, 0.1, 0.2, 3.0, 10
    opt = adaptlr.active(adaptlr.adamw(alpha, b1=0.0, b2=0.0, eps=0.0, weight_decay=lam), S, increase=h,
                         scale_weight_decay=scale_weight_decay)
    trace, _ = _run(BACKENDS["numpy"], opt, [np.array([1.0, -2.0])], lambda ws: [np.full(2, c)], steps)
    theta = np.array([1.0, -2.0])
    for t in range(1, steps + 1):
        epoch = (t - 1) // S + 1
        gamma = 1.0 if epoch <= 2 else 1.0 + h * (epoch - 2)
        decay = alpha * lam * (gamma if scale_weight_decay else 1.0)
        theta = theta - alpha * gamma * 1.0 - decay * theta
        assert max_rel_err(trace["params"][t - 1][0], theta) < 1e-14, t
    assert gamma > 1  # the check above saw γ ≠ 1


# -- jax.jit, cross-backend agreement -------------------------------------------------------------------


def _signs_problem():
    """Quadratic with a strong, slowly rotating drift: epoch sums have clear signs and both flip and keep."""
    rng = np.random.default_rng(3)
    init = [rng.normal(size=s) for s in SHAPES]
    curv = [0.5 + rng.random(size=s) for s in SHAPES]
    phase = [rng.uniform(0, 2 * np.pi, size=s) for s in SHAPES]
    t = [0]

    def grad(ws):
        t[0] += 1
        return [h * w + np.sin(0.3 * t[0] + p) for w, h, p in zip(ws, curv, phase)]

    return init, grad


def test_jit_matches_eager_and_adjusts_at_epoch_ends():
    jax = pytest.importorskip("jax")
    from adaptlr.conformance.backends import BACKENDS

    jb = BACKENDS["jax"]
    if not jb.available:
        pytest.skip(jb.unavailable_reason())
    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0, decrease=0.5)
    jitted = jax.jit(opt.update)
    trace, _ = _run(jb, opt, [np.array(1.0)], _quadratic, 10, update=jitted)
    assert np.array_equal(_scalar_trace(trace, "gamma"), [1, 3, 5, 7, 9, 11, 13, 6.5, 3.25, 5.25])

    opt = adaptlr.active_adamw(0.05, steps_per_epoch=3, increase=0.5)
    init, grad = _signs_problem()
    eager, _ = _run(jb, opt, init, grad, 24)
    init, grad = _signs_problem()
    jitted = jax.jit(opt.update)
    compiled, _ = _run(jb, opt, init, grad, 24, update=jitted)
    assert max_rel_err(compiled["params"][-1], eager["params"][-1]) < 1e-12
    assert all(np.array_equal(a, b) for a, b in zip(compiled["gamma"][-1], eager["gamma"][-1]))
    if hasattr(jitted, "_cache_size"):  # a private JAX helper: checked where it exists
        assert jitted._cache_size() == 1  # one trace serves every step, boundary or not


@pytest.mark.parametrize("name", ["sgd-momentum", "adamw"])
def test_same_trajectory_on_every_backend(backend, name):
    from adaptlr.conformance.backends import BACKENDS

    _base, kwargs, preset = BASES[name]
    opt = preset(**kwargs, steps_per_epoch=4, increase=0.5)
    steps = 4 * 10
    init, grad = _signs_problem()
    reference, _ = _run(BACKENDS["numpy"], opt, init, grad, steps)
    init, grad = _signs_problem()
    actual, _ = _run(backend, opt, init, grad, steps)
    assert max_rel_err(actual["params"][-1], reference["params"][-1]) < 1e-12
    assert max_rel_err(actual["gamma"][-1], reference["gamma"][-1]) < 1e-12
    gammas = np.concatenate([g.ravel() for g in reference["gamma"][-1]])
    assert gammas.min() < 1 < gammas.max()  # the run saw both increases and flips
    sums = np.concatenate([np.ravel(s) for step in reference["prev_sum"][3::4] for s in step])  # epoch ends
    assert np.abs(sums).min() > 1e-3  # every epoch sum is far from zero: rounding cannot flip a decision


# -- schedules, composition, dtype, signals ------------------------------------------------------------


def test_schedule_scales_alpha_and_gamma_still_adapts(backend):
    def schedule(t):
        return 0.1 * 0.9**t

    opt = adaptlr.active(adaptlr.sgd(schedule), steps_per_epoch=2, increase=0.5)
    init, grad = _signs_problem()
    trace, _ = _run(backend, opt, init, grad, 12)
    for t, (lrs, gammas) in enumerate(zip(trace["lr"], trace["gamma"]), start=1):
        for lr, gamma in zip(lrs, gammas):
            assert max_rel_err(lr, schedule(np.float64(t)) * gamma) < 1e-15
    assert any(not np.all(g == 1) for g in trace["gamma"][-1])


def test_composes_with_itself_multiplying_gammas():
    inner = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=2, increase=0.5)
    opt = adaptlr.active(inner, steps_per_epoch=3, increase=0.25, decrease=0.3)
    assert opt.name == "active(active(sgd))"
    init, grad = _signs_problem()
    params = [np.asarray(x) for x in init]
    state = opt.init(params)
    for _ in range(18):
        g1, g2 = (s.gamma for s in state.adaptations)
        grads = grad(params)
        updates, state = opt.update(grads, state, params)
        for u, g, a, b in zip(updates, grads, g1, g2):
            assert max_rel_err(u, -0.1 * a * b * g) < 1e-15
        params = adaptlr.apply_updates(params, updates)
    g1, g2 = (s.gamma for s in state.adaptations)
    for lr, a, b in zip(adaptlr.learning_rates(state), g1, g2):
        assert max_rel_err(np.broadcast_to(lr, a.shape), 0.1 * a * b) < 1e-15
    assert not all(np.all(a == 1) for a in g1) and not all(np.all(b == 1) for b in g2)


def test_float32_dtype_kept_and_signals(backend):
    opt = adaptlr.active_adamw(0.05, steps_per_epoch=2, min_gamma=0.1, max_gamma=1.3, increase=0.5)
    init, grad = _signs_problem()
    trace, state = _run(backend, opt, init, grad, 10, dtype="float32")
    active_state = state.adaptations[0]
    for field in active_state:
        for leaf, shape in zip(field, SHAPES):
            assert leaf.dtype == backend.xp.float32 and tuple(leaf.shape) == shape
    signals = active_state.signals(None)
    assert set(signals) == {"gamma"}
    gammas = np.concatenate([backend.to_numpy(g).ravel() for g in signals["gamma"]])
    assert gammas.min() >= np.float32(0.1) and gammas.max() <= np.float32(1.3)
    assert all(u.dtype == np.float32 for u in trace["updates"][-1])


def test_gamma_clipping():
    from adaptlr.conformance.backends import BACKENDS

    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0, max_gamma=6.0)
    trace, _ = _run(BACKENDS["numpy"], opt, [np.array(1.0)], _quadratic, 5)
    assert np.array_equal(_scalar_trace(trace, "gamma"), [1, 3, 5, 6, 6])
    opt = adaptlr.active(adaptlr.sgd(1.5), steps_per_epoch=1, increase=2.0, min_gamma=0.4)
    trace, _ = _run(BACKENDS["numpy"], opt, [np.array(1.0)], _quadratic, 4)
    assert np.array_equal(_scalar_trace(trace, "gamma"), [1, 0.5, 0.4, 2.4])


# -- input errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(steps_per_epoch=0), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=-3), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=2.0), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=True), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=2**31), ValueError, "steps_per_epoch"),
        (dict(steps_per_epoch=2, decrease=0.0), ValueError, "decrease"),
        (dict(steps_per_epoch=2, decrease=1.5), ValueError, "decrease"),
        (dict(steps_per_epoch=2, decrease=-0.5), ValueError, "decrease"),
        (dict(steps_per_epoch=2, increase=-0.1), ValueError, "increase"),
        (dict(steps_per_epoch=2, increase=float("nan")), ValueError, "increase"),
        (dict(steps_per_epoch=2, min_gamma=2.0, max_gamma=1.0), ValueError, "min_gamma"),
        (dict(steps_per_epoch=2, min_gamma=-1.0), ValueError, "min_gamma"),
        (dict(steps_per_epoch=2, max_gamma=0.0), ValueError, "max_gamma"),
        (dict(steps_per_epoch=2, scale_weight_decay="yes"), TypeError, "scale_weight_decay"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        adaptlr.active(adaptlr.sgd(0.1), **kwargs)


def test_opt_must_be_an_optimizer():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="opt"):
        adaptlr.active(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1), steps_per_epoch=2)
    with pytest.raises(TypeError, match="opt"):
        adaptlr.active(adaptlr.sgd, steps_per_epoch=2)


def test_epoch_sum_uses_the_raw_gradient():
    """Coupled weight decay changes the direction but not C, the sum of raw gradients."""
    init, grad = _problem()
    opt = adaptlr.active(adaptlr.sgd(0.05, weight_decay=0.5), steps_per_epoch=3)
    params = [np.asarray(x) for x in init]
    state = opt.init(params)
    raw = []
    for _ in range(4):
        raw.append(grad(params))
        updates, state = opt.update(raw[-1], state, params)
        params = adaptlr.apply_updates(params, updates)
    epoch1 = [a + b + c for a, b, c in zip(*raw[:3])]
    assert all(np.array_equal(s, e) for s, e in zip(state.adaptations[0].prev_epoch_grad_sum, epoch1))
    assert all(np.array_equal(s, g) for s, g in zip(state.adaptations[0].epoch_grad_sum, raw[3]))


@pytest.mark.parametrize("order", ["autodrop(active)", "active(autodrop)"])
def test_composes_with_autodrop(order):
    """κ of AutoDrop and γ of ActiveLR multiply, in either order (spec §0.1)."""
    alpha, S = 0.05, 2

    def wrap_active(opt):
        return adaptlr.active(opt, steps_per_epoch=S, increase=0.5)

    def wrap_autodrop(opt):  # θ = 180° latches at the first chance, patience 1 drops right away
        return adaptlr.autodrop(opt, steps_per_epoch=S, drop_factor=0.2, theta=180.0, theta_max=180.0,
                                patience_epochs=1)

    base = adaptlr.sgd(alpha)
    opt = wrap_autodrop(wrap_active(base)) if order == "autodrop(active)" else wrap_active(wrap_autodrop(base))
    init, grad = _signs_problem()
    params = [np.asarray(x) for x in init]
    state = opt.init(params)
    (active_index,) = [i for i, s in enumerate(state.adaptations) if isinstance(s, ActiveState)]
    for _ in range(S * 8):
        gammas = state.adaptations[active_index].gamma
        grads = grad(params)
        updates, state = opt.update(grads, state, params)
        kappa = float(state.adaptations[1 - active_index].kappa)  # the κ this step used
        for u, g, gamma in zip(updates, grads, gammas):
            assert max_rel_err(u, -alpha * kappa * gamma * g) < 1e-14
        params = adaptlr.apply_updates(params, updates)
    gammas = state.adaptations[active_index].gamma
    for lr, gamma in zip(adaptlr.learning_rates(state), gammas):
        assert max_rel_err(np.broadcast_to(lr, gamma.shape), alpha * kappa * gamma) < 1e-14
    assert kappa < 1 and not all(np.all(g == 1) for g in gammas)  # both multipliers moved
