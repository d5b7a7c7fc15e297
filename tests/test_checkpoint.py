"""adaptlr.save_state / load_state: portable across array libraries, strict on mismatches, loud on
malformed files (each a ValueError naming the file), atomic and durable writes."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest

import adaptlr
from adaptlr.checkpoint import HyperparameterWarning
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


# -- malformed files ------------------------------------------------------------------------------------


def _valid_file(tmp_path, name="valid.npz"):
    opt = _make("active")
    params = _start()
    path = tmp_path / name
    adaptlr.save_state(path, _run(BACKENDS["numpy"], opt, params, opt.init(params), range(3))[1], optimizer=opt)
    return path, params


def _rewrite_manifest(path, target, change):
    with np.load(path) as data:
        arrays = dict(data)
    manifest = json.loads(str(arrays["__manifest__"][()]))
    arrays["__manifest__"] = np.asarray(change(manifest))
    np.savez(target, **arrays)


def _truncated(path, target):
    data = path.read_bytes()
    target.write_bytes(data[: len(data) // 2])


def _corrupted(path, target):
    data = bytearray(path.read_bytes())
    with np.load(path) as npz:
        offset = data.find(npz["0"].tobytes())  # the step counter's bytes inside the archive
    data[offset] ^= 0xFF
    target.write_bytes(bytes(data))


def _npy(target):
    with open(target, "wb") as f:
        np.save(f, np.ones(3))


def _missing_array(path, target):
    with np.load(path) as data:
        arrays = {k: x for k, x in data.items() if k != "2/0"}
    np.savez(target, **arrays)


MALFORMED = {
    "empty": (lambda p, t: t.write_bytes(b""), r"is not an adaptlr checkpoint \(an empty file"),
    "text": (lambda p, t: t.write_text("epoch 3, loss 0.25\n"), r"is not an adaptlr checkpoint \(not a zip archive"),
    "npy": (lambda p, t: _npy(t), r"is not an adaptlr checkpoint \(a .npy array"),
    "other npz": (lambda p, t: np.savez(t, weights=np.ones(3)), "without an adaptlr manifest"),
    "truncated": (_truncated, "is truncated or corrupted"),
    "corrupted": (_corrupted, r"is truncated or corrupted \(BadZipFile: Bad CRC-32"),
    "manifest not json": (lambda p, t: _rewrite_manifest(p, t, lambda m: "{not json"), "manifest is not valid JSON"),
    "other format": (lambda p, t: _rewrite_manifest(p, t, lambda m: json.dumps({**m, "format": "x"})),
                     r"is not an adaptlr checkpoint \(format 'x'\)"),
    "future version": (lambda p, t: _rewrite_manifest(p, t, lambda m: json.dumps({**m, "format_version": 7})),
                       "has checkpoint format version 7"),
    "manifest without fields": (lambda p, t: _rewrite_manifest(p, t, lambda m: json.dumps(
        {k: x for k, x in m.items() if k != "fields"})), "has a malformed manifest"),
    "missing array": (_missing_array, "is corrupted: its manifest names array '2/0'"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_file_is_a_value_error_naming_the_file(tmp_path, kind):
    path, params = _valid_file(tmp_path)
    make, message = MALFORMED[kind]
    target = tmp_path / f"{kind.replace(' ', '_')}.npz"
    make(path, target)
    with pytest.raises(ValueError, match=message) as error:
        adaptlr.load_state(target, like=params)
    assert str(target) in str(error.value)
    with pytest.raises(ValueError, match=message):
        adaptlr.load_state(target, like=params, optimizer=_make("active"))


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        adaptlr.load_state(tmp_path, like=_start())


# -- shapes ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("with_optimizer", [False, True], ids=["like-only", "optimizer"])
@pytest.mark.parametrize("saved,loaded", [((3,), (2, 3)), ((1,), (5,)), ((3, 4), (3, 1)), ((2,), (3,))])
def test_params_of_another_shape_are_refused(tmp_path, saved, loaded, with_optimizer):
    opt = _make("active")
    path = tmp_path / "s.npz"
    adaptlr.save_state(path, opt.init({"w": np.ones(saved)}), optimizer=opt)
    with pytest.raises(ValueError, match=rf"parameter \['w'\] of shape {re.escape(str(saved))}, but like has "
                                         rf"shape {re.escape(str(loaded))}"):
        adaptlr.load_state(path, like={"w": np.ones(loaded)}, optimizer=opt if with_optimizer else None)


def test_dsa_factors_keep_their_broadcast_shapes(tmp_path):
    opt = adaptlr.dsa(adaptlr.sgd(0.1), structure=("row", "col"))
    params = {"w": np.ones((3, 4))}
    adaptlr.save_state(tmp_path / "d.npz", opt.init(params), optimizer=opt)
    state = adaptlr.load_state(tmp_path / "d.npz", like=params, optimizer=opt)
    assert {k: x.shape for k, x in state.adaptations[0].factors["w"].items()} == {"row": (3, 1), "col": (1, 4)}
    with pytest.raises(ValueError, match=r"shape \(3, 4\), but like has shape \(3, 5\)"):
        adaptlr.load_state(tmp_path / "d.npz", like={"w": np.ones((3, 5))})


# -- hyper-parameters -----------------------------------------------------------------------------------


def test_manifest_records_hyperparameters(tmp_path):
    opt = adaptlr.active(adaptlr.adamw(1e-2, b1=np.float32(0.5)), steps_per_epoch=np.int64(3))
    adaptlr.save_state(tmp_path / "s.npz", opt.init(_start()), optimizer=opt)
    with np.load(tmp_path / "s.npz") as data:
        recorded = json.loads(str(data["__manifest__"][()]))["hyperparameters"]
    assert recorded[0]["name"] == "adamw" and recorded[0]["learning_rate"] == 1e-2
    assert recorded[0]["weight_decay"] == 1e-2 and recorded[0]["b1"] == 0.5
    assert recorded[1] == {"name": "active", "steps_per_epoch": 3, "increase": 0.2, "decrease": 0.5,
                           "min_gamma": None, "max_gamma": None, "scale_weight_decay": False}


def test_other_hyperparameters_warn_or_raise_with_strict(tmp_path):
    params = _start()
    saved = adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=2)
    adaptlr.save_state(tmp_path / "s.npz", saved.init(params), optimizer=saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same hyper-parameters: no warning
        adaptlr.load_state(tmp_path / "s.npz", like=params, optimizer=saved, strict=True)
    other = adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=5)
    expected = r"adamw.learning_rate: saved 0.01, given 0.001; active\[1\].steps_per_epoch: saved 2, given 5"
    with pytest.warns(HyperparameterWarning, match=expected):
        state = adaptlr.load_state(tmp_path / "s.npz", like=params, optimizer=other)
    # The run continues with the given learning rate (α belongs to the optimizer).
    assert adaptlr.learning_rates(state)["w"][0, 0] == 1e-3
    with pytest.raises(ValueError, match=expected):
        adaptlr.load_state(tmp_path / "s.npz", like=params, optimizer=other, strict=True)


def test_schedule_is_recorded_but_not_compared(tmp_path):
    params = _start()
    opt = adaptlr.sgd(lambda t: 0.1 / t)
    adaptlr.save_state(tmp_path / "s.npz", opt.init(params), optimizer=opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adaptlr.load_state(tmp_path / "s.npz", like=params, optimizer=adaptlr.sgd(lambda t: 0.2 / t))


# -- writing: atomic, durable, normal permissions -------------------------------------------------------


def test_failed_save_removes_its_temporary_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    path, _ = _valid_file(tmp_path)
    before = path.read_bytes()

    def failing_fsync(fd):
        raise KeyboardInterrupt  # as an interrupt in the middle of a save

    monkeypatch.setattr(os, "fsync", failing_fsync)
    opt = _make("adamw")
    with pytest.raises(KeyboardInterrupt):
        adaptlr.save_state(path, opt.init(_start()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert path.read_bytes() == before


def test_fsync_before_rename(tmp_path, monkeypatch):
    calls = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("replace"), real_replace(a, b))[1])
    adaptlr.save_state(tmp_path / "s.npz", _make("adamw").init(_start()))
    assert calls[:2] == ["fsync", "replace"]


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_file_mode_follows_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        adaptlr.save_state(tmp_path / "s.npz", _make("adamw").init(_start()))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "s.npz").st_mode) == mode


@pytest.mark.skipif(os.name != "posix", reason="needs os.kill(pid, 0) to tell a dead process")
def test_a_save_killed_mid_write_leaves_the_old_file_and_the_next_save_cleans_up(tmp_path):
    path, params = _valid_file(tmp_path, "run.npz")
    before = path.read_bytes()
    script = (
        "import os, numpy as np, adaptlr\n"
        "os.fsync = lambda fd: os._exit(9)  # killed after writing, before the rename\n"
        f"opt = adaptlr.adamw(1e-2); params = {{'b': np.ones(3), 'w': np.ones((3, 4))}}\n"
        f"adaptlr.save_state({str(path)!r}, opt.init(params))\n"
    )
    assert subprocess.run([sys.executable, "-c", script]).returncode == 9
    orphans = [p.name for p in tmp_path.iterdir() if p.name.endswith(".adaptlr-tmp")]
    assert len(orphans) == 1 and orphans[0].startswith(".run.npz.")
    assert path.read_bytes() == before
    assert adaptlr.load_state(path, like=params) is not None
    host = orphans[0].split("@", 1)[1].rsplit(".", 2)[0]
    live = tmp_path / f".run.npz.{os.getpid()}@{host}.0000.adaptlr-tmp"  # a save in progress in a live process
    elsewhere = tmp_path / f".run.npz.{orphans[0].split('.')[3].split('@')[0]}@other-host.0000.adaptlr-tmp"
    live.write_bytes(b"")
    elsewhere.write_bytes(b"")  # same dead pid, another host sharing the directory: not ours to remove
    adaptlr.save_state(path, _make("active").init(params))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, live.name, elsewhere.name])


def test_state_dtype_state_round_trips_for_low_precision_params(tmp_path):
    torch = pytest.importorskip("torch")
    opt = adaptlr.adamw(1e-3, state_dtype="float32")
    params = {"w": torch.linspace(-1, 1, 4, dtype=torch.bfloat16)}
    _, state = opt.update({"w": torch.full((4,), 0.5, dtype=torch.bfloat16)}, opt.init(params), params)
    adaptlr.save_state(tmp_path / "s.npz", state, optimizer=opt)
    for optimizer in (opt, None):  # without optimizer=, the recorded state_dtype is used
        loaded = adaptlr.load_state(tmp_path / "s.npz", like=params, optimizer=optimizer)
        assert loaded.base.mu["w"].dtype == torch.float32 and torch.equal(loaded.base.nu["w"], state.base.nu["w"])
    with pytest.raises(ValueError, match="state dtype is float64"):
        adaptlr.load_state(tmp_path / "s.npz", like=params, optimizer=adaptlr.adamw(1e-3, state_dtype="float64"))
