"""The conformance suite, collected by pytest: a fast subset in CI.

The full report is ``adaptlr conformance`` (docs/conformance.md); these tests run a few algorithms
on every installed backend, the analytic checks on NumPy, and the harness itself (decisions,
margins, tolerances, the CLI's errors and exit status, user registration).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import adaptlr
from adaptlr.conformance import (
    ALGORITHMS,
    PROBLEMS,
    Problem,
    analytic,
    cli,
    register_algorithm,
    register_problem,
    report,
    runner,
)
from adaptlr.conformance.backends import BACKENDS

FAST = ["sgdm", "adamw", "active(adamw)", "autodrop(sgd)", "hd-mult-element(sgd)", "dsa(adam)", "eg-global(sgdm)"]


@pytest.mark.parametrize("name", FAST)
def test_agreement_across_backends(name: str, backend) -> None:
    """float64 ≤ tolerance (≤ 1e-12) and float32 within its tolerance, decisions identical, vs NumPy float64."""
    algorithm = ALGORITHMS[name]
    if algorithm.missing():
        pytest.skip(f"{name}: not available ({algorithm.missing()})")
    rows = runner.run_agreement([name], [backend.name], ["float64", "float32"], 120)
    assert rows
    for row in rows:
        assert row.status in ("pass", "ill-conditioned"), (row.dtype, row.reason, row.max_rel_err_params)
        if row.dtype == "float64":
            assert row.status == "pass"
            assert row.max_rel_err_params <= 1e-12
            assert row.decision_mismatches == 0


def test_analytic_checks_on_numpy() -> None:
    rows = analytic.run_checks([BACKENDS["numpy"]], 120, names=["spec-vectors", "dsa-signs", "closed-form"])
    failed = [(r.algorithm, r.problem, r.reason) for r in rows if r.status == "fail"]
    assert not failed
    assert any(r.status == "pass" for r in rows)


def test_reference_libraries() -> None:
    if not BACKENDS["torch"].available:
        pytest.skip("torch is not installed")
    rows = analytic.run_checks([BACKENDS["numpy"]], 60, names=["reference-libraries"])
    assert [r for r in rows if r.status == "pass"]
    assert not [r for r in rows if r.status == "fail"]


def test_tolerance_is_derived_from_eps() -> None:
    eps64, eps32 = np.finfo(np.float64).eps, np.finfo(np.float32).eps
    assert runner.tolerance("float64", 150) == pytest.approx(100 * np.sqrt(150) * eps64 + 4 * eps64)
    assert runner.tolerance("float32", 150) == pytest.approx(100 * np.sqrt(150) * eps32 + 4 * eps64)
    # the step-scalar term does not depend on the parameter dtype: the scalars are computed in float64
    rectified = adaptlr.radam(1e-3).scalar_condition
    assert 9e4 < rectified < 1e5
    assert runner.tolerance("float32", 150, 1.0, rectified) == pytest.approx(
        100 * np.sqrt(150) * eps32 + 4 * eps64 * rectified)


def test_max_rel_err_is_normwise() -> None:
    ref = [[np.array([1.0, 1e-20])]]
    assert runner.max_rel_err([[np.array([1.0, 2e-20])]], ref) == pytest.approx(1e-20)
    assert runner.max_rel_err([[np.array([np.nan, 0.0])]], ref) == np.inf


def test_max_rel_err_scales_by_the_largest_magnitude_so_far() -> None:
    """An iterate passing near zero is measured against the magnitude it came from."""
    ref = [[np.array([2.0])], [np.array([1e-3])], [np.array([4.0])]]
    run = [[np.array([2.0])], [np.array([1e-3 + 2e-16])], [np.array([4.0 + 4e-15])]]
    assert runner.max_rel_err(run, ref) == pytest.approx(1e-15)
    assert runner.max_rel_err(run[1:2], ref[1:2]) == pytest.approx(2e-13)


def _traj(lrs: list[float], grads: list[float]) -> runner.Trajectory:
    return runner.Trajectory([[np.zeros(1)]] * (len(lrs) + 1), [[np.array([g])] for g in grads],
                             [[np.array([lr])] for lr in lrs])


def test_epoch_flip_decisions_and_margins() -> None:
    """S = 2: γ changes at t = 4; a changed branch is a mismatch; an epoch sum near 0 is ill-conditioned."""
    rule = adaptlr.conformance.EpochSignFlips(2)
    ref = _traj([1.0, 1.0, 1.0, 1.2], [1.0, 2.0, 3.0, -1.0])
    same = runner.compare_decisions(rule, ref, ref, "float64", 4, 1e-12)
    assert same["decisions"] == 1 and same["mismatches"] == 0 and same["ill"] == 0
    assert same["min_margin"] == pytest.approx(0.5)  # |3 - 1| / (3 + 1)
    other = _traj([1.0, 1.0, 1.0, 0.5], [1.0, 2.0, 3.0, -1.0])
    assert runner.compare_decisions(rule, ref, other, "float64", 4, 1e-12)["mismatches"] == 1
    tiny = _traj([1.0, 1.0, 1.0, 1.2], [1.0, 2.0, 3.0, -3.0 + 1e-13])
    assert runner.compare_decisions(rule, tiny, tiny, "float64", 4, 1e-12)["ill"] == 1


def test_user_optimizer_and_problem_get_a_report() -> None:
    """Any object with init/update works; without adaptlr state the learning rates are n/a."""

    class PlainSGD:
        def init(self, params):
            return ()

        def update(self, grads, state, params):
            return {k: -0.1 * g for k, g in grads.items()}, state

    register_problem(Problem("test_bowl", "½‖x‖²", lambda: {"x": np.array([1.0, -2.0])},
                             lambda xp, p, d, i: {"x": p["x"]}))
    register_algorithm("test_plain_sgd", PlainSGD, problems=["test_bowl"])
    try:
        rows = runner.run_agreement(["test_plain_sgd"], ["numpy", "torch"], ["float64"], 100)
        assert {r.status for r in rows} <= {"pass", "skipped"}
        ran = [r for r in rows if r.status == "pass"]
        assert ran and all(r.max_rel_err_lr is None for r in ran)
    finally:
        ALGORITHMS.pop("test_plain_sgd")
        PROBLEMS.pop("test_bowl")


def test_missing_algorithm_is_skipped() -> None:
    register_algorithm("test_missing", lambda a: a.not_written_yet(a.sgd(0.1)), takes_module=True,
                       requires=("not_written_yet",))
    try:
        rows = runner.run_agreement(["test_missing"], ["numpy"], ["float64"], 100)
        assert [r.status for r in rows] == ["skipped"]
        assert "not available" in rows[0].reason
    finally:
        ALGORITHMS.pop("test_missing")


def test_cli_rejects_unknown_names(capsys) -> None:
    assert cli.main(["--backends", "nope"]) == 2
    assert "valid: numpy" in capsys.readouterr().err
    assert cli.main(["--algorithms", "nope"]) == 2
    assert "valid:" in capsys.readouterr().err
    assert cli.main(["--dtypes", "float16"]) == 2
    assert "valid: float64, float32" in capsys.readouterr().err


def test_cli_json_markdown_and_exit_status(tmp_path) -> None:
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    code = cli.main(["--algorithms", "sgd", "--backends", "numpy", "cupy", "--steps", "100", "--no-checks",
                     "--quiet", "--json", str(out_json), "--markdown", str(out_md)])
    assert code == 0
    records = json.loads(out_json.read_text())["rows"]
    keys = {"algorithm", "problem", "backend", "device", "dtype", "steps", "max_rel_err_params", "max_rel_err_lr",
            "decision_mismatches", "tolerance", "passed"}
    assert all(keys <= set(r) for r in records)
    if not BACKENDS["cupy"].available:
        assert any(r["backend"] == "cupy" and r["status"] == "skipped" and r["reason"] for r in records)
    assert "| algorithm |" in out_md.read_text() or "| kind |" in out_md.read_text()


class _Float32Broken:
    """A different step in float32 (SGD with 1.5× the rate): the float32 run cannot match the float64
    reference."""

    def init(self, params):
        return 0

    def update(self, grads, state, params):
        scale = 1.0 if params["w"].dtype == np.float64 else 1.5
        return {k: -0.1 * scale * g for k, g in grads.items()}, state


def test_cli_fails_on_a_failing_row(tmp_path) -> None:
    register_algorithm("test_broken", _Float32Broken, problems=["noisy_quadratic"])
    try:
        code = cli.main(["--algorithms", "test_broken", "--backends", "numpy", "--no-checks", "--quiet",
                         "--json", str(tmp_path / "rows.json")])
        assert code == 1
        rows = [r for r in json.loads((tmp_path / "rows.json").read_text())["rows"] if r["kind"] == "agreement"]
        assert {(r["dtype"], r["status"]) for r in rows} == {("float64", "pass"), ("float32", "fail")}
    finally:
        ALGORITHMS.pop("test_broken")


def test_a_trajectory_that_amplifies_rounding_is_ill_conditioned_not_failed() -> None:
    """Mechanic on the logistic problem amplifies a 1e-9 relative change of each step's gradient by
    ~4e7 (the float32 run ends 0.18 away): ill-conditioned, with the amplification; a contracting
    trajectory's amplification is O(1), so a wrong step there still fails (below)."""
    rows = runner.run_agreement(["mechanic(sgdm)"], ["numpy"], ["float32"], 150, problems=["logistic"])
    [row] = [r for r in rows if r.kind == "agreement"]
    assert row.max_rel_err_params > row.tolerance
    assert row.status == "ill-conditioned" and row.extra["amplification"] > 1e6 and "amplifies" in row.reason
    adamw = ALGORITHMS["adamw"]
    problem = PROBLEMS[adamw.problems[0]]
    ref = runner.run_trajectory(adamw.build(), problem, BACKENDS["numpy"], "float64", 150)
    assert runner.trajectory_amplification(adamw, problem, 150, ref) < 10.0


