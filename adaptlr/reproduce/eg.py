"""EG step-size adaptation (spec §6) on a stream whose distribution shifts abruptly.

Claim (Amid et al. 2022, abstract; spec §7): the step-size scale ``s`` rises within a few hundred
steps after a shift of the data distribution and the loss recovers faster than the base optimizer's.
Setup here: the digits training images (or MNIST-1D's training sequences) with their features shuffled
by a new fixed permutation every K steps (task 0 unpermuted), minibatches of 32 drawn with replacement,
an MLP (64-64-10 on digits, 40-100-100-10 on MNIST-1D) trained online;
the loss is the loss of each minibatch before the step (prequential). EG wraps SGD-momentum at
α = 0.01 with γ_s = γ_p = 1; the bases are SGD-momentum at the same α and at α = 0.1 (the best of
0.01/0.05/0.1 in a pilot run).

Computed verdicts (:mod:`.verdict`, paired by seed): EG's mean loss over the first 100 steps after a
shift is lower than each base's (faster recovery), and its scale s 100 steps after a shift is above s
just before it (s rises).
"""

from __future__ import annotations

import numpy as np

import adaptlr
from adaptlr._tree import Layout
from adaptlr.reproduce import models
from adaptlr.reproduce.data import permuted_stream
from adaptlr.reproduce.harness import Progress, Settings, algorithm, as_model
from adaptlr.reproduce.report import Result, markdown_table, mean_std, pyplot, save, smooth
from adaptlr.reproduce.verdict import check

DATASETS = ("digits", "mnist1d")  # the --dataset values this experiment runs on (see cli.supported)

WINDOW, EARLY = 20, 100


def config(settings: Settings) -> dict:
    """``threshold``: the loss level whose crossing counts as recovered (MNIST-1D is harder than digits)."""
    if settings.dataset == "mnist1d":
        if settings.quick:
            return {"shift_every": 200, "tasks": 3, "seeds": settings.seed_count(5, 1), "sizes": [40, 32, 10],
                    "threshold": 1.5}
        return {"shift_every": 500, "tasks": 6, "seeds": settings.seed_count(5, 1), "sizes": [40, 100, 100, 10],
                "threshold": 1.5}
    if settings.quick:
        return {"shift_every": 200, "tasks": 3, "seeds": settings.seed_count(5, 1), "sizes": [64, 32, 10],
                "threshold": 0.5}
    return {"shift_every": 500, "tasks": 6, "seeds": settings.seed_count(5, 1), "sizes": [64, 64, 10],
            "threshold": 0.5}


def variants() -> dict:
    eg_step_size = algorithm("eg_step_size")
    return {
        "SGDM α=0.01": adaptlr.sgd(0.01, momentum=0.9),
        "SGDM α=0.1": adaptlr.sgd(0.1, momentum=0.9),
        "EG(SGDM α=0.01) γ_s=γ_p=1": eg_step_size(adaptlr.sgd(0.01, momentum=0.9), scale_lr=1.0, gain_lr=1.0),
    }


def stream_run(opt, data, cfg, backend, seed, progress) -> tuple[np.ndarray, np.ndarray]:
    """Per-step (loss before the step, global scale s or NaN) over the whole stream."""
    xp = backend.xp
    model = as_model(cfg["sizes"])
    params = model.init(seed, backend)
    state = opt.init(params)
    layout, _ = Layout.of(params)
    steps = cfg["shift_every"] * cfg["tasks"]
    losses, scales = np.empty(steps), np.full(steps, np.nan)
    for t, (x, y, _) in enumerate(permuted_stream(data.x_train, data.y_train, 32, steps, cfg["shift_every"], seed)):
        loss, grads = model.loss_and_grad(params, backend.asarray(x), models.one_hot(y, 10, backend), xp)
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        losses[t] = float(backend.to_numpy(loss))
        if state.adaptations:
            scales[t] = float(np.mean(backend.to_numpy(state.adaptations[-1].signals(layout)["scale"])))
        if (t + 1) % 100 == 0:
            progress.update(100)
    return losses, scales


def recovery_steps(losses: np.ndarray, start: int, length: int, threshold: float) -> float:
    """Steps after ``start`` until the trailing mean loss (window 20) falls below ``threshold`` (``length``: never)."""
    curve = smooth(losses[start : start + length], WINDOW)
    below = np.flatnonzero(curve[WINDOW - 1 :] < threshold)
    return float(below[0] + WINDOW) if len(below) else float(length)


