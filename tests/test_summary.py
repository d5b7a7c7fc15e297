"""adaptlr.lr_summary: per-tensor learning-rate statistics and the adaptations' signals."""

from __future__ import annotations

import numpy as np
import pytest

import adaptlr


def test_base_only_summary_is_the_learning_rate():
    params = {"w": np.ones((2, 3)), "b": np.zeros(3)}
    opt = adaptlr.adamw(1e-3)
    summary = adaptlr.lr_summary(opt.init(params))
    assert set(summary) == {"learning_rate"}
    assert summary["learning_rate"]["['w']"] == {"min": 1e-3, "median": 1e-3, "max": 1e-3}


def test_active_gamma_statistics_per_tensor(backend):
    opt = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=1, increase=2.0, decrease=0.5)
    params = {"w": backend.asarray(np.array([1.0, -1.0, 2.0]))}
    state = opt.init(params)
    for t in range(3):  # gradient of ½w² keeps its sign for the first two elements; flip the third
        g = np.array([1.0, -1.0, 2.0 * (-1) ** t])
        _, state = opt.update({"w": backend.asarray(g)}, state, params)
    summary = adaptlr.lr_summary(state)
    gamma = backend.to_numpy(state.adaptations[0].gamma["w"])
    assert summary["gamma"]["['w']"] == {"min": float(gamma.min()), "median": float(np.median(gamma)),
                                         "max": float(gamma.max())}
    assert summary["learning_rate"]["['w']"]["max"] == pytest.approx(0.1 * gamma.max(), rel=1e-12)
    assert summary["gamma"]["['w']"]["min"] == 0.25 and summary["gamma"]["['w']"]["max"] == 5.0
    assert all(isinstance(v, float) for v in adaptlr.lr_summary(state, flat=True).values())


def test_autodrop_scalar_signals_and_flat_names():
    opt = adaptlr.autodrop(adaptlr.sgd(0.1), steps_per_epoch=2)
    state = opt.init([np.ones(3), np.ones(2)])
    flat = adaptlr.lr_summary(state, names=["fc.weight", "fc.bias"], flat=True)
    assert flat["learning_rate/fc.weight/min"] == pytest.approx(0.1)
    assert flat["theta"] == pytest.approx(0.01) and flat["kappa"] == 1.0
    assert {"omega", "latched", "drop_count"} <= set(flat)
    with pytest.raises(ValueError, match="names has 1"):
        adaptlr.lr_summary(state, names=["x"])
    with pytest.raises(TypeError, match="OptimizerState"):
        adaptlr.lr_summary({"w": 1})


def test_repeated_signal_names_get_positions():
    inner = adaptlr.active(adaptlr.sgd(0.1), steps_per_epoch=2)
    opt = adaptlr.active(inner, steps_per_epoch=3)
    summary = adaptlr.lr_summary(opt.init({"w": np.ones(2)}))
    assert {"gamma#0", "gamma#1"} <= set(summary)


def test_dsa_factor_dicts_and_hd_signals():
    state = adaptlr.dsa(adaptlr.sgd(0.1), hyper_lr=0.01).init({"w": np.ones((2, 3))})
    summary = adaptlr.lr_summary(state)
    assert any(k.startswith("['w']") for k in summary["kappa"])
    hd = adaptlr.hypergradient(adaptlr.sgd(0.1), hyper_lr=0.01)
    flat = adaptlr.lr_summary(hd.init({"w": np.ones(2)}), flat=True)
    assert flat["learning_rate/['w']/max"] == pytest.approx(0.1)
