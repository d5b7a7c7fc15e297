"""DSA (spec §5, reconstruction): factor bounds and positivity, the separable-quadratic sign test, the
one-factor closed form, row/col slices, structure defaults, backends, jax.jit and input errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import adaptlr
from adaptlr.conformance.backends import BACKENDS
from adaptlr.dsa import leaf_structure


def factor_history(opt, params: dict, grad_fn, steps: int, backend=None, dtype: str = "float64"):
    """Run ``steps`` updates; returns per step the factor dicts (NumPy), updates and learning rates."""
    backend = backend or BACKENDS["numpy"]
    params = {k: backend.asarray(v, dtype) for k, v in params.items()}
    state = opt.init(params)
    history = []
    for t in range(1, steps + 1):
        grads = grad_fn(params, t)
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        factors = {k: {kind: backend.to_numpy(f) for kind, f in fs.items()}
                   for k, fs in state.adaptations[-1].factors.items()}
        rates = {k: backend.to_numpy(r) for k, r in adaptlr.learning_rates(state).items()}
        history.append((factors, {k: backend.to_numpy(u) for k, u in updates.items()}, rates))
    return history


def quadratic(h: dict, backend=None, dtype: str = "float64"):
    backend = backend or BACKENDS["numpy"]
    curvature = {k: backend.asarray(v, dtype) for k, v in h.items()}
    return lambda params, t: {k: curvature[k] * params[k] for k in params}


# -- the spec's tests ------------------------------------------------------------------------------


def test_separable_quadratic_sign_test():
    # ½ Σ h W²: elements with α·h < 1 keep their sign (factor × e^β each step), those with
    # 1 < α·h < 2 flip every step (factor × e^-β), which keeps α·A·h in the flipping range.
    alpha, beta = 0.1, 0.05
    w0 = np.array([[1.0, -2.0, 0.5], [-0.3, 0.8, 1.5]])
    h = np.array([[1.0, 18.0, 3.0], [17.0, 0.5, 16.0]])  # flips shrink by |1 - α·A·h| >= 0.25 a step
    opt = adaptlr.dsa(adaptlr.sgd(alpha), hyper_lr=beta, structure=("element",))
    history = factor_history(opt, {"w": w0}, quadratic({"w": h}), 6)
    flips = alpha * h > 1
    previous = np.ones_like(w0)
    for t, (factors, _, rates) in enumerate(history, start=1):
        factor = factors["w"]["element"]
        if t == 1:
            np.testing.assert_array_equal(factor, 1.0)  # P = 0 at t = 1
        else:
            expected = previous * np.where(flips, math.exp(-beta), math.exp(beta))
            assert max_rel_err(factor, expected) < 1e-10
        assert max_rel_err(rates["w"], alpha * factor) < 1e-15
        previous = factor
    assert flips.any() and (~flips).any()


def test_one_tensor_factor_is_exponentiated_multiplicative_hd():
    # structure=("tensor",): P = A·d_{t-1} with A > 0 a scalar, so a_t = a_{t-1}·exp(β·cos(g_t, d_{t-1})).
    rng = np.random.default_rng(5)
    w0 = rng.normal(size=(4, 3))
    h = rng.uniform(0.5, 20.0, size=(4, 3))
    alpha, beta = 0.08, 0.3
    opt = adaptlr.dsa(adaptlr.sgd(alpha, momentum=0.5), hyper_lr=beta, structure=("tensor",))
    history = factor_history(opt, {"w": w0}, quadratic({"w": h}), 8)

    w, buf, a, d_prev = w0.copy(), None, alpha, np.zeros_like(w0)
    for factors, _, rates in history:
        g = h * w
        norm = np.linalg.norm(g) * np.linalg.norm(d_prev)
        a = a * math.exp(beta * (float(np.sum(g * d_prev)) / norm if norm > 0 else 0.0))
        buf = g if buf is None else 0.5 * buf + g
        w = w - a * buf
        d_prev = buf
        assert float(factors["w"]["tensor"]) * alpha == pytest.approx(a, rel=1e-10)
        assert float(rates["w"]) == pytest.approx(a, rel=1e-10)
    assert a != pytest.approx(alpha, rel=1e-3)


def test_row_and_col_factors_by_hand():
    # Step 2 of DSA on SGD: P = α·g_1 (all factors 1 at step 1); each factor value moves by
    # exp(β·cos) over its slice: rows of W, columns of W, all of W.
    rng = np.random.default_rng(7)
    w0 = rng.normal(size=(3, 4))
    h = rng.uniform(0.1, 25.0, size=(3, 4))
    alpha, beta = 0.1, 0.2
    opt = adaptlr.dsa(adaptlr.sgd(alpha), hyper_lr=beta)
    history = factor_history(opt, {"w": w0}, quadratic({"w": h}), 2)
    g1 = h * w0
    p = alpha * g1
    g2 = h * (w0 - alpha * g1)

    def cos(axis):
        dot = np.sum(g2 * p, axis=axis, keepdims=axis is not None)
        norms = np.sqrt(np.sum(g2**2, axis=axis, keepdims=axis is not None) * np.sum(p**2, axis=axis,
                                                                                         keepdims=axis is not None))
        return dot / (norms + 1e-12)

    factors, updates, rates = history[1]
    expected = {"tensor": np.exp(beta * cos(None)), "row": np.exp(beta * cos(1)), "col": np.exp(beta * cos(0))}
    assert set(factors["w"]) == set(expected)
    assert factors["w"]["row"].shape == (3, 1) and factors["w"]["col"].shape == (1, 4)
    for kind, want in expected.items():
        assert max_rel_err(factors["w"][kind], want) < 1e-13
    kappa = expected["tensor"] * expected["row"] * expected["col"]
    assert max_rel_err(updates["w"], -alpha * kappa * g2) < 1e-13
    assert max_rel_err(np.broadcast_to(rates["w"], (3, 4)), alpha * kappa) < 1e-13


# -- properties -----------------------------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(
    shape=st.sampled_from([(), (5,), (3, 4), (2, 3, 2)]),
    beta=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-6, 1e3),
)
def test_factors_positive_and_bounded_per_step(shape, beta, seed, scale):
    rng = np.random.default_rng(seed)
    grads = [scale * rng.normal(size=shape) for _ in range(5)]
    grads[2] = np.zeros(shape)  # a zero gradient gives cos = 0: no change
    opt = adaptlr.dsa(adaptlr.adam(0.01), hyper_lr=beta, structure=("tensor", "row", "col", "element"))
    history = factor_history(opt, {"w": rng.normal(size=shape)}, lambda params, t: {"w": np.asarray(grads[t - 1])}, 5)
    previous = None
    bound = math.exp(beta) * (1 + 1e-12)
    for t, (factors, _, _) in enumerate(history, start=1):
        for kind, factor in factors["w"].items():
            assert np.all(factor > 0), kind
            if previous is not None:
                ratio = factor / previous[kind]
                assert np.all(ratio <= bound) and np.all(ratio >= 1 / bound), (kind, ratio)
                if t == 3:
                    np.testing.assert_array_equal(ratio, 1.0)
        previous = factors["w"]


def test_default_structure_and_shapes():
    params = {"w": np.ones((3, 4, 2)), "b": np.ones(5), "s": np.array(1.0)}
    state = adaptlr.dsa(adaptlr.sgd(0.1)).init(params)
    shapes = {k: {kind: f.shape for kind, f in fs.items()} for k, fs in state.adaptations[0].factors.items()}
    assert shapes == {
        "w": {"tensor": (), "row": (3, 1, 1), "col": (1, 4, 2)},
        "b": {"tensor": (), "element": (5,)},
        "s": {"tensor": ()},
    }
    # On a bias "row" is one value per index (element) and "col" one for the tensor: the defaults.
    assert leaf_structure(("tensor", "row", "col"), 1) == ("tensor", "element")
    assert leaf_structure(("row",), 0) == ("tensor",)
    assert leaf_structure(None, 2) == ("tensor", "row", "col")


def test_max_lr_bounds_the_effective_rate():
    w0, h = np.array([1.0, 2.0]), np.array([1.0, 1.0])
    opt = adaptlr.dsa(adaptlr.sgd(0.1), hyper_lr=0.5, structure=("element",), max_lr=0.15)
    history = factor_history(opt, {"w": w0}, quadratic({"w": h}), 4)
    rates = [float(np.max(r["w"])) for _, _, r in history]
    assert rates == pytest.approx([0.1, 0.15, 0.15, 0.15], rel=1e-15)  # 0.1·e^0.5 > 0.15
    for _, updates, _ in history[2:]:
        assert np.all(np.abs(updates["w"]) > 0)
    assert float(history[-1][0]["w"]["element"][0]) > 1.5  # the factors themselves are not clipped


def test_scale_weight_decay():
    w0 = np.array([1.0, -1.0])
    grad = lambda params, t: {"w": params["w"]}  # noqa: E731
    for scale in (False, True):
        opt = adaptlr.dsa(adaptlr.adamw(0.1, weight_decay=0.5), hyper_lr=0.3, structure=("tensor",),
                          scale_weight_decay=scale)
        params = {"w": w0}
        state = opt.init(params)
        for _ in range(2):
            updates, state = opt.update(grad(params, 0), state, params)
            last = params
            params = adaptlr.apply_updates(params, updates)
        kappa = float(state.adaptations[0].factors["w"]["tensor"])
        assert kappa > 1.0
        step = adaptlr.adamw(0.1, weight_decay=0.0)  # the same Adam direction without decay
        s0 = step.init({"w": w0})
        u, s0 = step.update({"w": w0}, s0, {"w": w0})
        u, s0 = step.update({"w": last["w"]}, s0, {"w": last["w"]})
        decay = 0.1 * 0.5 * (kappa if scale else 1.0) * last["w"]
        np.testing.assert_allclose(updates["w"], kappa * u["w"] - decay, rtol=1e-13)


def test_composes_with_hypergradient():
    opt = adaptlr.dsa(adaptlr.hypergradient(adaptlr.sgd(0.05), hyper_lr=0.01, granularity="tensor"), hyper_lr=0.1)
    history = factor_history(opt, {"w": np.ones((2, 3)), "b": np.ones(2)}, lambda p, t: dict(p), 3)
    assert all(np.all(np.isfinite(r)) for _, _, rates in history for r in rates.values())
    assert opt.name == "dsa(hd(sgd))"


# -- backends, jit ---------------------------------------------------------------------------------

PARAMS = {"w": np.array([[1.0, -2.0, 0.5], [-0.3, 0.8, 1.5]]), "b": np.array([0.2, -1.0]), "s": np.array(0.7)}
CURV = {"w": np.array([[1.0, 15.0, 3.0], [18.0, 0.5, 12.0]]), "b": np.array([2.0, 14.0]), "s": np.array(3.0)}


@pytest.mark.parametrize("structure", [None, ("tensor",), ("element", "row")])
def test_backends_agree_float64(backend, structure):
    opt = adaptlr.dsa(adaptlr.adam(0.1, weight_decay=0.01), hyper_lr=0.2, structure=structure, min_lr=0.02)
    want = factor_history(opt, PARAMS, quadratic(CURV), 5)
    got = factor_history(opt, PARAMS, quadratic(CURV, backend), 5, backend=backend)
    for (gf, gu, gr), (wf, wu, wr) in zip(got, want, strict=True):
        assert max_rel_err([gu[k] for k in PARAMS], [wu[k] for k in PARAMS]) <= 1e-12
        assert max_rel_err([gr[k] for k in PARAMS], [wr[k] for k in PARAMS]) <= 1e-12
        assert max_rel_err([gf[k][kind] for k in PARAMS for kind in wf[k]],
                           [wf[k][kind] for k in PARAMS for kind in wf[k]]) <= 1e-12


def test_float32_keeps_dtype(backend):
    opt = adaptlr.dsa(adaptlr.sgd(0.1), hyper_lr=0.1)
    history = factor_history(opt, PARAMS, quadratic(CURV, backend, "float32"), 3, backend=backend, dtype="float32")
    for factors, updates, rates in history:
        assert all(u.dtype == np.float32 for u in updates.values())
        assert all(r.dtype == np.float32 for r in rates.values())
        assert all(f.dtype == np.float32 for fs in factors.values() for f in fs.values())


@pytest.mark.parametrize("structure", [("tensor", "row", "col", "element")])  # default: tests/test_properties.py
def test_jax_jit_matches_eager(structure):
    if not BACKENDS["jax"].available:
        pytest.skip("jax is not installed")
    import jax

    backend = BACKENDS["jax"]
    opt = adaptlr.dsa(adaptlr.sgd(0.1, momentum=0.9), hyper_lr=0.1, structure=structure, max_lr=0.3)
    curvature = {k: backend.asarray(v) for k, v in CURV.items()}
    results = []
    for update in (opt.update, jax.jit(opt.update)):
        params = {k: backend.asarray(v) for k, v in PARAMS.items()}
        state = opt.init(params)
        for _ in range(4):
            updates, state = update({k: curvature[k] * params[k] for k in params}, state, params)
            params = adaptlr.apply_updates(params, updates)
        results.append([np.asarray(params[k]) for k in PARAMS])
    assert max_rel_err(results[1], results[0]) <= 1e-13


# -- input errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"structure": ("tensor", "block")}, ValueError, "'tensor', 'row', 'col', 'element'"),
        ({"structure": "tensor"}, ValueError, "structure"),
        ({"structure": ()}, ValueError, "structure"),
        ({"min_lr": 0.5, "max_lr": 0.1}, ValueError, "min_lr"),
        ({"hyper_lr": float("nan")}, ValueError, "hyper_lr"),
        ({"hyper_lr": -0.1}, ValueError, "hyper_lr"),
        ({"min_lr": float("-inf")}, ValueError, "min_lr"),
    ],
)
def test_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        adaptlr.dsa(adaptlr.sgd(0.1), **kwargs)


def test_not_an_optimizer():
    with pytest.raises(TypeError, match="Optimizer"):
        adaptlr.dsa("sgd")


def test_schedule_is_multiplied():
    opt = adaptlr.dsa(adaptlr.sgd(lambda t: 0.1 / t), hyper_lr=0.1, structure=("tensor",))
    history = factor_history(opt, {"w": np.array([1.0])}, lambda p, t: {"w": np.array([1.0])}, 2)
    assert float(history[1][2]["w"]) == pytest.approx(0.05 * math.exp(0.1), rel=1e-10)


def reference_dsa_sgd(w0: np.ndarray, h: np.ndarray, alpha: float, beta: float, kinds: tuple, steps: int):
    """DSA on plain SGD for one 2-D tensor, written with explicit loops over slices (spec §5)."""
    rows, cols = w0.shape
    slices = {
        "tensor": [(slice(None), slice(None))],
        "row": [(i, slice(None)) for i in range(rows)],
        "col": [(slice(None), j) for j in range(cols)],
        "element": [(i, j) for i in range(rows) for j in range(cols)],
    }
    log_factor = {k: np.zeros_like(w0) for k in kinds}  # each slice's value, broadcast over it
    w, p, out = w0.copy(), np.zeros_like(w0), []
    for _ in range(steps):
        g = h * w
        for kind in kinds:
            for s in slices[kind]:
                cos = np.sum(g[s] * p[s]) / (np.linalg.norm(g[s]) * np.linalg.norm(p[s]) + 1e-12)
                log_factor[kind][s] += beta * cos
        rate = alpha * np.exp(sum(log_factor.values()))
        w = w - rate * g
        p = rate * g
        out.append((rate, w.copy()))
    return out


@pytest.mark.parametrize("kinds", [("tensor", "element"), ("tensor", "row", "col"), ("row", "element", "col")])
def test_matches_written_out_reconstruction(kinds):
    # Several factors make A vary inside each slice, so P = A ⊙ d (not d) matters from step 3 on.
    rng = np.random.default_rng(11)
    w0, h = rng.normal(size=(3, 4)), rng.uniform(0.1, 19.0, size=(3, 4))
    opt = adaptlr.dsa(adaptlr.sgd(0.1), hyper_lr=0.3, structure=kinds)
    history = factor_history(opt, {"w": w0}, quadratic({"w": h}), 6)
    w = w0
    for (_, updates, rates), (rate, w_next) in zip(history, reference_dsa_sgd(w0, h, 0.1, 0.3, kinds, 6), strict=True):
        assert max_rel_err(np.broadcast_to(rates["w"], w0.shape), rate) < 1e-12
        assert max_rel_err(updates["w"], w_next - w) < 1e-11
        w = w_next
    assert np.ptp(rate) > 0.01
