"""adaptlr.save_state / load_state: portable across array libraries, strict on mismatches."""

from __future__ import annotations

import json

import numpy as np
import pytest

import adaptlr
from adaptlr.conformance.backends import BACKENDS
from tests.conftest import max_rel_err


def _make(name: str) -> adaptlr.Optimizer:
    return {
        "adamw": lambda: adaptlr.adamw(1e-2),
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2, increase=0.5),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.sgd(0.05, momentum=0.9), steps_per_epoch=2, theta=30.0,
                                             theta_max=90.0, patience_epochs=1),
        "dsa": lambda: adaptlr.dsa(adaptlr.adam(1e-2), hyper_lr=0.01),
    }[name]()


def _grads(t: int, params: dict) -> dict:
    rng = np.random.default_rng(100 + t)
    return {k: rng.normal(size=np.shape(v)) + 0.5 * np.asarray(v) for k, v in params.items()}


def _run(backend, opt, params, state, steps):
    for t in steps:
        host = {k: backend.to_numpy(v) for k, v in params.items()}
        grads = {k: backend.asarray(g) for k, g in _grads(t, host).items()}
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
    return params, state


def _start():
    rng = np.random.default_rng(0)
    return {"b": rng.normal(size=3), "w": rng.normal(size=(3, 4))}


@pytest.mark.parametrize("name", ["adamw", "active", "autodrop", "dsa"])
@pytest.mark.parametrize("src,dst", [("torch", "jax"), ("jax", "numpy"), ("numpy", "torch"), ("torch", "numpy")])
def test_state_moves_between_libraries_and_continues(tmp_path, name, src, dst):
    source, target = BACKENDS[src], BACKENDS[dst]
    for b in (source, target):
        if not b.available:
            pytest.skip(f"{b.name}: {b.unavailable_reason()}")
    opt = _make(name)
    params = {k: source.asarray(v) for k, v in _start().items()}
    params, state = _run(source, opt, params, opt.init(params), range(5))
    adaptlr.save_state(tmp_path / "s.npz", state, optimizer=opt)
    uninterrupted, _ = _run(source, opt, params, state, range(5, 10))

    moved = {k: target.asarray(source.to_numpy(v)) for k, v in params.items()}
    loaded = adaptlr.load_state(tmp_path / "s.npz", like=moved, optimizer=opt)
    assert adaptlr.load_state(tmp_path / "s.npz", like=moved) is not None  # without the optimizer too
    continued, _ = _run(target, opt, moved, loaded, range(5, 10))
    err = max_rel_err([target.to_numpy(continued[k]) for k in sorted(moved)],
                      [source.to_numpy(uninterrupted[k]) for k in sorted(moved)])
    assert err <= 1e-12, err


def test_torch_adapter_state_loads_into_numpy_and_back(tmp_path):
    torch = pytest.importorskip("torch")
    from adaptlr.backends.torch import Optimizer

    opt = _make("active")
    start = [torch.tensor(v) for v in _start().values()]
    params = [torch.nn.Parameter(p.clone()) for p in start]
    torch_opt = Optimizer(params, opt)

    def torch_steps(steps, params, torch_opt):
        for t in steps:
            grads = _grads(t, {i: p.detach().numpy() for i, p in enumerate(params)})
            for i, p in enumerate(params):
                p.grad = torch.tensor(grads[i])
            torch_opt.step()

    torch_steps(range(4), params, torch_opt)
    adaptlr.save_state(tmp_path / "t.npz", torch_opt.functional_state)
    snapshot = [p.detach().clone() for p in params]
    torch_steps(range(4, 8), params, torch_opt)

    np_params = [p.numpy() for p in snapshot]
    state = adaptlr.load_state(tmp_path / "t.npz", like=np_params)
    for t in range(4, 6):
        updates, state = opt.update(list(_grads(t, dict(enumerate(np_params))).values()), state, np_params)
        np_params = adaptlr.apply_updates(np_params, updates)
    adaptlr.save_state(tmp_path / "n.npz", state)
    params2 = [torch.nn.Parameter(torch.tensor(p)) for p in np_params]
    torch_opt2 = Optimizer(params2, opt)
    torch_opt2.set_functional_state(adaptlr.load_state(tmp_path / "n.npz", like=[p.detach() for p in params2]))
    torch_steps(range(6, 8), params2, torch_opt2)
    assert max_rel_err([p.detach().numpy() for p in params2], [p.detach().numpy() for p in params]) <= 1e-12


