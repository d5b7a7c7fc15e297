"""Tests of ``adaptlr reproduce``: the data, the hand-written backward pass, and tiny experiment runs.

The experiments are run at a size far below ``--quick`` (their ``config`` is monkeypatched), so only
what is robust there is asserted: files written, table rows present, finite numbers, and the HD
learning rate rising in the first iterations.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from conftest import max_rel_err

from adaptlr.conformance.backends import BACKENDS
from adaptlr.reproduce import EXPERIMENTS, cli, data, harness, models

NUMPY = BACKENDS["numpy"]


@pytest.fixture(scope="module")
def digits() -> data.Digits:
    return data.load()


def test_digits_split_is_stratified_and_standardised(digits):
    assert digits.x_train.shape == (1347, 64) and digits.x_test.shape == (450, 64)
    assert np.allclose(digits.x_train.mean(axis=0), 0.0, atol=1e-12)
    counts = np.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 40 and counts.max() <= 50


def test_permuted_stream_changes_permutation_every_k_steps(digits):
    batches = list(data.permuted_stream(digits.x_train, digits.y_train, 4, 9, 3, seed=1))
    assert [task for _, _, task in batches] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    first_rows = {tuple(np.sort(x[0])) for x, _, _ in batches}
    x0 = batches[0][0][0]
    assert any(tuple(np.sort(x0)) == r for r in first_rows)  # a permutation keeps the multiset of pixels
    # the identity permutation in task 0: every row is a training row
    train_rows = {tuple(r) for r in digits.x_train}
    assert all(tuple(r) in train_rows for x, _, task in batches if task == 0 for r in x)
    assert not all(tuple(r) in train_rows for x, _, task in batches if task == 2 for r in x)


def _problem(sizes, seed=3, n=7):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, sizes[0]))
    y = rng.integers(0, sizes[-1], size=n)
    return x, y


@pytest.mark.parametrize("sizes", [[6, 4], [6, 5, 4], [6, 5, 3, 4]])
def test_backward_matches_torch_autograd(sizes):
    torch = pytest.importorskip("torch")
    x, y = _problem(sizes)
    params = models.init_mlp(sizes, 0, NUMPY)
    loss, grads = models.loss_and_grad(params, x, models.one_hot(y, sizes[-1], NUMPY), NUMPY.xp)
    tp = {k: {n: torch.tensor(a, requires_grad=True) for n, a in layer.items()} for k, layer in params.items()}
    h = torch.tensor(x)
    for k in range(len(tp)):
        h = h @ tp[f"layer{k}"]["w"].T + tp[f"layer{k}"]["b"]
        if k < len(tp) - 1:
            h = torch.relu(h)
    ref = torch.nn.functional.cross_entropy(h, torch.tensor(y))
    ref.backward()
    assert abs(float(loss) - ref.item()) <= 1e-13
    for k, layer in tp.items():
        for n, t in layer.items():
            assert max_rel_err(grads[k][n], t.grad.numpy()) <= 1e-12, (k, n)


def test_backward_matches_finite_differences():
    sizes = [5, 4, 3]
    x, y = _problem(sizes, n=5)
    params = models.init_mlp(sizes, 1, NUMPY)
    onehot = models.one_hot(y, 3, NUMPY)
    _, grads = models.loss_and_grad(params, x, onehot, NUMPY.xp)
    h = 1e-6
    for k, layer in params.items():
        for n, a in layer.items():
            numeric = np.zeros_like(a)
            for i in np.ndindex(a.shape):
                old = a[i]
                a[i] = old + h
                plus = models.loss_value(params, x, onehot, NUMPY.xp)
                a[i] = old - h
                minus = models.loss_value(params, x, onehot, NUMPY.xp)
                a[i] = old
                numeric[i] = (plus - minus) / (2 * h)
            assert max_rel_err(grads[k][n], numeric) <= 1e-7, (k, n)


def test_forward_backward_agree_across_backends(backend):
    sizes = [6, 5, 4]
    x, y = _problem(sizes)
    ref_params = models.init_mlp(sizes, 2, NUMPY)
    ref_loss, ref_grads = models.loss_and_grad(ref_params, x, models.one_hot(y, 4, NUMPY), NUMPY.xp)
    params = models.init_mlp(sizes, 2, backend)
    loss, grads = models.loss_and_grad(params, backend.asarray(x), models.one_hot(y, 4, backend), backend.xp)
    assert abs(float(backend.to_numpy(loss)) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss))
    for k in ref_grads:
        for n in ref_grads[k]:
            assert max_rel_err(backend.to_numpy(grads[k][n]), ref_grads[k][n]) <= 1e-12


def test_training_lowers_the_loss_and_logs_finite_values(digits):
    import adaptlr

    log = harness.train(adaptlr.sgd(0.1, momentum=0.9), digits, [64, 10], backend=NUMPY, seed=0, epochs=3,
                        batch_size=64, log_lr=True)
    assert log.epoch_train_loss[-1] < log.epoch_train_loss[0] < math.log(10)
    assert log.final_test_acc > 0.8
    assert np.allclose(log.step_lr, 0.1)
    assert math.isnan(log.epoch_omega[0]) and all(0 <= w <= 180 for w in log.epoch_omega[1:])


def test_angle_degrees_and_divergence_marker(digits):
    assert harness.angle_degrees(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(90.0)
    assert harness.angle_degrees(np.array([1.0, 1.0]), np.array([1.0, 0.0])) == pytest.approx(45.0)
    assert math.isnan(harness.angle_degrees(np.zeros(2), np.ones(2)))
    import adaptlr

    log = harness.train(adaptlr.sgd(1e200), digits, [64, 16, 10], backend=NUMPY, seed=0, epochs=2, batch_size=256)
    assert log.diverged and len(log.epoch_test_acc) == 2


def test_builtin_progress_bar(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm":
            raise ImportError("no tqdm")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    bar = harness.Progress(10, "demo")
    bar.update(10)
    bar.close()
    assert "demo [" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert cli.main(["nosuch"]) == 2
    assert cli.main(["eg", "--backend", "nosuch", "--out", str(tmp_path)]) == 2
    assert cli.main(["eg", "--seeds", "0", "--out", str(tmp_path)]) == 2


TINY = {
    "activelr": {"lrs": [1e-4, 1e-1], "epochs": 3, "seeds": 1, "sizes": [64, 10]},
    "autodrop": {"epochs": 5, "patience": 1, "seeds": 1, "sizes": [64, 10]},
    "hypergradient": {"models": {"logreg": [64, 10]}, "epochs": 1, "seeds": 1},
    "dsa": {"epochs": 2, "seeds": 1, "sizes": [64, 10]},
    "eg": {"shift_every": 100, "tasks": 2, "seeds": 1, "sizes": [64, 10]},
    "schedulefree": {"lengths": [30, 60], "grid": [1e-2], "seeds": 1, "sizes": [64, 10]},
}


def _numbers(table: str) -> list[float]:
    body = "\n".join(table.splitlines()[2:])
    return [float(m) for m in re.findall(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?", body)]


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_experiment_writes_table_and_plots(name, tmp_path, monkeypatch, capsys):
    import importlib

    module = importlib.import_module(f"adaptlr.reproduce.{name}")
    monkeypatch.setattr(module, "config", lambda settings: dict(TINY[name]))
    settings = harness.Settings(quick=True, backend=NUMPY, seeds=None, out=tmp_path, progress=False)
    try:
        result = cli.run_experiment(name, settings)
    except harness.AlgorithmMissing as missing:
        pytest.skip(str(missing))
    report = (tmp_path / f"{name}.md").read_text()
    assert result.table in report and result.findings
    rows = [line for line in result.table.splitlines() if line.startswith("|")]
    assert len(rows) >= 4
    numbers = _numbers(result.table)
    assert numbers and all(math.isfinite(v) for v in numbers)
    for plot in result.plots:
        assert plot.exists() and plot.stat().st_size < 150_000
        assert plot.read_bytes()[:4] == b"\x89PNG"


def test_hd_learning_rate_rises_in_the_first_iterations(tmp_path, monkeypatch):
    from adaptlr.reproduce import hypergradient

    monkeypatch.setattr(hypergradient, "config", lambda settings: dict(TINY["hypergradient"]))
    settings = harness.Settings(quick=True, backend=NUMPY, seeds=None, out=tmp_path, progress=False)
    try:
        result = hypergradient.run(settings)
    except harness.AlgorithmMissing as missing:
        pytest.skip(str(missing))
    for base in ("SGD", "SGDN"):
        lrs = np.asarray(result.metrics["logs"][("logreg", base, 1e-3, True)][0].step_lr)
        assert lrs[0] == pytest.approx(1e-3)  # step 1: d_prev = 0, α does not move
        assert lrs[20] > 3 * lrs[0]
        from_zero = np.asarray(result.metrics["logs"][("logreg", base, 0.0, True)][0].step_lr)
        assert from_zero[0] == 0.0 and from_zero[20] > 0


def test_cli_quick_run_prints_the_table(tmp_path, capsys):
    # The real --quick configuration of the cheapest experiment, through the command line.
    status = cli.main(["hypergradient", "--quick", "--no-progress", "--out", str(tmp_path)])
    if status == 1:
        pytest.skip("adaptlr.hypergradient is not available yet")
    assert status == 0
    out = capsys.readouterr().out
    assert "| logreg | SGD-HD | 0.001 |" in out
    assert (tmp_path / "hypergradient.md").exists() and (tmp_path / "hypergradient_logreg.png").exists()


def test_schedulefree_cosine_schedule_and_eval_points():
    """The baseline's schedule warms up linearly and ends at 0 at T; Schedule-Free's table evaluates x."""
    from adaptlr.reproduce import schedulefree

    schedule = schedulefree.warmup_cosine(0.1, 100)
    values = [float(schedule(np.asarray(float(t)))) for t in (1, 5, 52.5, 100)]
    assert values[0] == pytest.approx(0.02) and values[1] == pytest.approx(0.1)
    assert values[2] == pytest.approx(0.05, rel=1e-12) and values[3] == pytest.approx(0.0, abs=1e-15)
