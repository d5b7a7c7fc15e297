"""Checks against known answers, in float64: the spec's test vectors, closed-form trajectories,
known minimisers, the AutoDrop noisy-quadratic angle, and the reference libraries.

Every check returns :class:`~adaptlr.conformance.runner.Row` objects (``kind`` "analytic",
"reference" or "upstream": :mod:`adaptlr.conformance.upstream`); a check whose algorithm does not
exist in ``adaptlr`` yet is "skipped".
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import optree

from adaptlr.conformance.algorithms import ALGORITHMS
from adaptlr.conformance.backends import BACKENDS, Backend
from adaptlr.conformance.problems import PROBLEMS, Problem, logistic_minimiser, lstsq_minimiser
from adaptlr.conformance.runner import Row, max_rel_err, run_trajectory, tolerance
from adaptlr.conformance.upstream import upstream_rows

__all__ = ["CHECKS", "run_checks"]


def _missing(*names: str) -> list[str]:
    import adaptlr

    return [n for n in names if getattr(adaptlr, n, None) is None]


def _skip(kind: str, algorithm: str, problem: str, missing: list[str]) -> Row:
    return Row(kind, algorithm, problem, "*", "*", "float64", 0, status="skipped",
               reason=f"not available: adaptlr.{', adaptlr.'.join(missing)}")


# -- the spec's test vectors --------------------------------------------------------------------

def _scalar_problem(h: float, x0: float) -> Problem:
    return Problem(f"f=½·{h}x², x0={x0}", "", lambda: {"x": np.array([x0])},
                   lambda xp, p, d, i: {"x": h * p["x"]})


def _printed(values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """The values and the absolute error each allows: half a unit of the last printed digit where the
    spec rounds (7 or more significant digits), else 1e-12 relative (the value is exact)."""
    out, allowed = [], []
    for text in values:
        mantissa, _, exponent = text.lower().partition("e")
        decimals = len(mantissa.split(".")[1]) if "." in mantissa else 0
        significant = len(mantissa.replace("-", "").replace(".", "").lstrip("0"))
        value = float(text)
        out.append(value)
        rounded = 0.5 * 10.0 ** (int(exponent or 0) - decimals)
        allowed.append(rounded if significant >= 7 else 1e-12 * abs(value) + 1e-300)
    return np.array(out), np.array(allowed)


# (algorithm label, required names, factory(adaptlr), h, x0, expected lr·trace, expected x trace, section)
_VECTORS: list[tuple] = [
    ("active(sgd)", ("active",), lambda a: a.active(a.sgd(0.1), steps_per_epoch=1, increase=2.0, decrease=0.5),
     1.0, 1.0, ("0.1", "0.3", "0.5", "0.7", "0.9", "1.1", "1.3", "0.65", "0.325", "0.525"),
     ("0.9", "0.81", "0.567", "0.2835", "0.08505", "0.008505", "-0.0008505", "0.00025515", "8.93025e-5",
      "6.027919e-5"), "§2 α=0.1"),
    ("active(sgd)", ("active",), lambda a: a.active(a.sgd(1.5), steps_per_epoch=1, increase=2.0, decrease=0.5),
     1.0, 1.0, ("1.5", "0.75", "0.375", "3.375", "6.375"), None, "§2 α=1.5"),
    ("hd-addi-global(sgd)", ("hypergradient",), lambda a: a.hypergradient(a.sgd(0.1), hyper_lr=0.1), 1.0, 1.0,
     ("0.1", "0.19", "0.25561", "0.2951699366", "0.3159257873", "0.3259333466"),
     ("0.9", "0.729", "0.54266031", "0.3824833007", "0.2616469628", "0.1763674926"), "§4 SGD-HD"),
    ("hd-addi-global(sgd)", ("hypergradient",), lambda a: a.hypergradient(a.sgd(0.0), hyper_lr=0.01), 2.0, 3.0,
     ("0", "0.36", "0.4608"), ("3", "0.84", "0.065856"), "§4 SGD-HD α=0"),
    ("sgdn_hd", ("sgdn_hd",), lambda a: a.sgdn_hd(0.05, hyper_lr=0.01, momentum=0.9), 1.0, 1.0,
     ("0.05", "0.067195", "0.0857875901", "0.0997889695"), ("0.905", "0.7350302475", "0.4897972016", "0.2062134969"),
     "§4 SGDN-HD"),
    ("adam_hd", ("adam_hd",), lambda a: a.adam_hd(0.1, hyper_lr=0.01), 1.0, 1.0,
     ("0.1", "0.1089999999", "0.1168818674", "0.1235575480", "0.1289668792"),
     ("0.900000001", "0.7914493304", "0.6760305860", "0.5557719643", "0.4330594837"), "§4 Adam-HD"),
    ("hd-mult-global(sgd)", ("hypergradient",),
     lambda a: a.hypergradient(a.sgd(0.1), hyper_lr=0.5, mode="multiplicative"), 1.0, 1.0,
     ("0.1", "0.15", "0.225", "0.3375", "0.50625", "0.759375", "1.1390625", "0.56953125"), None,
     "§4 multiplicative"),
    ("eg-global(sgd)", ("eg_step_size",),
     lambda a: a.eg_step_size(a.sgd(0.1), scale_lr=1.0, gain_lr=1.0, gain_decay=0.9, max_log_step=None), 1.0, 1.0,
     None, ("0.9", "0.7922504373", "0.6739869662", "0.5473643646", "0.4204373248", "0.3048086401"), "§6 EG"),
]


def _vector_rows(backends: Sequence[Backend], steps: int) -> list[Row]:
    rows = []
    for label, requires, make, h, x0, lr_trace, x_trace, section in _VECTORS:
        missing = _missing(*requires)
        if missing:
            rows.append(_skip("analytic", label, f"spec {section}", missing))
            continue
        # "§4 SGD-HD α=0" prints x_1 = x_0 (α_1 = 0): the x trace there starts at step 1's result.
        n = max(len(lr_trace or ()), len(x_trace or ()))
        for b in backends:
            rows.append(_vector_row(label, section, make, h, x0, lr_trace, x_trace, n, b))
    return rows


def _vector_row(label: str, section: str, make: Callable, h: float, x0: float, lr_trace: Sequence[str] | None,
                x_trace: Sequence[str] | None, n: int, b: Backend) -> Row:
    import adaptlr

    row = Row("analytic", label, f"spec {section}", b.name, b.device_name, "float64", n)
    start = time.perf_counter()
    try:
        traj = run_trajectory(make(adaptlr), _scalar_problem(h, x0), b, "float64", n)
    except Exception as error:
        row.status, row.reason = "fail", f"{type(error).__name__}: {error}"
        return row
    row.seconds = time.perf_counter() - start
    ok, allowed = True, 0.0
    for trace, got, column in ((x_trace, [p[0][0] for p in traj.params[1:]], "params"),
                               (lr_trace, [lr[0][0] for lr in traj.lrs[:]] if traj.lrs else None, "lr")):
        if trace is None or got is None:
            continue
        expected, half = _printed(trace)
        got = np.asarray(got[:len(expected)])
        err = np.abs(got - expected)
        ok = ok and bool(np.all(err <= half * (1 + 1e-9)))
        rel = float(np.max(err / np.maximum(np.abs(expected), 1e-300)))
        nonzero = np.abs(expected) > 0
        allowed = max(allowed, float(np.max(half[nonzero] / np.abs(expected[nonzero]), initial=0.0)))
        setattr(row, f"max_rel_err_{column}", rel)
        if not ok and not row.reason:
            row.reason = f"{column} {np.array2string(got, precision=10)} vs spec {list(trace)}"
    row.tolerance = allowed  # the loosest per-value allowance (see _printed)
    row.status = "pass" if ok else "fail"
    if lr_trace is not None and traj.lrs and b.name == "numpy" and label.startswith("active"):
        row.extra["plot"] = {"title": f"{label}, spec {section}: the learning rate α·γ per step",
                             "series": {"adaptlr": [float(lr[0][0]) for lr in traj.lrs],
                                        "spec": [float(x) for x in lr_trace]}}
    return row


def _dsa_sign_rows(backends: Sequence[Backend], steps: int) -> list[Row]:
    """§5: on a separable quadratic with ``structure=("element",)`` each factor changes by e^±β per step."""
    missing = _missing("dsa")
    if missing:
        return [_skip("analytic", "dsa-element(sgd)", "spec §5 e^±β", missing)]
    import adaptlr

    beta, n = 0.05, 12
    h = np.array([0.5, 1.0, 3.5])  # 1 - 0.1·h·factor < 0 for the last: its gradient flips sign every step
    problem = Problem("sep", "", lambda: {"w": np.array([1.0, -2.0, 0.5])}, lambda xp, p, d, i: {"w": d["h"] * p["w"]},
                      lambda _s: {"h": h})
    rows = []
    for b in backends:
        row = Row("analytic", "dsa-element(sgd)", "spec §5 e^±β", b.name, b.device_name, "float64", n,
                  tolerance=tolerance("float64", n))
        try:
            traj = run_trajectory(adaptlr.dsa(adaptlr.sgd(0.1), hyper_lr=beta, structure=("element",)), problem, b,
                                  "float64", n)
        except Exception as error:
            row.status, row.reason = "fail", f"{type(error).__name__}: {error}"
            rows.append(row)
            continue
        worst = 0.0
        for t in range(2, n + 1):
            # P = A_{t-1}·d_{t-1} = -u_{t-1}; per element cos = G·P / (|G||P| + 1e-12) ≈ sign(G·P)
            g, p = traj.grads[t - 1][0], traj.params[t - 2][0] - traj.params[t - 1][0]
            expected = np.exp(beta * g * p / (np.abs(g) * np.abs(p) + 1e-12))
            ratio = traj.lrs[t - 1][0] / traj.lrs[t - 2][0]
            worst = max(worst, float(np.max(np.abs(ratio - expected) / expected)))
        row.max_rel_err_lr = worst
        row.status = "pass" if worst <= row.tolerance else "fail"
        rows.append(row)
    return rows


# -- closed-form trajectories of SGD and heavy-ball momentum on a diagonal quadratic -------------

def _closed_form_rows(backends: Sequence[Backend], steps: int) -> list[Row]:
    import adaptlr

    problem = PROBLEMS["quadratic"]
    consts = problem.data(steps)
    h = np.concatenate([consts["hw"].ravel(), consts["hb"].ravel()])
    star = np.concatenate([consts["w_star"].ravel(), consts["b_star"].ravel()])
    init = problem.params()
    e0 = np.concatenate([init["w"].ravel(), init["b"].ravel()]) - star
    cases = [("sgd", lambda: adaptlr.sgd(0.1), 0.1, 0.0, False),
             ("sgdm", lambda: adaptlr.sgd(0.05, momentum=0.9), 0.05, 0.9, False),
             ("sgdn", lambda: adaptlr.sgd(0.05, momentum=0.9, nesterov=True), 0.05, 0.9, True)]
    rows = []
    for name, make, alpha, mu, nesterov in cases:
        # (e_t, b_t) = M (e_{t-1}, b_{t-1}) per element, b_0 = 0:
        #   b' = μ b + h e;  e' = e - α b'  (heavy ball)  or  e' = e - α (h e + μ b')  (Nesterov).
        expected = []
        for k in range(h.size):
            hk = h[k]
            if nesterov:
                m = np.array([[1 - alpha * hk - alpha * mu * hk, -alpha * mu * mu], [hk, mu]])
            else:
                m = np.array([[1 - alpha * hk, -alpha * mu], [hk, mu]])
            expected.append([np.linalg.matrix_power(m, t) @ np.array([e0[k], 0.0]) for t in range(steps + 1)])
        exact = np.array(expected)[:, :, 0].T + star  # (steps+1, elements)
        split = [[row[:12].reshape(3, 4), row[12:]] for row in exact]
        # the problem's leaves are flattened in key order: b before w
        split = [[b_, w_] for w_, b_ in split]
        for b in backends:
            row = Row("analytic", name, "closed form: diagonal quadratic", b.name, b.device_name, "float64", steps,
                      tolerance=tolerance("float64", steps))
            start = time.perf_counter()
            traj = run_trajectory(make(), problem, b, "float64", steps)
            row.seconds = time.perf_counter() - start
            row.max_rel_err_params = max_rel_err(traj.params, split)
            row.status = "pass" if row.max_rel_err_params <= row.tolerance else "fail"
            rows.append(row)
    return rows


# -- convergence to known minimisers ------------------------------------------------------------

_CONVERGENCE = [
    # (algorithm in the registry, problem, steps, minimiser, tolerance on ‖θ - θ*‖∞/‖θ*‖∞)
    ("sgd", "least_squares", 1500, lstsq_minimiser, 1e-10),
    ("sgdn", "least_squares", 1500, lstsq_minimiser, 1e-10),
    ("active(sgd)", "least_squares", 1500, lstsq_minimiser, 1e-10),
    ("hd-addi-global(sgd)", "least_squares", 1500, lstsq_minimiser, 1e-10),
    ("sgdn", "logistic", 1500, logistic_minimiser, 1e-8),
    ("active(sgd)", "logistic", 3000, logistic_minimiser, 1e-8),
    ("eg-global(sgdm)", "logistic", 3000, logistic_minimiser, 1e-8),
]


def _convergence_rows(backends: Sequence[Backend], steps: int) -> list[Row]:
    rows = []
    numpy = BACKENDS["numpy"]
    for alg_name, prob_name, n, minimiser, tol in _CONVERGENCE:
        algorithm = ALGORITHMS.get(alg_name)
        if algorithm is None:
            continue
        missing = algorithm.missing()
        if missing:
            rows.append(_skip("analytic", alg_name, f"minimiser: {prob_name}", missing))
            continue
        row = Row("analytic", alg_name, f"minimiser: {prob_name}", "numpy", "cpu", "float64", n, tolerance=tol)
        rows.append(_final_distance(row, algorithm.build(), PROBLEMS[prob_name], numpy, minimiser()))
    rows.append(_rosenbrock_row())
    return rows


def _final_distance(row: Row, optimizer: Any, problem: Problem, b: Backend, target: np.ndarray) -> Row:
    start = time.perf_counter()
    try:
        traj = run_trajectory(optimizer, problem, b, "float64", row.steps)
    except Exception as error:
        row.status, row.reason = "fail", f"{type(error).__name__}: {error}"
        return row
    row.seconds = time.perf_counter() - start
    leaves = traj.params[-1]  # keys sorted: b (1,) then w
    got = np.concatenate([leaves[1].ravel(), leaves[0].ravel()]) if len(leaves) == 2 else leaves[0].ravel()
    row.max_rel_err_params = float(np.max(np.abs(got - target)) / np.max(np.abs(target)))
    row.status = "pass" if row.max_rel_err_params <= row.tolerance else "fail"
    return row


def _rosenbrock_row() -> Row:
    import adaptlr

    row = Row("analytic", "sgdm(1e-3, μ=0.9)", "minimiser: rosenbrock (1, 1)", "numpy", "cpu", "float64", 6000,
              tolerance=1e-8)
    return _final_distance(row, adaptlr.sgd(1e-3, momentum=0.9), PROBLEMS["rosenbrock"], BACKENDS["numpy"],
                           np.array([1.0, 1.0]))


# -- the AutoDrop noisy-quadratic angle ---------------------------------------------------------

def _angle_rows(backends: Sequence[Backend], steps: int) -> list[Row]:
    """SGD on ½‖x‖² with isotropic noise: ω settles at arccos(-(1-r)/2), r = (1-ηλ)^N (spec §3)."""
    missing = _missing("autodrop")
    if missing:
        return [_skip("analytic", "autodrop(sgd)", "noisy-quadratic angle", missing)]
    import adaptlr

    dim, n_per_epoch, eta, epochs = 20000, 50, 0.01, 9
    total = n_per_epoch * epochs
    rng = np.random.default_rng(20261122)
    noise = rng.standard_normal((total, dim))
    problem = Problem("noisy", "", lambda: {"x": np.zeros(dim)}, lambda xp, p, d, i: {"x": p["x"] + d["noise"][i, ...]},
                      lambda _s: {"noise": noise})
    expected = math.degrees(math.acos(-(1 - (1 - eta) ** n_per_epoch) / 2))
    row = Row("analytic", "autodrop(sgd)", "noisy-quadratic angle (D=20000, N=50)", "numpy", "cpu", "float64", total,
              tolerance=1.0 / expected)
    opt = adaptlr.autodrop(adaptlr.sgd(eta), steps_per_epoch=n_per_epoch, theta=1e-6, patience_epochs=10_000)
    b = BACKENDS["numpy"]
    xp = b.xp
    params = {"x": b.asarray(np.zeros(dim))}
    state = opt.init(params)
    omegas, snaps = [], []
    start = time.perf_counter()
    try:
        for i in range(total):
            if i % n_per_epoch == 0:
                snaps.append(np.array(params["x"]))
            updates, state = opt.update(problem.grad(xp, params, {"noise": noise}, i), state, params)
            params = optree.tree_map(lambda p, u: p + u, params, updates)
            if i % n_per_epoch == 0 and len(snaps) >= 3:  # ω_e of the epoch that starts at this step
                omegas.append(float(state.adaptations[-1].signals(None)["omega"]))
    except Exception as error:
        row.status, row.reason = "fail", f"{type(error).__name__}: {error}"
        return [row]
    row.seconds = time.perf_counter() - start
    own = [math.degrees(math.acos(np.dot(s1, s0) / (np.linalg.norm(s1) * np.linalg.norm(s0))))
           for s0, s1 in zip(np.diff(snaps, axis=0)[:-1], np.diff(snaps, axis=0)[1:])]
    settled = omegas[2:]  # skip the first epochs (the start from x = 0 is not stationary)
    mean = float(np.mean(settled))
    row.max_rel_err_params = abs(mean - expected) / expected
    row.max_rel_err_lr = max(abs(a - b_) for a, b_ in zip(omegas, own)) / expected  # state ω vs ω from params
    row.reason = f"mean ω {mean:.2f}° (epochs 5-{epochs}), arccos(-(1-r)/2) = {expected:.2f}°"
    row.extra["plot"] = {"title": "AutoDrop: ω per epoch on the noisy quadratic (degrees)",
                         "series": {"ω (state)": omegas, "arccos(-(1-r)/2)": [expected] * len(omegas)}}
    row.status = "pass" if row.max_rel_err_params <= row.tolerance and row.max_rel_err_lr <= 1e-9 else "fail"
    return [row]


# -- reference libraries ------------------------------------------------------------------------

def _torch_optimizers() -> dict[str, Callable[[list], Any]]:
    import torch

    out = {
        "sgd": lambda p: torch.optim.SGD(p, lr=0.1),
        "sgdm": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9),
        "sgdn": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        "sgdm-damp-l2": lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.5, dampening=0.3, weight_decay=0.01),
        "adam": lambda p: torch.optim.Adam(p, lr=0.05),
        "adam-l2": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=0.01),
        "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.01),
        "radam": lambda p: torch.optim.RAdam(p, lr=0.05),
        "radam-decoupled": lambda p: torch.optim.RAdam(p, lr=0.05, weight_decay=0.01, decoupled_weight_decay=True),
    }
    try:
        import adabelief_pytorch

        def adabelief(p: Any) -> Any:
            with contextlib.redirect_stdout(io.StringIO()):  # it prints its settings even with print_change_log=False
                return adabelief_pytorch.AdaBelief(p, lr=0.05, print_change_log=False)

        out["adabelief"] = adabelief
    except ImportError:
        pass
    return out


def _reference_rows(backends: Sequence[Backend], steps: int) -> list[Row]:
    torch_backend = BACKENDS["torch"]
    if not torch_backend.available:
        return [Row("reference", "*", "torch.optim", "torch", "cpu", "float64", steps, status="skipped",
                    reason=torch_backend.unavailable_reason() or "")]
    import torch

    rows = []
    optimizers = _torch_optimizers()
    for name in ("sgd", "sgdm", "sgdn", "sgdm-damp-l2", "adam", "adam-l2", "adamw", "radam", "radam-decoupled",
                 "adabelief"):
        library = "adabelief_pytorch.AdaBelief" if name == "adabelief" else "torch.optim"
        if name not in optimizers:
            rows.append(Row("reference", name, library, "numpy", "cpu", "float64", steps, status="skipped",
                            reason="adabelief-pytorch is not installed"))
            continue
        for prob_name in ("noisy_quadratic", "logistic"):
            problem = PROBLEMS[prob_name]
            row = Row("reference", name, f"{library} on {prob_name}", "numpy", "cpu", "float64", steps,
                      tolerance=tolerance("float64", steps, problem.condition, ALGORITHMS[name].scalar_condition()))
            ref = run_trajectory(ALGORITHMS[name].build(), problem, BACKENDS["numpy"], "float64", steps)
            tree = optree.tree_map(lambda x: torch.tensor(x, dtype=torch.float64), problem.params())
            data = optree.tree_map(lambda x: torch.tensor(x, dtype=torch.float64), problem.data(steps))
            leaves, spec = optree.tree_flatten(tree)
            opt = optimizers[name](leaves)
            traj = [[x.detach().numpy().copy() for x in leaves]]
            with torch.no_grad():
                for i in range(steps):
                    grads = optree.tree_leaves(problem.grad(torch_backend.xp, optree.tree_unflatten(spec, leaves), data,
                                                            i))
                    for p, g in zip(leaves, grads):
                        p.grad = g.clone()
                    opt.step()
                    traj.append([x.detach().numpy().copy() for x in leaves])
            row.max_rel_err_params = max_rel_err(ref.params, traj)
            row.status = "pass" if row.max_rel_err_params <= row.tolerance else "fail"
            rows.append(row)
    return rows


CHECKS: dict[str, Callable[[Sequence[Backend], int], list[Row]]] = {
    "spec-vectors": _vector_rows,
    "dsa-signs": _dsa_sign_rows,
    "closed-form": _closed_form_rows,
    "convergence": _convergence_rows,
    "autodrop-angle": _angle_rows,
    "reference-libraries": _reference_rows,
    "upstream": upstream_rows,  # learning-rate-free optimizers vs prodigyopt, dadaptation, dog-optimizer, optax
}


def run_checks(backends: Sequence[Backend], steps: int, progress: Callable[[str], None] = lambda _s: None,
               names: Sequence[str] | None = None) -> list[Row]:
    """All analytic and reference-library checks (float64) on ``backends`` where they run per backend."""
    rows = []
    for name in names or CHECKS:
        try:
            rows.extend(CHECKS[name](backends, steps))
        except Exception as error:  # a broken check is a failed row, not a crashed report
            rows.append(Row("analytic", "*", name, "*", "*", "float64", steps, status="fail",
                            reason=f"{type(error).__name__}: {error}"))
        progress(name)
    return rows
