"""``adaptlr bench --gpu-suite``: end to end on a machine without a GPU (every GPU row skipped, with
the reason), what it plans to run, and that an available backend is run rather than skipped.

The stand-ins: a "cupy" conformance backend that is NumPy under the name, and a NumPy module with the
few ``cupy`` attributes the CuPy benchmark runners use, so the code that a GPU would run is run here.
Nothing is asserted about speed.
"""

from __future__ import annotations

import dataclasses
import json
import types

import numpy as np
import pytest

from adaptlr.backends import bench, gpu_suite
from adaptlr.conformance.backends import BACKENDS

TINY = [(8, 4), (16,), (3, 3, 2, 2)]


def _any_gpu() -> bool:
    return any(BACKENDS[name].available for name in gpu_suite.GPU_BACKENDS)


@pytest.mark.skipif(_any_gpu(), reason="a GPU backend is available here: the suite would run for minutes")
def test_cpu_only_run_reports_every_gpu_row_skipped(tmp_path) -> None:
    from adaptlr.cli import main

    out, md = tmp_path / "suite.json", tmp_path / "suite.md"
    assert main(["bench", "--gpu-suite", "--json", str(out), "--markdown", str(md)]) == 0
    report = json.loads(out.read_text())
    assert set(report) == {"meta", "conformance", "benchmark"}

    conformance = report["conformance"]["rows"]
    for backend in gpu_suite.GPU_BACKENDS:
        for dtype in gpu_suite.CONFORMANCE_DTYPES:
            [row] = [r for r in conformance if r["backend"] == backend and r["dtype"] == dtype]
            assert row["status"] == "skipped" and row["reason"], row
            assert row["steps"] == gpu_suite.CONFORMANCE_STEPS
            assert row["extra"]["planned_algorithms"] > 40  # every registered algorithm
    assert {r["status"] for r in conformance} == {"skipped"}

    bench_rows = report["benchmark"]["rows"]
    expected = {(g.backend, g.set, name) for g in gpu_suite.bench_plan() for name in g.planned()}
    assert {(r["backend"], r["set"], r["algorithm"]) for r in bench_rows} == expected
    assert all(r["status"] == "skipped" and r["reason"] for r in bench_rows)
    reasons = {r["backend"]: r["reason"] for r in bench_rows}
    assert "CUDA" in reasons["torch-cuda"] and "GPU" in reasons["jax-gpu"]

    text = md.read_text()
    assert "## Conformance" in text and "## Benchmark" in text and "skipped" in text
    assert report["meta"]["wall_s"] < 60  # a CPU-only run must not start the work


def test_plan_targets_the_gpu_backends() -> None:
    assert gpu_suite.GPU_BACKENDS == ("torch-cuda", "jax-gpu", "cupy")
    assert all(BACKENDS[name].device_name != "cpu" for name in gpu_suite.GPU_BACKENDS)
    groups = gpu_suite.bench_plan()
    assert {(g.backend, g.set) for g in groups} == {(b, s) for b in gpu_suite.GPU_BACKENDS
                                                    for s in ("resnet18", "small500")}
    for group in groups:
        assert set(group.algorithms) == {"adamw", *bench.WRAPPERS}
    planned = {g.backend: set(g.planned()) for g in groups}
    assert "torch.optim.AdamW" in planned["torch-cuda"] and "optax.adamw" in planned["jax-gpu"]
    assert all("copy" in names for names in planned.values())
    compiled = [(g.backend, g.set) for g in groups if g.compile_algorithms]
    assert compiled == [("torch-cuda", "resnet18")]


def _numpy_as_cupy() -> types.SimpleNamespace:
    """NumPy with the ``cupy`` attributes :func:`adaptlr.backends.bench.cupy_runners` uses."""

    class MemoryHook:
        def __enter__(self) -> MemoryHook:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    stream = types.SimpleNamespace(synchronize=lambda: None)
    cuda = types.SimpleNamespace(MemoryHook=MemoryHook, get_current_stream=lambda: stream)
    return types.SimpleNamespace(asarray=np.array, ones=np.ones, empty_like=np.empty_like, copyto=np.copyto,
                                 float32=np.float32, cuda=cuda)


@pytest.fixture
def cupy_standin(monkeypatch):
    """The "cupy" backend made available (NumPy under its name), its benchmark runners on NumPy."""
    monkeypatch.setitem(BACKENDS, "cupy", dataclasses.replace(BACKENDS["numpy"], name="cupy"))
    monkeypatch.setitem(bench.SETS, "tiny", TINY)
    monkeypatch.setitem(gpu_suite.BUILDERS, "cupy", lambda group, shapes: bench.cupy_runners(
        group.set, shapes, group.algorithms, cupy=_numpy_as_cupy()))


