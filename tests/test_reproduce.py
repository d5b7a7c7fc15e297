"""Tests of ``adaptlr reproduce``: the data, the hand-written backward passes, the verdicts, tiny experiment runs.

The experiments are run at a size far below ``--quick`` (their ``config`` is monkeypatched), on digits
and on MNIST-1D, so only what is robust there is asserted: files written, table rows present, finite
numbers, verdicts computed, and the HD learning rate rising in the first iterations.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from conftest import max_rel_err

from adaptlr.conformance.backends import BACKENDS
from adaptlr.reproduce import EXPERIMENTS, cli, data, harness, models, verdict
from adaptlr.reproduce.cnn import CNN1d

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
    _assert_finite_differences(grads, params, lambda: models.loss_value(params, x, onehot, NUMPY.xp), 1e-7)


def _assert_finite_differences(grads: dict, params: dict, loss: Callable[[], float], tolerance: float) -> None:
    """Every entry of ``grads`` (layer → name → array) matches the central difference of ``loss()``,
    which reads ``params`` (perturbed in place, one element at a time, and restored)."""
    h = 1e-6
    for k, layer in params.items():
        for n, a in layer.items():
            numeric = np.zeros_like(a)
            for i in np.ndindex(a.shape):
                old = a[i]
                a[i] = old + h
                plus = loss()
                a[i] = old - h
                minus = loss()
                a[i] = old
                numeric[i] = (plus - minus) / (2 * h)
            assert max_rel_err(grads[k][n], numeric) <= tolerance, (k, n)


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
    "activelr": {"lrs": [1e-4, 1e-1], "epochs": 3, "seeds": 1, "model": [64, 10], "batch": 32},
    "autodrop": {"epochs": 5, "patience": 1, "seeds": 1, "model": [64, 10], "batch": 32},
    "hypergradient": {"models": {"logreg": [64, 10]}, "epochs": 1, "seeds": 1, "batch": 32},
    "dsa": {"epochs": 2, "seeds": 2, "model": [64, 10], "batch": 32},
    "eg": {"shift_every": 100, "tasks": 2, "seeds": 1, "sizes": [64, 10], "threshold": 0.5},
    "schedulefree": {"lengths": [30, 60], "grid": [1e-2], "seeds": 1, "model": [64, 10], "batch": 32},
}
TINY_CNN = CNN1d(channels=(4, 4), kernels=(5, 3), strides=(2, 2), paddings=(1, 1))
TINY_MNIST1D = {
    "activelr": {"lrs": [1e-4, 1e-1], "epochs": 2, "seeds": 1, "model": [40, 10], "batch": 500},
    "autodrop": {"epochs": 4, "patience": 1, "seeds": 1, "model": TINY_CNN, "batch": 500},
    "hypergradient": {"models": {"logreg": [40, 10], "cnn": TINY_CNN}, "epochs": 1, "seeds": 1, "batch": 500},
    "dsa": {"epochs": 2, "seeds": 2, "model": TINY_CNN, "batch": 500},
    "eg": {"shift_every": 100, "tasks": 2, "seeds": 1, "sizes": [40, 10], "threshold": 1.5},
    "schedulefree": {"lengths": [30, 60], "grid": [1e-2], "seeds": 2, "model": [40, 10], "batch": 128},
}


def _numbers(table: str) -> list[float]:
    body = "\n".join(table.splitlines()[2:])
    return [float(m) for m in re.findall(r"(?<![\w.])-?\d+\.\d+(?:e-?\d+)?", body)]


@pytest.mark.parametrize("dataset", ["digits", "mnist1d"])
@pytest.mark.parametrize("name", EXPERIMENTS)
def test_tiny_experiment_writes_table_and_plots(name, dataset, tmp_path, monkeypatch, capsys):
    import importlib

    if dataset == "mnist1d":
        pytest.importorskip("mnist1d")
    module = importlib.import_module(f"adaptlr.reproduce.{name}")
    tiny = TINY if dataset == "digits" else TINY_MNIST1D
    monkeypatch.setattr(module, "config", lambda settings: dict(tiny[name]))
    settings = harness.Settings(quick=True, backend=NUMPY, seeds=None, out=tmp_path, progress=False, dataset=dataset)
    try:
        result = cli.run_experiment(name, settings)
    except harness.AlgorithmMissing as missing:
        pytest.skip(str(missing))
    stem = name if dataset == "digits" else f"{name}_mnist1d"
    report = (tmp_path / f"{stem}.md").read_text()
    assert result.table in report and result.findings and result.checks
    assert all(c.verdict in (verdict.AGREES, verdict.DIFFERS, verdict.INCONCLUSIVE) for c in result.checks)
    assert "| verdict |" in report
    assert all(p.name.endswith(".png") and (dataset == "digits") != ("mnist1d" in p.name) for p in result.plots)
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


# --- MNIST-1D and the 1-D CNN -------------------------------------------------------------------------


def test_mnist1d_is_generated_locally_with_a_fixed_seed(monkeypatch):
    mnist1d_data = pytest.importorskip("mnist1d.data")

    def no_download(*args, **kwargs):
        raise AssertionError("get_dataset downloads a file; the reproductions must generate the data")

    monkeypatch.setattr(mnist1d_data, "get_dataset", no_download)
    before = np.random.get_state()[1].copy()
    ds = data.load_mnist1d.__wrapped__(data.MNIST1D_SEED)  # bypass the cache: generate now
    assert np.array_equal(np.random.get_state()[1], before)  # the global generator is left as it was
    assert ds.x_train.shape == (4000, 40) and ds.x_test.shape == (1000, 40) and ds.name == "mnist1d"
    assert set(np.unique(ds.y_train)) == set(range(10)) and ds.x_train.dtype == np.float64
    cached = data.load_dataset("mnist1d")
    assert np.array_equal(cached.x_train, ds.x_train) and np.array_equal(cached.y_test, ds.y_test)
    with pytest.raises(ValueError, match="unknown dataset"):
        data.load_dataset("cifar")


CNN_CASES = [
    CNN1d(length=12, channels=(3, 4), kernels=(3, 3), strides=(2, 1), paddings=(1, 1), classes=5),
    CNN1d(length=11, channels=(2, 3, 2), kernels=(5, 3, 2), strides=(2, 2, 1), paddings=(2, 0, 1), classes=4),
]


def _torch_cnn_loss(torch, model, params, x, y):
    """The same network with torch.nn.functional.conv1d (weights reshaped to (C_out, C_in, K))."""
    h, c_in = torch.tensor(x)[:, None, :], 1
    for k, (c_out, kernel) in enumerate(zip(model.channels, model.kernels)):
        w = params[f"conv{k}"]["w"].reshape(c_out, kernel, c_in).permute(0, 2, 1)
        h = torch.relu(torch.nn.functional.conv1d(h, w, params[f"conv{k}"]["b"], stride=model.strides[k],
                                                  padding=model.paddings[k]))
        c_in = c_out
    flat = h.permute(0, 2, 1).reshape(h.shape[0], -1)  # adaptlr flattens (length, channel)
    out = flat @ params["head"]["w"].T + params["head"]["b"]
    return torch.nn.functional.cross_entropy(out, torch.tensor(y))


@pytest.mark.parametrize("model", CNN_CASES, ids=["2conv", "3conv"])
def test_cnn_backward_matches_torch_autograd(model):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(6, model.length)), rng.integers(0, model.classes, size=6)
    params = model.init(0, NUMPY)
    loss, grads = model.loss_and_grad(params, x, models.one_hot(y, model.classes, NUMPY), NUMPY.xp)
    tp = {k: {n: torch.tensor(a, requires_grad=True) for n, a in layer.items()} for k, layer in params.items()}
    ref = _torch_cnn_loss(torch, model, tp, x, y)
    ref.backward()
    assert abs(float(loss) - ref.item()) <= 1e-13
    assert set(grads) == set(params)
    for k, layer in tp.items():
        for n, t in layer.items():
            assert max_rel_err(grads[k][n], t.grad.numpy()) <= 1e-12, (k, n)


def test_cnn_backward_matches_finite_differences():
    model = CNN_CASES[1]
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(4, model.length)), rng.integers(0, model.classes, size=4)
    params = model.init(1, NUMPY)
    for layer in params.values():  # zero biases put padded windows exactly on ReLU's kink, where FD is wrong
        layer["b"] += rng.normal(0.0, 0.3, size=layer["b"].shape)
    onehot = models.one_hot(y, model.classes, NUMPY)
    _, grads = model.loss_and_grad(params, x, onehot, NUMPY.xp)
    _assert_finite_differences(grads, params, lambda: model.loss_value(params, x, onehot, NUMPY.xp), 1e-6)


def test_cnn_forward_backward_agree_across_backends(backend):
    model = CNN_CASES[0]
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(5, model.length)), rng.integers(0, model.classes, size=5)
    ref_params = model.init(2, NUMPY)
    ref_loss, ref_grads = model.loss_and_grad(ref_params, x, models.one_hot(y, model.classes, NUMPY), NUMPY.xp)
    params = model.init(2, backend)
    loss, grads = model.loss_and_grad(params, backend.asarray(x), models.one_hot(y, model.classes, backend),
                                      backend.xp)
    assert abs(float(backend.to_numpy(loss)) - float(ref_loss)) <= 1e-12 * abs(float(ref_loss))
    for k in ref_grads:
        for n in ref_grads[k]:
            assert max_rel_err(backend.to_numpy(grads[k][n]), ref_grads[k][n]) <= 1e-12


def test_gather_matrix_is_the_convolution_window():
    from adaptlr.reproduce.cnn import gather_matrix

    g = gather_matrix(7, 3, 2, 1)  # output length (7 + 2 - 3) // 2 + 1 = 4
    x = np.arange(1.0, 8.0)
    windows = (g @ x).reshape(4, 3)
    assert np.array_equal(windows, [[0, 1, 2], [2, 3, 4], [4, 5, 6], [6, 7, 0]])  # zero padding at both ends


# --- computed verdicts --------------------------------------------------------------------------------


def test_bootstrap_interval_matches_scipy():
    stats = pytest.importorskip("scipy.stats")
    d = np.array([0.3, -0.1, 0.8, 0.4, 0.2, 0.5])
    low, high = verdict.bootstrap_interval(d)
    ref = stats.bootstrap((d,), np.mean, method="percentile", n_resamples=20_000, random_state=1).confidence_interval
    assert abs(low - ref.low) < 0.03 and abs(high - ref.high) < 0.03
    assert low < d.mean() < high
    assert verdict.bootstrap_interval(np.full(5, 2.0)) == (2.0, 2.0)


@pytest.mark.parametrize(("low", "high", "sign", "margin", "expected"), [
    (0.1, 0.5, 1, 0.0, "agrees"),
    (-0.5, -0.1, 1, 0.0, "differs"),
    (-0.1, 0.5, 1, 0.0, "inconclusive"),
    (-0.5, -0.1, -1, 0.0, "agrees"),  # "a is lower": a negative interval agrees
    (-0.5, 0.2, 1, 1.0, "agrees"),  # within the non-inferiority margin
    (-3.0, -1.5, 1, 1.0, "differs"),
    (-1.5, -0.5, 1, 1.0, "inconclusive"),
    (0.0, 0.0, 1, 0.0, "inconclusive"),
    (float("nan"), 1.0, 1, 0.0, "inconclusive"),
])
def test_verdict_rule(low, high, sign, margin, expected):
    assert verdict.verdict(low, high, sign, margin) == expected


def test_check_pairs_by_seed_and_reports_the_interval():
    a = np.array([0.90, 0.80, 0.85, 0.70, 0.95])
    b = a - np.array([0.02, 0.03, 0.01, 0.02, 0.04])  # a higher on every seed, by little
    got = verdict.check("a beats b", "a", a, "b", b, higher=True)
    assert got.verdict == "agrees" and got.low > 0 and got.difference == pytest.approx(0.024)
    assert verdict.check("a below b", "a", a, "b", b, higher=False).verdict == "differs"
    assert verdict.check("vs a constant", "a", a, "0.8", 0.8, higher=True).verdict == "inconclusive"
    assert verdict.check("one seed", "a", a[:1], "b", b[:1], higher=True).verdict == "inconclusive"
    assert verdict.check("diverged", "a", [np.nan, 1.0], "b", [0.0, 0.0], higher=True).verdict == "inconclusive"
    with pytest.raises(ValueError, match="one value per seed"):
        verdict.check("bad", "a", a, "b", b[:3], higher=True)
    table = verdict.checks_table([got])
    assert "| a beats b |" in table and "**agrees**" in table


def test_cli_stops_before_training_when_a_dependency_is_missing(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mnist1d" else real(name, *a))

    def must_not_run(*args, **kwargs):
        raise AssertionError("training started although a dependency is missing")

    monkeypatch.setattr(cli, "run_experiment", must_not_run)
    assert cli.main(["eg", "--dataset", "mnist1d", "--no-progress", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "mnist1d not installed" in err and "Nothing was run" in err
    assert cli.main(["eg", "--dataset", "nosuch", "--out", str(tmp_path)]) == 2


def test_cli_quick_run_on_mnist1d_writes_its_own_files(tmp_path, capsys):
    pytest.importorskip("mnist1d")
    status = cli.main(["eg", "--dataset", "mnist1d", "--quick", "--no-progress", "--out", str(tmp_path)])
    if status == 1:
        pytest.skip("adaptlr.eg_step_size is not available yet")
    assert status == 0
    out = capsys.readouterr().out
    assert "MNIST-1D (4000 train / 1000 test)" in out and "| verdict |" in out
    assert (tmp_path / "eg_mnist1d.md").exists() and (tmp_path / "eg_shift_stream_mnist1d.png").exists()
    assert not (tmp_path / "eg.md").exists()


def test_cli_refuses_a_dataset_an_experiment_does_not_declare(tmp_path, monkeypatch, capsys):
    from adaptlr.reproduce import eg

    assert all("mnist1d" in cli.supported(name) for name in EXPERIMENTS)
    monkeypatch.setattr(eg, "DATASETS", ("digits",))
    monkeypatch.setattr(cli, "run_experiment", lambda *a, **k: pytest.fail("training started"))
    assert cli.main(["eg", "--dataset", "mnist1d", "--out", str(tmp_path)]) == 2
    assert "eg cannot run on --dataset mnist1d" in capsys.readouterr().err


def test_schedulefree_cosine_schedule_and_eval_points():
    """The baseline's schedule warms up linearly and ends at 0 at T; Schedule-Free's table evaluates x."""
    from adaptlr.reproduce import schedulefree

    schedule = schedulefree.warmup_cosine(0.1, 100)
    values = [float(schedule(np.asarray(float(t)))) for t in (1, 5, 52.5, 100)]
    assert values[0] == pytest.approx(0.02) and values[1] == pytest.approx(0.1)
    assert values[2] == pytest.approx(0.05, rel=1e-12) and values[3] == pytest.approx(0.0, abs=1e-15)