def test_bfloat16_state_round_trips_bit_exactly(tmp_path):
    torch = pytest.importorskip("torch")
    params = {"w": torch.linspace(-1, 1, 6, dtype=torch.bfloat16)}
    opt = adaptlr.adam(1e-2)
    _, state = opt.update({"w": torch.full((6,), 0.3, dtype=torch.bfloat16)}, opt.init(params), params)
    adaptlr.save_state(tmp_path / "b.npz", state)
    loaded = adaptlr.load_state(tmp_path / "b.npz", like=params, optimizer=opt)
    assert loaded.base.mu["w"].dtype == torch.bfloat16
    assert torch.equal(loaded.base.nu["w"], state.base.nu["w"])


def test_mismatches_are_clear_errors(tmp_path):
    opt = _make("active")
    params = {k: v for k, v in _start().items()}
    path = tmp_path / "s.npz"
    adaptlr.save_state(path, opt.init(params), optimizer=opt)
    with pytest.raises(ValueError, match="2 parameters but like has 1"):
        adaptlr.load_state(path, like={"w": params["w"]})
    with pytest.raises(ValueError, match="match='order'"):
        adaptlr.load_state(path, like={"a": params["b"], "w": params["w"]})
    assert adaptlr.load_state(path, like={"a": params["b"], "w": params["w"]}, match="order") is not None
    with pytest.raises(ValueError, match="shape"):
        adaptlr.load_state(path, like={"b": params["b"], "w": np.zeros((3, 5))})
    with pytest.raises(ValueError, match="float32"):
        adaptlr.load_state(path, like={k: v.astype(np.float32) for k, v in params.items()})
    with pytest.raises(ValueError, match="active"):
        adaptlr.load_state(path, like=params, optimizer=adaptlr.adamw(1e-2))
    adaptlr.save_state(tmp_path / "anonymous.npz", opt.init(params))  # no name recorded: classes checked
    with pytest.raises(ValueError, match="ActiveState"):
        adaptlr.load_state(tmp_path / "anonymous.npz", like=params,
                           optimizer=adaptlr.autodrop(adaptlr.adamw(1e-2), steps_per_epoch=2))
    with pytest.raises(TypeError, match="OptimizerState"):
        adaptlr.save_state(path, {"not": "a state"})
    with pytest.raises(ValueError, match="AdamState"):
        adaptlr.save_state(path, opt.init(params), optimizer=adaptlr.sgd(0.1))

    with np.load(path) as data:
        arrays = dict(data)
    manifest = json.loads(str(arrays["__manifest__"][()]))
    manifest["format_version"] = 99
    arrays["__manifest__"] = np.asarray(json.dumps(manifest))
    np.savez(tmp_path / "future.npz", **arrays)
    with pytest.raises(ValueError, match="format version 99"):
        adaptlr.load_state(tmp_path / "future.npz", like=params)
    manifest["format_version"] = 1
    manifest["skeleton"]["children"][3]["children"][0]["fields"] = ["gamma", "renamed", "prev_epoch_grad_sum"]
    arrays["__manifest__"] = np.asarray(json.dumps(manifest))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match="fields"):
        adaptlr.load_state(tmp_path / "old.npz", like=params)


def test_manifest_records_what_it_promises(tmp_path):
    opt = _make("adamw")
    adaptlr.save_state(tmp_path / "s.npz", opt.init(_start()), optimizer=opt)
    with np.load(tmp_path / "s.npz") as data:
        manifest = json.loads(str(data["__manifest__"][()]))
    assert manifest["format_version"] == 1 and manifest["adaptlr_version"] == adaptlr.__version__
    assert manifest["optimizer"] == "adamw"
    assert manifest["state_classes"] == ["adaptlr.adam:AdamState"]
    assert manifest["params"]["paths"] == ["['b']", "['w']"]
    assert [f["path"] for f in manifest["fields"]] == ["count", "learning_rate", "base.mu", "base.nu"]
