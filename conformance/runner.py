"""Run algorithms on problems on every backend and compare with the NumPy float64 run.

Errors are normwise: for each step and parameter leaf, ``‖x - x_ref‖∞ / ‖x_ref‖∞``, and the row
reports the maximum over steps and leaves (the same for the learning rates of
``adaptlr.learning_rates(state)``, broadcast to the parameter shapes). The tolerance of a row comes
from the one rule of :mod:`adaptlr.conformance.tolerances` (dtype, steps, the problem's and the
algorithm's condition, and the condition of the optimizer's step scalars).

A discrete decision counts as ill-conditioned when its margin in the reference run (see
:mod:`adaptlr.conformance.algorithms`) is below the row's tolerance; a row with any such decision is
reported as "ill-conditioned" instead of pass/fail.

A row beyond its tolerance is also "ill-conditioned" (not "fail") when the trajectory itself
amplifies rounding beyond the rule's budget: the NumPy float64 run repeated with every step's
gradient scaled by ``1 ± δ`` (:data:`PROBE_DELTA`, fixed random signs) ends ``A·δ`` away from the
reference, and ``A · eps(dtype)`` (one rounding of each step's gradient in the row's dtype,
amplified) already exceeds the row's tolerance. Backends that differ only by rounding cannot agree
more closely than that (Mechanic on the logistic problem: the perturbation grows about 8× per step
from step 40). ``extra["amplification"]`` gives ``A``.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import cache, partial
from typing import Any

import numpy as np
import optree

from adaptlr._tree import Layout
from adaptlr.conformance.algorithms import ALGORITHMS, Algorithm, AngleDrops, EpochSignFlips, HypergradientSigns
from adaptlr.conformance.backends import BACKENDS, Backend
from adaptlr.conformance.problems import PROBLEMS, Problem
from adaptlr.conformance.tolerances import eps, tolerance

__all__ = ["DTYPES", "Row", "Trajectory", "agreement_pairs", "max_rel_err", "planned_runs", "run_agreement",
           "run_trajectory", "tolerance"]

DTYPES = ("float64", "float32")

@dataclass
class Row:
    """One line of the report."""

    kind: str  # "agreement", "analytic", "reference", "upstream", or "backend"
    algorithm: str
    problem: str
    backend: str
    device: str
    dtype: str
    steps: int
    max_rel_err_params: float | None = None
    max_rel_err_lr: float | None = None
    decisions: int = 0
    decision_mismatches: int = 0
    ill_conditioned_decisions: int = 0
    min_margin: float | None = None
    tolerance: float | None = None
    status: str = "pass"  # pass, fail, ill-conditioned, skipped
    reason: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool | None:
        return {"pass": True, "fail": False}.get(self.status)

    def record(self) -> dict:
        out = asdict(self)
        out["passed"] = self.passed
        return out


@dataclass
class Trajectory:
    """Float64 NumPy copies of a run: ``params[0]`` initial, ``params[t]`` after step t; ``grads[t-1]``
    and ``lrs[t-1]`` of step t (``lrs`` None when the optimizer has no adaptlr learning rates);
    ``signals[t-1]``: the 0-D ``signals()`` of the adaptation states after step t, as ``"k.name"``."""

    params: list[list[np.ndarray]]
    grads: list[list[np.ndarray]]
    lrs: list[list[np.ndarray]] | None
    signals: list[dict[str, float]] = field(default_factory=list)  # the 0-D signals of the adaptations


def _to_backend(tree: Any, backend: Backend, dtype: str) -> Any:
    return optree.tree_map(lambda x: backend.asarray(x, dtype), tree)


def _leaves_np(tree: Any, backend: Backend) -> list[np.ndarray]:
    return [np.asarray(backend.to_numpy(x), dtype=np.float64) for x in optree.tree_leaves(tree)]


def run_trajectory(optimizer: Any, problem: Problem, backend: Backend, dtype: str, steps: int) -> Trajectory:
    """Run ``optimizer`` for ``steps`` steps of ``problem`` on ``backend`` in ``dtype``.

    On JAX the step (gradient, update, learning rates) runs under ``jax.jit``, compiled once per run,
    which is also a check that the optimizer is jittable.
    """
    import adaptlr

    xp = backend.xp
    params = _to_backend(problem.params(), backend, dtype)
    data = _to_backend(problem.data(steps), backend, dtype)
    state = optimizer.init(params)
    shapes = [x.shape for x in _leaves_np(params, backend)]
    has_lr = isinstance(state, adaptlr.OptimizerState)
    layout = Layout.of(params)[0]

    def scalar_signals(state: Any) -> dict:
        out = {}
        for k, adaptation_state in enumerate(state.adaptations if has_lr else ()):
            for name, value in getattr(adaptation_state, "signals", lambda _layout: {})(layout).items():
                if getattr(value, "ndim", None) == 0:
                    out[f"{k}.{name}"] = value
        return out

    def step(params: Any, state: Any, data: dict, i: Any) -> tuple:
        grads = problem.grad(xp, params, data, i)
        updates, state = optimizer.update(grads, state, params)
        params = optree.tree_map(lambda p, u: p + u, params, updates)
        return params, state, grads, adaptlr.learning_rates(state) if has_lr else None, scalar_signals(state)

    index: Callable[[int], Any] = lambda i: i  # noqa: E731
    if backend.library == "jax":
        import jax

        step = jax.jit(step)
        index = lambda i: xp.asarray(i, dtype=xp.int32)  # noqa: E731 - one compilation for every step
    out = Trajectory([_leaves_np(params, backend)], [], [] if has_lr else None)
    for i in range(steps):
        params, state, grads, lrs, signals = step(params, state, data, index(i))
        out.signals.append({k: float(backend.to_numpy(v)) for k, v in signals.items()})
        out.params.append(_leaves_np(params, backend))
        out.grads.append(_leaves_np(grads, backend))
        if out.lrs is not None:
            out.lrs.append([np.broadcast_to(lr, s) for lr, s in zip(_leaves_np(lrs, backend), shapes)])
    return out


def max_rel_err(actual: Sequence[Sequence[np.ndarray]], expected: Sequence[Sequence[np.ndarray]]) -> float:
    """max over steps ``k`` and leaves of ``‖a_k - e_k‖∞ / max_{j ≤ k} ‖e_j‖∞``.

    The scale is the largest reference magnitude of the leaf so far, not its current value:
    rounding errors scale with the magnitudes that entered the computation (``x_k - u_k`` carries
    ``eps · (|x_k| + |u_k|)``), and an iterate passing close to zero (a one-element bias crossing
    zero) would otherwise divide an ordinary error by an accidental near-zero. Where the leaf
    has been all zero so far the error is absolute.
    """
    worst = 0.0
    scales: dict[int, float] = {}
    for step_a, step_e in zip(actual, expected, strict=True):
        for i, (a, e) in enumerate(zip(step_a, step_e, strict=True)):
            if a.size == 0:
                continue
            scale = scales[i] = max(scales.get(i, 0.0), float(np.max(np.abs(e))))
            err = float(np.max(np.abs(a - e)))
            if not math.isfinite(err):
                return math.inf
            worst = max(worst, err / scale if scale > 0 else err)
    return worst


# -- decisions ----------------------------------------------------------------------------------

def _lr_change_signs(traj: Trajectory, t: int, dtype: str) -> list[np.ndarray]:
    """Per leaf, the sign of the learning-rate change made by step t (0: exactly unchanged)."""
    prev = traj.lrs[t - 2] if t >= 2 else traj.lrs[t - 1]
    return [np.sign(lr - before) for lr, before in zip(traj.lrs[t - 1], prev)]


def _flat(leaves: Iterable[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.ravel(x) for x in leaves])


def _ratio(num: np.ndarray, den: np.ndarray | float) -> np.ndarray:
    den = np.asarray(den, dtype=np.float64)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


def _epoch_flip_margins(ref: Trajectory, rule: EpochSignFlips, steps: int) -> dict[int, np.ndarray]:
    s = rule.steps_per_epoch
    out = {}
    for t in range(2 * s, steps + 1, s):
        cur = [np.sum([g[i] for g in ref.grads[t - s:t]], axis=0) for i in range(len(ref.grads[0]))]
        cur_abs = [np.sum([np.abs(g[i]) for g in ref.grads[t - s:t]], axis=0) for i in range(len(ref.grads[0]))]
        prev = [np.sum([g[i] for g in ref.grads[t - 2 * s:t - s]], axis=0) for i in range(len(ref.grads[0]))]
        prev_abs = [np.sum([np.abs(g[i]) for g in ref.grads[t - 2 * s:t - s]], axis=0)
                    for i in range(len(ref.grads[0]))]
        out[t] = np.minimum(_ratio(np.abs(_flat(cur)), _flat(cur_abs)), _ratio(np.abs(_flat(prev)), _flat(prev_abs)))
    return out


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / den) if den > 0 else 0.0


def _hypergradient_margins(ref: Trajectory, rule: HypergradientSigns,
                           steps: int) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """``|cos(g_t, u_{t-1})|`` per group, broadcast to the elements (u: the previous update), and the
    relative learning-rate change of the reference (its sign is only seen above rounding)."""
    out, changes = {}, {}
    for t in range(2, steps + 1):
        g = ref.grads[t - 1]
        u = [a - b for a, b in zip(ref.params[t - 1], ref.params[t - 2])]
        if rule.granularity == "global":
            m = [np.full(x.shape, abs(_cos(_flat(g), _flat(u)))) for x in g]
        elif rule.granularity == "tensor":
            m = [np.full(gi.shape, abs(_cos(np.ravel(gi), np.ravel(ui)))) for gi, ui in zip(g, u)]
        else:
            m = [np.minimum(_ratio(np.abs(gi), np.max(np.abs(gi), initial=0.0)),
                            _ratio(np.abs(ui), np.max(np.abs(ui), initial=0.0))) for gi, ui in zip(g, u)]
        changes[t] = _flat([_ratio(np.abs(a - b), np.abs(b)) for a, b in zip(ref.lrs[t - 1], ref.lrs[t - 2])])
        out[t] = _flat(m)
    return out, changes


def _angle_drop_margins(ref: Trajectory, rule: AngleDrops, steps: int) -> tuple[dict[int, np.ndarray], list[int]]:
    """Margins ``||Δ_e| - θ_e|`` in units of the angle's rounding sensitivity, at the first step of
    each epoch whose Δ is compared, and the steps where the spec's detector drops (for reference)."""
    s = rule.steps_per_epoch
    snapshots, omegas, theta, latched, n = [], {}, rule.theta, False, 0
    margins: dict[int, np.ndarray] = {}
    spec_drops = []
    for e in range(1, (steps - 1) // s + 2):
        t = (e - 1) * s + 1
        snapshots.append(_flat(ref.params[t - 1]))
        if e >= 3:
            s_new, s_old = snapshots[-1] - snapshots[-2], snapshots[-2] - snapshots[-3]
            norm_new, norm_old = np.linalg.norm(s_new), np.linalg.norm(s_old)
            if norm_new > 0 and norm_old > 0:
                cos = float(np.clip(np.dot(s_new, s_old) / (norm_new * norm_old), -1, 1))
                # d(omega) per unit relative error of the snapshots: |x|/|s| amplification over sin(omega).
                sens = math.degrees(2 * max(np.linalg.norm(snapshots[-1]), 1e-300) / min(norm_new, norm_old)
                                    / max(math.sin(math.acos(cos)), 1e-12))
                omegas[e] = (math.degrees(math.acos(cos)), sens)
        if e < 4:
            continue
        if not latched and e in omegas and e - 1 in omegas:
            delta = omegas[e][0] - omegas[e - 1][0]
            margins[t] = np.array([abs(abs(delta) - theta) / (omegas[e][1] + omegas[e - 1][1])])
            if abs(delta) < theta:
                latched, n = True, 0
        if latched:
            n += 1
            if n == rule.patience_epochs:
                spec_drops.append(t)
                if rule.grow_theta:
                    theta = min(rule.theta_max, theta / rule.drop_factor)
                latched, n = False, 0
    return margins, spec_drops


def compare_decisions(rule: Any, ref: Trajectory, run: Trajectory, dtype: str, steps: int,
                      threshold: float) -> dict[str, Any]:
    """Decision counts, mismatches against the reference, and margins below ``threshold``."""
    if rule is None or ref.lrs is None or run.lrs is None:
        return {"decisions": 0, "mismatches": 0, "ill": 0, "min_margin": None}
    notes: dict[str, Any] = {}
    unresolved = 0
    if isinstance(rule, EpochSignFlips):
        margins = _epoch_flip_margins(ref, rule, steps)
        decided = {t: (_flat(_lr_change_signs(ref, t, "float64")), _flat(_lr_change_signs(run, t, dtype)))
                   for t in margins}
    elif isinstance(rule, HypergradientSigns):
        margins, changes = _hypergradient_margins(ref, rule, steps)
        # a change below a few ulps of the learning rate may round away in this dtype
        unresolved = int(sum(np.sum(c < 4 * eps(dtype)) for c in changes.values()))
        decided = {t: (_flat(_lr_change_signs(ref, t, "float64")), _flat(_lr_change_signs(run, t, dtype)))
                   for t in margins}
    else:
        margins, spec_drops = _angle_drop_margins(ref, rule, steps)
        decided = {t: (_flat(_lr_change_signs(ref, t, "float64"))[:1], _flat(_lr_change_signs(run, t, dtype))[:1])
                   for t in range(1, steps + 1, rule.steps_per_epoch)}  # drops happen at epoch starts
        ref_drops = [t for t, (r, _) in decided.items() if r[0] < 0]
        notes = {"drops": ref_drops, "spec_drops": spec_drops}
        # the latch, where the state exposes it (adaptlr's AutoDrop: signals()["latched"]), per epoch start
        key = next((k for k in (ref.signals[0] if ref.signals else {}) if k.endswith(".latched")), None)
        if key is not None and run.signals and key in run.signals[0]:
            starts = range(1, steps + 1, rule.steps_per_epoch)
            ref_latched = [ref.signals[t - 1][key] for t in starts]
            for t, latched in zip(starts, ref_latched):
                decided[-t] = (np.array([latched]), np.array([run.signals[t - 1][key]]))  # keys < 0: no clash
            notes["latches"] = sum(1 for before, now in itertools.pairwise(ref_latched) if now and not before)
    count = sum(r.size for r, _ in decided.values())
    mismatches = sum(int(np.sum(r != a)) for r, a in decided.values())
    all_margins = np.concatenate(list(margins.values())) if margins else np.zeros(0)
    ill = int(np.sum(all_margins < threshold)) + unresolved
    return {"decisions": count, "mismatches": mismatches, "ill": ill,
            "min_margin": float(np.min(all_margins)) if all_margins.size else None, **notes}


# -- the agreement rows -------------------------------------------------------------------------

PROBE_DELTA = 2.0**-30  # ≫ eps(float64), so the probe's own rounding does not matter; small enough to stay linear


def trajectory_amplification(algorithm: Algorithm, problem: Problem, steps: int, ref: Trajectory) -> float:
    """``A``: how far the NumPy float64 run moves, relative to ``PROBE_DELTA``, when every step's
    gradient is scaled by ``1 ± PROBE_DELTA`` (signs fixed by a seeded generator)."""
    signs = np.random.default_rng(0).choice([-1.0, 1.0], size=steps)

    def grad(xp: Any, params: Any, data: dict, i: Any) -> Any:
        factor = 1.0 + PROBE_DELTA * signs[int(i)]
        return optree.tree_map(lambda g: g * factor, problem.grad(xp, params, data, i))

    probe = replace(problem, grad=grad)
    perturbed = run_trajectory(algorithm.build(), probe, BACKENDS["numpy"], "float64", steps)
    return max_rel_err(perturbed.params, ref.params) / PROBE_DELTA

def _status(row: Row, decisions_ill: int) -> str:
    if row.max_rel_err_params is None or not math.isfinite(row.max_rel_err_params):
        return "fail"
    if decisions_ill:
        return "ill-conditioned"
    ok = row.max_rel_err_params <= row.tolerance and row.decision_mismatches == 0
    if row.max_rel_err_lr is not None:
        ok = ok and row.max_rel_err_lr <= row.tolerance
    return "pass" if ok else "fail"


def selected_problems(algorithm: Algorithm, problems: Sequence[str] | None, all_problems: bool) -> list[str]:
    """The problems an algorithm runs on: the named ones it has, else all or its primary one."""
    if problems is not None:
        return [p for p in algorithm.problems if p in problems]
    return list(algorithm.problems if all_problems else algorithm.problems[:1])


def agreement_pairs(backends: Sequence[str], dtypes: Sequence[str]) -> list[tuple[Backend, str]]:
    """The (backend, dtype) runs of one algorithm and problem: available backends only, and only
    float64 on the non-default devices (which are there to catch device leaks)."""
    return [(BACKENDS[name], dtype) for name in backends if BACKENDS[name].unavailable_reason() is None
            for dtype in dtypes if not (name.endswith("-device1") and dtype != "float64")]


def planned_runs(algorithms: Sequence[str], backends: Sequence[str], dtypes: Sequence[str],
                 problems: Sequence[str] | None = None, all_problems: bool = False) -> int:
    """How many times :func:`run_agreement` calls ``progress`` (one per backend and dtype run)."""
    per_problem = len(agreement_pairs(backends, dtypes))
    return sum(len(selected_problems(ALGORITHMS[n], problems, all_problems)) for n in algorithms) * per_problem


def run_agreement(
    algorithms: Sequence[str],
    backends: Sequence[str],
    dtypes: Sequence[str],
    steps: int,
    progress: Callable[[str], None] = lambda _label: None,
    problems: Sequence[str] | None = None,
    all_problems: bool = False,
) -> list[Row]:
    """Agreement rows for every algorithm × its problems × backend × dtype (see the module docstring).

    Args:
        algorithms, backends, dtypes: registry names.
        steps: K, the number of steps of every run.
        progress: called with a label after each backend and dtype run (also for the runs a
            missing algorithm or a failed reference run skips): :func:`planned_runs` times.
        problems: only these of each algorithm's problems.
        all_problems: every problem of each algorithm (default: only its first, primary one).
    """
    rows: list[Row] = []
    for name in backends:
        b = BACKENDS[name]
        reason = b.unavailable_reason()
        if reason:
            for dtype in dtypes:
                rows.append(Row("backend", "*", "*", name, b.device_name, dtype, steps, status="skipped",
                                reason=reason))
    pairs = agreement_pairs(backends, dtypes)
    reference = BACKENDS["numpy"]
    for alg_name in algorithms:
        algorithm: Algorithm = ALGORITHMS[alg_name]
        missing = algorithm.missing()
        for prob_name in selected_problems(algorithm, problems, all_problems):
            problem = PROBLEMS[prob_name]
            if missing:
                rows.append(Row("agreement", alg_name, prob_name, "*", "*", "*", steps, status="skipped",
                                reason=f"not available: adaptlr.{', adaptlr.'.join(missing)}"))
                for _ in pairs:
                    progress(f"{alg_name}/{prob_name}")
                continue
            try:
                ref = run_trajectory(algorithm.build(), problem, reference, "float64", steps)
            except Exception as error:  # the factory or the reference run itself is broken
                rows.append(Row("agreement", alg_name, prob_name, "numpy", "cpu", "float64", steps, status="fail",
                                reason=f"reference run raised {type(error).__name__}: {error}"))
                for _ in pairs:
                    progress(f"{alg_name}/{prob_name}")
                continue
            amplification = cache(partial(trajectory_amplification, algorithm, problem, steps, ref))
            for b, dtype in pairs:
                rows.append(_agreement_row(algorithm, problem, b, dtype, steps, ref, amplification))
                progress(f"{alg_name}/{prob_name}/{b.name}/{dtype}")
    return rows


def _agreement_row(algorithm: Algorithm, problem: Problem, b: Backend, dtype: str, steps: int,
                   ref: Trajectory, amplification: Callable[[], float] | None = None) -> Row:
    tol = tolerance(dtype, steps, problem.condition * algorithm.condition, algorithm.scalar_condition())
    row = Row("agreement", algorithm.name, problem.name, b.name, b.device_name, dtype, steps, tolerance=tol)
    start = time.perf_counter()
    try:
        run = run_trajectory(algorithm.build(), problem, b, dtype, steps)
    except Exception as error:
        row.status, row.reason = "fail", f"{type(error).__name__}: {error}"
        row.seconds = time.perf_counter() - start
        return row
    row.seconds = time.perf_counter() - start
    row.max_rel_err_params = max_rel_err(run.params, ref.params)
    if run.lrs is not None and ref.lrs is not None:
        row.max_rel_err_lr = max_rel_err(run.lrs, ref.lrs)
    found = compare_decisions(algorithm.decisions, ref, run, dtype, steps, tol)
    row.decisions, row.decision_mismatches = found["decisions"], found["mismatches"]
    row.ill_conditioned_decisions, row.min_margin = found["ill"], found["min_margin"]
    row.extra = {k: v for k, v in found.items() if k in ("drops", "spec_drops", "latches")}
    if "spec_drops" in row.extra and row.extra["drops"] != row.extra["spec_drops"] and b.name == "numpy" \
            and dtype == "float64":
        row.reason = f"note: drops at steps {row.extra['drops']}, the spec's detector on these angles: " \
                     f"{row.extra['spec_drops']}"
    row.status = _status(row, row.ill_conditioned_decisions)
    if row.status == "fail" and math.isfinite(row.max_rel_err_params or math.nan) and amplification is not None:
        # measured only for a row beyond its tolerance: one more NumPy float64 run
        gain = amplification()
        row.extra["amplification"] = gain
        if gain * eps(dtype) > tol:
            row.status = "ill-conditioned"
            row.reason = (f"the trajectory amplifies one rounding of each step's gradient to {gain * eps(dtype):.1e} "
                          f"(amplification {gain:.1e}), beyond the tolerance {tol:.1e}")
    if row.status == "fail" and not row.reason:
        row.reason = _why(row)
    return row


def _why(row: Row) -> str:
    parts = []
    if row.max_rel_err_params is not None and not row.max_rel_err_params <= row.tolerance:
        parts.append("params beyond tolerance")
    if row.max_rel_err_lr is not None and not row.max_rel_err_lr <= row.tolerance:
        parts.append("learning rates beyond tolerance")
    if row.decision_mismatches:
        parts.append(f"{row.decision_mismatches} decisions differ")
    return "; ".join(parts)