def test_an_available_gpu_backend_is_run_not_skipped(tmp_path, cupy_standin) -> None:
    out = tmp_path / "suite.json"
    groups = [gpu_suite.BenchGroup("cupy", "tiny", ("adamw", "active")),
              gpu_suite.BenchGroup("torch-cuda", "tiny", ("adamw",))]
    code = gpu_suite.run_suite(str(out), str(tmp_path / "suite.md"), backends=("torch-cuda", "cupy"),
                               algorithms=["adamw", "active(adamw)"], steps=10, groups=groups, repeats=2)
    assert code == 0
    report = json.loads(out.read_text())
    ran = [r for r in report["conformance"]["rows"] if r["backend"] == "cupy"]
    assert {(r["algorithm"], r["dtype"], r["status"]) for r in ran} == {
        (a, d, "pass") for a in ("adamw", "active(adamw)") for d in ("float64", "float32")}
    assert {r["status"] for r in report["conformance"]["rows"] if r["backend"] == "torch-cuda"} == {"skipped"}
    cupy_rows = [r for r in report["benchmark"]["rows"] if r["backend"] == "cupy"]
    assert {(r["algorithm"], r["path"]) for r in cupy_rows} == {
        ("adamw", "pure"), ("adamw", "flat"), ("active", "pure"), ("active", "flat"), ("copy", "bound")}
    assert all(r["status"] == "ran" and r["median_ms"] > 0 for r in cupy_rows)
    assert all(r["peak_extra_mb"] is not None for r in cupy_rows if r["kind"] != "bound")
    assert {r["status"] for r in report["benchmark"]["rows"] if r["backend"] == "torch-cuda"} == {"skipped"}


def test_a_failing_group_fails_the_suite(tmp_path, cupy_standin, monkeypatch) -> None:
    def broken(group, shapes):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setitem(gpu_suite.BUILDERS, "cupy", broken)
    out = tmp_path / "suite.json"
    code = gpu_suite.run_suite(str(out), backends=("cupy",), algorithms=[],
                               groups=[gpu_suite.BenchGroup("cupy", "tiny", ("adamw",))])
    assert code == 1
    [row] = json.loads(out.read_text())["benchmark"]["rows"]
    assert row["status"] == "fail" and "illegal memory access" in row["reason"]


def test_time_budget_skips_what_would_start_late(cupy_standin) -> None:
    rows = gpu_suite.run_conformance(["cupy"], ["adamw"], ["float64"], 5, deadline=0.0)
    assert [(r.algorithm, r.status) for r in rows] == [("adamw", "skipped")] and "budget" in rows[0].reason
    rows = gpu_suite.run_benchmark([gpu_suite.BenchGroup("cupy", "tiny", ("adamw",))], 1, deadline=0.0)
    assert {r["status"] for r in rows} == {"skipped"} and all("budget" in r["reason"] for r in rows)


def test_jax_runners_on_a_chosen_device(monkeypatch) -> None:
    jax = pytest.importorskip("jax")
    pytest.importorskip("optax")
    device = jax.devices("cpu")[0]
    placed = []
    device_put = jax.device_put
    monkeypatch.setattr(jax, "device_put", lambda x, d: placed.append(d) or device_put(x, d))
    runners = bench.jax_runners("tiny", TINY, ["adamw"], device=device)
    assert len(placed) >= 2 * len(TINY) and set(placed) == {device}  # grads, params, the copy's source
    bench.time_runners(runners, repeats=1)
    assert {(r.algorithm, r.path) for r in runners} >= {("adamw", "jit-donate"), ("optax.adamw", "jit-donate"),
                                                         ("copy", "bound")}
    assert all(len(r.times) == 1 for r in runners)


def test_jax_donated_runners_update_in_place() -> None:
    """The donated AdamW steps, adaptlr's and the optax reference, need no temporary array (XLA's
    memory analysis: a few 0-D step scalars, less than one 512-byte tensor) on tensors of one
    repeated shape: each output takes its own input's buffer. Returned as ``(params, state)``,
    both copied the donated buffers (4,228 bytes of temporaries here, round 16)."""
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    runners = bench.jax_runners("repeated", [(8, 16)] * 4 + [(16,)], ["adamw"])
    donated = {r.algorithm: r for r in runners if r.path == "jit-donate"}
    assert set(donated) == {"adamw", "optax.adamw"}
    one_tensor = 8 * 16 * 4
    assert all(r.memory() < one_tensor for r in donated.values()), {n: r.memory() for n, r in donated.items()}
    bench.time_runners(runners, repeats=2)  # the donated copy bound runs repeatedly on its own buffer
    assert all(len(r.times) == 2 for r in runners)


def test_jax_runners_donation_paths() -> None:
    """Every algorithm on ``jit`` and ``jit-donate`` by default; the GPU suite's ``undonated`` keeps the
    wrappers to ``jit-donate`` (fewer compilations within its time budget)."""
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    every = {(r.algorithm, r.path) for r in bench.jax_runners("tiny", TINY, ["adamw", "active"])}
    assert {("active", "jit"), ("active", "jit-donate"), ("adamw", "jit"), ("adamw", "jit-donate")} <= every
    some = {(r.algorithm, r.path) for r in bench.jax_runners("tiny", TINY, ["adamw", "active"], undonated=("adamw",))}
    assert ("active", "jit") not in some and {("active", "jit-donate"), ("adamw", "jit")} <= some
