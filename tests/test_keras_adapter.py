"""``adaptlr.backends.keras.Optimizer`` on every installed Keras backend (docs/frameworks/keras.md).

Keras picks its backend when it is imported, so the checks run in ``tests/keras_checks.py``, one
subprocess per backend (started together on first use), and these tests read their JSON results.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

if importlib.util.find_spec("keras") is None:  # not imported here: Keras would pick its backend (TensorFlow) now
    pytest.skip("keras is not installed", allow_module_level=True)

BACKENDS = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}  # Keras backend -> package
SCRIPT = os.path.join(os.path.dirname(__file__), "keras_checks.py")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
OPTIMIZERS = ["adamw", "active(adamw)", "autodrop(sgd)", "hypergradient(adam)", "adamw(schedule)",
              "schedule_free_adamw", "mechanic(adamw)"]

_runs: dict = {}


def _start_all() -> None:
    if _runs:
        return
    # CPU only: three processes must not each claim an accelerator (JAX preallocates most of a GPU).
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    env.pop("KERAS_BACKEND", None)
    for backend, package in BACKENDS.items():
        if importlib.util.find_spec(package) is None:
            _runs[backend] = f"{package} is not installed"
            continue
        out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # files: no pipe to fill up
        _runs[backend] = (subprocess.Popen([sys.executable, SCRIPT, backend], cwd=ROOT, env=env, text=True,
                                           stdout=out, stderr=err), out, err)


@pytest.fixture(scope="module", params=list(BACKENDS))
def checks(request: pytest.FixtureRequest) -> dict:
    """The results of tests/keras_checks.py on one Keras backend (skipped where it is not installed)."""
    _start_all()
    run = _runs[request.param]
    if isinstance(run, str):
        pytest.skip(f"Keras backend {request.param}: {run}")
    if isinstance(run, tuple):
        process, out, err = run
        try:
            process.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        out.seek(0)
        err.seek(0)
        lines = [line for line in out.read().splitlines() if line.startswith("KERAS-CHECKS ")]
        _runs[request.param] = json.loads(lines[-1][len("KERAS-CHECKS "):]) if lines else RuntimeError(
            f"keras_checks.py {request.param} failed (rc {process.returncode}):\n{err.read()[-4000:]}")
    result = _runs[request.param]
    if isinstance(result, Exception):
        raise result
    return result


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_fit_matches_functional_api(checks: dict, name: str) -> None:
    result = checks["trajectory"][name]
    assert result["steps"] == 24
    assert result["max_param_diff"] <= 1e-6, result
    assert result["max_loss_diff"] <= 1e-5, result  # per-step losses recovered from Keras' running mean
    assert result["last_loss"] < result["first_loss"]
    if name.startswith("autodrop"):
        assert result["drops"] >= 1  # the drop path ran


@pytest.mark.parametrize("how", ["model.save", "save_weights"])
def test_save_restore_continues_identically(checks: dict, how: str) -> None:
    result = checks["round_trip"][how]
    assert result["restored_type"] == "Optimizer"
    assert result["optimizer_variables"] > 2  # iteration, learning_rate and the adaptlr state
    assert result["restored_variables_diff"] == 0.0
    assert result["continued_weights_diff"] == 0.0
    assert result["continued_optimizer_diff"] == 0.0


def test_learning_rate_callback_sets_alpha(checks: dict) -> None:
    result = checks["learning_rate_callback"]
    assert result["final_learning_rate"] == pytest.approx(1e-2 * 0.5**5)
    assert result["max_param_diff"] <= 1e-6


def test_gradient_accumulation_counts_updates(checks: dict) -> None:
    result = checks["gradient_accumulation"]
    assert result["adaptlr_count"] == 24  # 6 epochs of 8 half batches, 2 per update
    assert result["max_param_diff"] <= 1e-6


def test_schedule_free_eval_callback_evaluates_at_x(checks: dict) -> None:
    result = checks["schedule_free_eval"]
    assert result["loss_at_y_minus_loss_at_x"] > 1e-4, result  # the two views differ: the checks below can fail
    assert result["val_loss_minus_loss_at_x"] <= 1e-5, result
    assert result["evaluate_minus_loss_at_x"] <= 1e-5, result
    assert result["predict_minus_prediction_at_x"] <= 1e-5, result
    assert result["weights_after_fit_minus_y"] <= 1e-6, result  # training stayed at y
    assert result["weights_changed_by_evaluate_and_predict"] == 0.0, result  # y restored bit-identically


def test_rejected_arguments(checks: dict) -> None:
    rejected = checks["rejected"]
    assert rejected["learning_rate"].startswith("ValueError: learning_rate is the adaptlr optimizer's")
    assert rejected["weight_decay"].startswith("ValueError: weight_decay is the adaptlr optimizer's")
    assert rejected["not_adaptlr"].startswith("TypeError: opt must be an adaptlr Optimizer")
    assert "custom_objects=adaptlr.backends.keras.custom_objects(opt)" in rejected["load_without_custom_objects"]


def test_docs_example_runs(checks: dict) -> None:
    assert checks["docs_example"].startswith("ok"), checks["docs_example"]