def run(settings: Settings) -> Result:
    cfg = config(settings)
    opts = variants()
    data = settings.load()
    k, tasks, threshold = cfg["shift_every"], cfg["tasks"], cfg["threshold"]
    progress = Progress(len(opts) * cfg["seeds"] * k * tasks, "eg", settings.progress)
    runs = {name: [stream_run(opt, data, cfg, settings.backend, seed, progress) for seed in range(cfg["seeds"])]
            for name, opt in opts.items()}
    progress.close()

    rows, summary, early_per_seed, rises = [], {}, {}, None
    for name, group in runs.items():
        early = [np.mean([l_[j * k : j * k + EARLY].mean() for j in range(1, tasks)]) for l_, _ in group]
        late = [np.mean([l_[(j + 1) * k - EARLY : (j + 1) * k].mean() for j in range(1, tasks)]) for l_, _ in group]
        rec = [np.mean([recovery_steps(l_, j * k, k, threshold) for j in range(1, tasks)]) for l_, _ in group]
        early_per_seed[name] = early
        rise = "—"
        if not np.isnan(group[0][1][0]):
            ratios = [np.mean([s[j * k + EARLY - 1] / s[j * k - 1] for j in range(1, tasks)]) for _, s in group]
            rise = mean_std(ratios, digits=2) + "×"
            rises = ratios
        summary[name] = (np.mean(early), np.mean(rec))
        rows.append([name, mean_std(early, digits=3), mean_std(rec, digits=0), mean_std(late, digits=3), rise])
    table = markdown_table(["optimizer", f"loss, first {EARLY} steps after a shift",
                            f"steps until loss < {threshold:g} (window {WINDOW}; {k}: never)",
                            f"loss, last {EARLY} steps of a task",
                            f"s({EARLY} steps after shift) / s(before)"], rows)
    names = list(runs)
    eg_name = names[-1]
    findings = [
        f"{eg_name}: loss in the first {EARLY} steps after a shift {summary[eg_name][0]:.3f} vs "
        f"{n} {summary[n][0]:.3f} ({'faster' if summary[eg_name][0] < summary[n][0] else 'NOT faster'} recovery); "
        f"steps to loss < {threshold:g}: {summary[eg_name][1]:.0f} vs {summary[n][1]:.0f}"
        for n in names[:-1]
    ]
    checks = [check(f"EG recovers faster than {n} (loss, first {EARLY} steps after a shift)", "EG",
                    early_per_seed[eg_name], n, early_per_seed[n], higher=False, digits=3) for n in names[:-1]]
    if rises is not None:
        checks.append(check(f"EG's scale s rises after a shift (s {EARLY} steps after / s before)", "ratio", rises,
                            "1", 1.0, higher=True))
    s = np.nanmean([sc for _, sc in runs[eg_name]], axis=0)
    findings.append("EG scale s at each shift and 100 / 300 steps later: " + "; ".join(
        f"{s[max(j * k - 1, 0)]:.2f} → {s[j * k + EARLY - 1]:.2f} / {s[min(j * k + 299, (j + 1) * k - 1)]:.2f}"
        for j in range(1, tasks)))
    falls = int(np.sum(np.diff(s) < -0.01 * s[:-1]))
    findings.append(f"EG scale s fell by more than 1 % in one step {falls} time(s) over the stream "
                    f"(final s = {s[-1]:.2f}): {'it ratchets up' if falls == 0 else 'it also comes down'}")

    plt = pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(10, 5), sharex=True)
    steps_axis = np.arange(1, k * tasks + 1)
    for name in names:
        mean_loss = np.mean([l_ for l_, _ in runs[name]], axis=0)
        axes[0].plot(steps_axis, smooth(mean_loss, WINDOW), lw=1, label=name)
    axes[1].plot(steps_axis, s, color="C2", label="EG global scale s")
    for j in range(1, tasks):
        for ax in axes:
            ax.axvline(j * k, color="grey", ls=":", lw=0.8)
    axes[0].set_ylabel(f"minibatch loss (mean of {WINDOW})")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("s")
    axes[1].set_xlabel("step (dotted: a new pixel permutation)")
    axes[0].legend(fontsize=7)
    axes[1].legend(fontsize=7)
    plot = save(fig, settings.out, settings.tag("eg_shift_stream"))

    setup = (f"Permuted-feature stream of {data.describe()}, a new permutation every {k} steps, {tasks} tasks, "
             f"batch 32, {as_model(cfg['sizes']).describe()} trained online (loss measured before each step); "
             "averages over "
             f"the {tasks - 1} shifts and {cfg['seeds']} seed(s); backend {settings.backend.name}.")
    return Result(settings.tag("eg"), f"EG step-size adaptation under distribution shift — {data.title} (spec §6)",
                  setup, table, findings, [plot], {"runs": runs}, checks)