def test_a_wrong_step_on_a_contracting_trajectory_still_fails() -> None:
    register_algorithm("test_broken_contracting", _Float32Broken, problems=["noisy_quadratic"])
    try:
        rows = runner.run_agreement(["test_broken_contracting"], ["numpy"], ["float32"], 50)
    finally:
        ALGORITHMS.pop("test_broken_contracting")
    [row] = [r for r in rows if r.kind == "agreement"]
    assert row.status == "fail" and row.extra["amplification"] < 10.0


_BARS: list = []


class _CountingProgress:
    """Stands in for report.Progress: records the total it was made with and the calls."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done = total, 0
        _BARS.append(self)

    def __call__(self, label: str) -> None:
        self.done += 1

    def close(self) -> None:
        pass


@pytest.mark.parametrize("argv", [
    # cupy / torch-cuda / jax-gpu are not installed or have no device on CPU machines: they must
    # not count (the bar was created with 606 and ended at 366); where they run they count.
    ["--algorithms", "sgd", "adamw", "--backends", "numpy", "torch", "cupy", "torch-cuda", "jax-gpu",
     "array_api_strict-device1", "--steps", "5", "--no-checks"],
    ["--algorithms", "sgd", "--backends", "numpy", "--steps", "5", "--checks", "closed-form"],
], ids=["agreement", "with-a-check"])
def test_progress_total_equals_the_runs_made(monkeypatch, capsys, argv) -> None:
    _BARS.clear()
    monkeypatch.setattr(report, "Progress", _CountingProgress)
    cli.main(argv)
    (bar,) = _BARS
    assert bar.done == bar.total > 0


def test_progress_counts_the_runs_of_a_missing_algorithm() -> None:
    register_algorithm("test_missing_progress", lambda a: a.not_written_yet(a.sgd(0.1)), takes_module=True,
                       requires=("not_written_yet",))
    try:
        calls = []
        runner.run_agreement(["test_missing_progress"], ["numpy", "cupy"], ["float64", "float32"], 5, calls.append)
        planned = runner.planned_runs(["test_missing_progress"], ["numpy", "cupy"], ["float64", "float32"])
        assert len(calls) == planned == (4 if BACKENDS["cupy"].available else 2)
    finally:
        ALGORITHMS.pop("test_missing_progress")
