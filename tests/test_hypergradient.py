"""Hypergradient descent (spec §4): the spec's test vectors, every granularity and mode, composition,
coupled L2 decay, cross-backend agreement, jax.jit and input errors."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import pytest
from conftest import max_rel_err

import adaptlr
from adaptlr.conformance.backends import BACKENDS
from adaptlr.core import Adaptation, Optimizer


def quadratic_run(opt: Optimizer, x0: dict, h: dict, steps: int, backend: Any = None, dtype: str = "float64"):
    """Minimise ``Σ ½ h ⊙ x²``; returns (learning rates, params) per step as NumPy trees."""
    backend = backend or BACKENDS["numpy"]
    params = {k: backend.asarray(v, dtype) for k, v in x0.items()}
    curvature = {k: backend.asarray(v, dtype) for k, v in h.items()}
    state = opt.init(params)
    rates, xs = [], []
    for _ in range(steps):
        grads = {k: curvature[k] * params[k] for k in params}
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        lr = adaptlr.learning_rates(state)
        rates.append({k: backend.to_numpy(lr[k]) for k in lr})
        xs.append({k: backend.to_numpy(params[k]) for k in params})
    return rates, xs


def scalar_run(opt: Optimizer, steps: int, x0: float = 1.0, h: float = 1.0):
    rates, xs = quadratic_run(opt, {"x": np.array(x0)}, {"x": np.array(h)}, steps)
    return [float(r["x"]) for r in rates], [float(x["x"]) for x in xs]


# -- the spec's test vectors (float64, f = ½hx²) ------------------------------------------------------


def test_sgd_hd_vector():
    rates, xs = scalar_run(adaptlr.sgd_hd(0.1, hyper_lr=0.1), 6)
    assert rates == pytest.approx([0.1, 0.19, 0.25561, 0.2951699366, 0.3159257873, 0.3259333466], rel=1e-9)
    assert xs == pytest.approx([0.9, 0.729, 0.54266031, 0.3824833007, 0.2616469628, 0.1763674926], rel=1e-9)


@pytest.mark.parametrize("h", [1.0, 2.0, 0.3])
def test_sgd_hd_closed_form(h):
    # α_t = α_{t-1} + β·h²·x_{t-1}·x_{t-2} for t >= 2 (x_0 the start).
    beta, x0 = 0.05, 1.5
    rates, xs = scalar_run(adaptlr.sgd_hd(0.2, hyper_lr=beta), 8, x0=x0, h=h)
    xs = [x0, *xs]
    for t in range(2, 9):
        expected = rates[t - 2] + beta * h * h * xs[t - 1] * xs[t - 2]
        assert rates[t - 1] == pytest.approx(expected, rel=1e-13)
        assert xs[t] == pytest.approx(xs[t - 1] - rates[t - 1] * h * xs[t - 1], rel=1e-13)


def test_sgd_hd_from_zero_learning_rate():
    rates, xs = scalar_run(adaptlr.sgd_hd(0.0, hyper_lr=0.01), 3, x0=3.0, h=2.0)
    assert rates == pytest.approx([0.0, 0.36, 0.4608], rel=1e-12, abs=0)
    assert xs == pytest.approx([3.0, 0.84, 0.065856], rel=1e-12)


def test_sgdn_hd_vector():
    rates, xs = scalar_run(adaptlr.sgdn_hd(0.05, hyper_lr=0.01, momentum=0.9), 4)
    assert rates == pytest.approx([0.05, 0.067195, 0.0857875901, 0.0997889695], rel=1e-9)
    assert xs == pytest.approx([0.905, 0.7350302475, 0.4897972016, 0.2062134969], rel=1e-9)


def test_adam_hd_vector():
    rates, xs = scalar_run(adaptlr.adam_hd(0.1, hyper_lr=0.01), 5)
    assert rates == pytest.approx([0.1, 0.1089999999, 0.1168818674, 0.1235575480, 0.1289668792], rel=1e-9)
    assert xs == pytest.approx([0.900000001, 0.7914493304, 0.6760305860, 0.5557719643, 0.4330594837], rel=1e-9)


def test_multiplicative_vector():
    opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.5, mode="multiplicative")
    rates, _ = scalar_run(opt, 8)
    assert rates == pytest.approx([0.1, 0.15, 0.225, 0.3375, 0.50625, 0.759375, 1.1390625, 0.56953125], rel=1e-13)


def test_exact_line_search_is_a_fixed_point():
    curvature, x0 = np.array([1.0, 10.0]), np.array([1.0, 1.0])
    g = curvature * x0
    alpha = float(g @ g / (g @ (curvature * g)))
    opt = adaptlr.hypergradient(adaptlr.sgd(alpha), hyper_lr=1.0)
    rates, xs = quadratic_run(opt, {"x": x0}, {"x": curvature}, 2)
    g2 = curvature * xs[0]["x"]
    assert abs(g2 @ g) < 1e-14 * np.linalg.norm(g2) * np.linalg.norm(g)
    assert abs(float(rates[1]["x"]) - alpha) < 1e-14  # β·⟨g_2, g_1⟩ with β = 1
    # a slightly longer first step is not a fixed point: the rate moves visibly
    longer = adaptlr.hypergradient(adaptlr.sgd(1.2 * alpha), hyper_lr=1.0)
    off, _ = quadratic_run(longer, {"x": x0}, {"x": curvature}, 2)
    assert abs(float(off[1]["x"]) - 1.2 * alpha) > 1e-3


# -- granularities and modes ----------------------------------------------------------------------


def reference_sgd_hd(x0: dict, h: dict, alpha: float, beta: float, mode: str, granularity: str, steps: int):
    """Plain SGD with HD written out on NumPy float64 arrays, as spec §4 reads."""
    x = {k: np.array(v, dtype=np.float64) for k, v in x0.items()}
    a = {k: np.full(np.shape(v), alpha) for k, v in x.items()} if granularity == "element" else None
    a = a or ({k: alpha for k in x} if granularity == "tensor" else alpha)
    d_prev = {k: np.zeros_like(v) for k, v in x.items()}
    rates = []
    for _ in range(steps):
        g = {k: h[k] * x[k] for k in x}
        if granularity == "global":
            dot = sum(float(np.sum(g[k] * d_prev[k])) for k in x)
            norm = math.sqrt(sum(float(np.sum(g[k] ** 2)) for k in x) * sum(float(np.sum(d_prev[k] ** 2)) for k in x))
            cos = dot / norm if norm > 0 else 0.0
            a = a + beta * dot if mode == "additive" else a * (1 + beta * cos)
            rate = {k: a for k in x}
        elif granularity == "tensor":
            for k in x:
                dot = float(np.sum(g[k] * d_prev[k]))
                norm = float(np.linalg.norm(g[k]) * np.linalg.norm(d_prev[k]))
                cos = dot / norm if norm > 0 else 0.0
                a[k] = a[k] + beta * dot if mode == "additive" else a[k] * (1 + beta * cos)
            rate = dict(a)
        else:
            for k in x:
                h_k = g[k] * d_prev[k]
                a[k] = a[k] + beta * h_k if mode == "additive" else a[k] * (1 + beta * np.sign(h_k))
            rate = dict(a)
        x = {k: x[k] - rate[k] * g[k] for k in x}
        d_prev = g
        rates.append({k: np.broadcast_to(rate[k], np.shape(x[k])) for k in x})
    return rates, [dict(v) for v in [x]]


# One tensor flips sign every step (h·α > 1 on its first element), the other does not.
X0 = {"a": np.array([1.0, -2.0, 0.5]), "b": np.array([[0.3, -0.7], [1.1, 0.2]])}
H = {"a": np.array([12.0, 1.0, 3.0]), "b": np.array([[1.0, 2.0], [0.5, 4.0]])}


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
def test_granularity_matches_written_out_rule(mode, granularity):
    beta = 0.05 if mode == "additive" else 0.5
    opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=beta, mode=mode, granularity=granularity)
    rates, _ = quadratic_run(opt, X0, H, 5)
    expected_rates, _ = reference_sgd_hd(X0, H, 0.1, beta, mode, granularity, 5)
    for got, want in zip(rates, expected_rates, strict=True):
        for k in X0:
            assert max_rel_err(np.broadcast_to(got[k], X0[k].shape), want[k]) < 1e-13
    assert not np.allclose(rates[-1]["a"], 0.1)  # the rates did move


def test_global_sums_over_every_tensor_by_hand():
    # Step 2 of SGD-HD: H = Σ_all g_2 ⊙ g_1 with g_1 = h ⊙ x_0, g_2 = h ⊙ (x_0 - α g_1).
    alpha, beta = 0.1, 0.05
    g1 = {k: H[k] * X0[k] for k in X0}
    g2 = {k: H[k] * (X0[k] - alpha * g1[k]) for k in X0}
    per_tensor = {k: float(np.sum(g1[k] * g2[k])) for k in X0}
    expected = {
        "global": {k: alpha + beta * sum(per_tensor.values()) for k in X0},
        "tensor": {k: alpha + beta * per_tensor[k] for k in X0},
        "element": {k: alpha + beta * g1[k] * g2[k] for k in X0},
    }
    for granularity, want in expected.items():
        opt = adaptlr.hypergradient(adaptlr.sgd(alpha), hyper_lr=beta, granularity=granularity)
        rates, _ = quadratic_run(opt, X0, H, 2)
        for k in X0:
            np.testing.assert_allclose(np.broadcast_to(rates[1][k], X0[k].shape), np.broadcast_to(want[k], X0[k].shape),
                                       rtol=1e-14)
    assert expected["global"]["a"] != expected["tensor"]["a"]


@pytest.mark.parametrize("mode", ["additive", "multiplicative"])
def test_one_tensor_global_equals_tensor(mode):
    runs = [quadratic_run(adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.2, mode=mode, granularity=gr),
                          {"w": X0["b"]}, {"w": H["b"]}, 6) for gr in ("global", "tensor")]
    (rates_global, xs_global), (rates_tensor, xs_tensor) = runs
    assert max_rel_err([r["w"] for r in rates_global], [r["w"] for r in rates_tensor]) < 1e-15
    assert max_rel_err([x["w"] for x in xs_global], [x["w"] for x in xs_tensor]) < 1e-15
    assert float(rates_global[-1]["w"]) != 0.1


def test_state_shapes_and_signals():
    params = {"a": np.ones(3), "b": np.ones((2, 2))}
    cases = [("global", None), ("tensor", {"a": (), "b": ()}), ("element", {"a": (3,), "b": (2, 2)})]
    for granularity, shapes in cases:
        opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.1, granularity=granularity)
        state = opt.init(params)
        lr = state.adaptations[0].signals(None)["lr"]
        if shapes is None:
            assert np.shape(lr) == () and float(lr) == 0.1
        else:
            assert {k: np.shape(v) for k, v in lr.items()} == shapes
        assert {k: float(np.max(v)) for k, v in adaptlr.learning_rates(state).items()} == {"a": 0.1, "b": 0.1}


# -- clipping, decay, composition ---------------------------------------------------------------


def test_max_lr_clips_multiplicative_growth():
    opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.5, mode="multiplicative", max_lr=0.3)
    rates, _ = scalar_run(opt, 6)
    assert rates == pytest.approx([0.1, 0.15, 0.225, 0.3, 0.3, 0.3], rel=1e-14)


def test_min_lr_clips_negative_hypergradient():
    # h·α = 2.5: step 1 flips the sign of x, so H = -150 < 0 at step 2 and min_lr holds a.
    opt = adaptlr.hypergradient(adaptlr.sgd(0.25), hyper_lr=0.1, min_lr=0.05)
    rates, _ = scalar_run(opt, 2, h=10.0)
    assert rates == [0.25, 0.05]
    free, _ = scalar_run(adaptlr.hypergradient(adaptlr.sgd(0.25), hyper_lr=0.1), 2, h=10.0)
    assert free[1] < 0  # a goes negative without the bound


def test_coupled_weight_decay_enters_the_hypergradient():
    # f = ½x² with L2 λ = 0.5 is the same problem as f = ½·1.5·x² for the base and for HD.
    with_decay = scalar_run(adaptlr.sgd_hd(0.1, hyper_lr=0.1, weight_decay=0.5), 6)
    equivalent = scalar_run(adaptlr.sgd_hd(0.1, hyper_lr=0.1), 6, h=1.5)
    assert with_decay[0] == pytest.approx(equivalent[0], rel=1e-14)
    assert with_decay[1] == pytest.approx(equivalent[1], rel=1e-14)
    raw_only = 0.1 + 0.1 * (1.0 * 1.0) * (1.0 - 0.1 * 1.5) * 1.0  # H from raw g_2 = x_1 and d_1 = 1.5
    assert with_decay[0][1] != pytest.approx(raw_only, rel=1e-6)


def test_decoupled_decay_uses_the_base_learning_rate():
    # AdamW's -α·λ·θ keeps the user's α while HD adapts the step rate.
    opt = adaptlr.hypergradient(adaptlr.adamw(0.1, weight_decay=0.5), hyper_lr=0.0)
    _, xs = scalar_run(opt, 1)
    assert xs[0] == pytest.approx(1.0 - 0.1 * (1 / (1 + 1e-8)) - 0.1 * 0.5 * 1.0, rel=1e-14)


class ScaleState(NamedTuple):
    dummy: Any

    def scale_learning_rate(self, size, layout):
        return size.scaled([3.0] * len(size.alpha))

    def signals(self, layout):
        return {}


class ConstantScale(Adaptation):
    """κ = 3 for every parameter: a stand-in for an inner multiplicative adaptation."""

    name = "scale3"
    state_class = ScaleState

    def init(self, params, alpha, layout, xp):
        return ScaleState(xp.asarray(0.0))

    def step(self, ctx, size, state):
        return size.scaled([ctx.scalars.constant(3.0, g.dtype) for g in ctx.grads]), state


def test_composition_uses_the_inner_multiplier():
    # Step -a·c·d with H = ⟨g, c·d_prev⟩ is HD on b = c·a with hyper_lr β·c².
    c, alpha, beta = 3.0, 0.02, 0.01
    inner = Optimizer(adaptlr.sgd(alpha).base, (ConstantScale(),))
    _, composed = scalar_run(adaptlr.hypergradient(inner, hyper_lr=beta), 6, x0=2.0, h=1.5)
    _, direct = scalar_run(adaptlr.hypergradient(adaptlr.sgd(alpha * c), hyper_lr=beta * c * c), 6, x0=2.0, h=1.5)
    assert composed == pytest.approx(direct, rel=1e-13)


# -- backends, dtypes, jit -------------------------------------------------------------------------

CASES = [("additive", "global"), ("multiplicative", "global"), ("additive", "tensor"),
         ("multiplicative", "tensor"), ("additive", "element"), ("multiplicative", "element")]


@pytest.mark.parametrize("mode,granularity", CASES)
def test_backends_agree_float64(backend, mode, granularity):
    opt = adaptlr.hypergradient(adaptlr.adam(0.05, weight_decay=0.01), hyper_lr=0.01, mode=mode,
                                granularity=granularity)
    want = quadratic_run(opt, X0, H, 5)
    got = quadratic_run(opt, X0, H, 5, backend=backend)
    for g, w in zip(got, want, strict=True):
        for gs, ws in zip(g, w, strict=True):
            assert max_rel_err([np.broadcast_to(gs[k], X0[k].shape) for k in X0],
                               [np.broadcast_to(ws[k], X0[k].shape) for k in X0]) <= 1e-12


@pytest.mark.parametrize("granularity", ["global", "tensor", "element"])
def test_float32_keeps_dtype(backend, granularity):
    opt = adaptlr.hypergradient(adaptlr.sgd(0.1, momentum=0.5), hyper_lr=0.01, granularity=granularity)
    params = {k: backend.asarray(v, "float32") for k, v in X0.items()}
    state = opt.init(params)
    updates, state = opt.update(params, state, params)
    updates, state = opt.update(params, state, params)
    xp = backend.xp
    assert all(u.dtype == xp.float32 for u in updates.values())
    assert all(r.dtype == xp.float32 for r in adaptlr.learning_rates(state).values())
    want = quadratic_run(opt, X0, {k: np.ones_like(v) for k, v in X0.items()}, 2, dtype="float32")[1][1]
    got = quadratic_run(opt, X0, {k: np.ones_like(v) for k, v in X0.items()}, 2, backend, "float32")[1][1]
    assert max_rel_err([got[k] for k in X0], [want[k] for k in X0]) < 1e-5


def test_mixed_dtypes_global():
    opt = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.1)
    params = {"a": np.ones(2, dtype=np.float32), "b": np.ones(2, dtype=np.float64)}
    state = opt.init(params)
    for _ in range(2):
        updates, state = opt.update(params, state, params)
    assert state.adaptations[0].lr.dtype == np.float64
    assert updates["a"].dtype == np.float32 and updates["b"].dtype == np.float64
    assert float(adaptlr.learning_rates(state)["b"]) == pytest.approx(0.1 + 0.1 * 4, rel=1e-14)  # g_2 = g_1 = 1


# -- input errors ---------------------------------------------------------------------------------


def test_schedule_base_is_refused():
    with pytest.raises(ValueError, match="schedule"):
        adaptlr.hypergradient(adaptlr.sgd(lambda t: 0.1 / t), hyper_lr=0.1)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mode": "exponential"}, ValueError, "mode"),
        ({"granularity": "layer"}, ValueError, "granularity"),
        ({"min_lr": 0.2, "max_lr": 0.1}, ValueError, "min_lr"),
        ({"hyper_lr": float("nan")}, ValueError, "hyper_lr"),
        ({"hyper_lr": float("inf")}, ValueError, "hyper_lr"),
        ({"hyper_lr": -1.0}, ValueError, "hyper_lr"),
        ({"hyper_lr": "0.1"}, TypeError, "hyper_lr"),
        ({"max_lr": float("inf")}, ValueError, "max_lr"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    args = {"hyper_lr": 0.1, **kwargs}
    with pytest.raises(error, match=match):
        adaptlr.hypergradient(adaptlr.sgd(0.1), **args)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="Optimizer"):
        adaptlr.hypergradient(lambda g: g, hyper_lr=0.1)


def test_preset_errors():
    with pytest.raises(ValueError, match="hyper_lr"):
        adaptlr.adam_hd(hyper_lr=float("nan"))
    with pytest.raises(ValueError, match="nesterov"):
        adaptlr.sgdn_hd(0.1, momentum=0.0)
