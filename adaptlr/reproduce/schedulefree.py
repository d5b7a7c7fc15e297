"""Schedule-Free AdamW vs AdamW with a tuned cosine schedule, at several training lengths (issue 19).

Claim (Defazio et al. 2024, "The Road Less Scheduled", abstract): Schedule-Free matches or beats a
cosine schedule tuned for the stopping time ``T`` without knowing ``T``. Setup here: the digits data
(an MLP, minibatches of 32) or MNIST-1D (an MLP, minibatches of 128), no weight decay. For each
length ``T`` the cosine baseline is a separate run of AdamW whose schedule (linear warm-up over 5 %
of ``T``, then cosine to 0 at ``T``) knows ``T``, with its peak learning rate tuned per ``T`` on the
grid (best test loss). Schedule-Free AdamW runs once, for the longest ``T``, with one learning rate
from the same grid (the best at the middle length, warm-up 5 % of that length), and is evaluated at
its averaged parameters ``x`` (:func:`adaptlr.schedule_free_eval_params`) after ``T`` steps for
every ``T``.

Computed verdicts (:mod:`.verdict`, paired by seed: the same initialisation and minibatch order), per
``T``: Schedule-Free's test accuracy is at least the tuned cosine run's (non-inferiority, margin 1
point, as ActiveLR's parity claim) and its test loss is lower.
"""

from __future__ import annotations

import math

import array_api_compat
import numpy as np

import adaptlr
from adaptlr.reproduce import models
from adaptlr.reproduce.data import minibatches
from adaptlr.reproduce.harness import Progress, Settings, algorithm, as_model
from adaptlr.reproduce.report import Result, markdown_table, mean_std, pyplot, save
from adaptlr.reproduce.verdict import check

DATASETS = ("digits", "mnist1d")  # the --dataset values this experiment runs on (see cli.supported)
PARITY_POINTS = 1.0  # the accuracy claim's non-inferiority margin, in points


def config(settings: Settings) -> dict:
    mnist1d = settings.dataset == "mnist1d"
    model, batch = ([40, 100, 100, 10], 128) if mnist1d else ([64, 64, 10], 32)
    if settings.quick:
        return {"lengths": [100, 200, 400], "grid": [3e-3, 1e-2], "seeds": settings.seed_count(5, 1),
                "model": [model[0], 32, 10], "batch": batch}
    return {"lengths": [150, 300, 600, 1200, 2400], "grid": [1e-3, 3e-3, 1e-2, 3e-2],
            "seeds": settings.seed_count(5, 1), "model": model, "batch": batch}


def warmup_cosine(peak: float, total: int):
    """``t ↦ α_t``: linear warm-up to ``peak`` over 5 % of ``total`` steps, then cosine to 0 at ``total``."""
    warm = max(1, round(0.05 * total))

    def schedule(t):
        xp = array_api_compat.array_namespace(t)
        rising = peak * t / warm
        progress = xp.clip((t - warm) / max(total - warm, 1), 0.0, 1.0)
        return xp.where(t <= warm, rising, peak * 0.5 * (1.0 + xp.cos(math.pi * progress)))

    return schedule


def _train(opt, data, cfg, backend, seed, steps, progress, eval_at=None) -> dict:
    """Train ``steps`` steps; the test loss and accuracy at the end (Schedule-Free: of ``x``, at each
    step of ``eval_at``)."""
    xp, model = backend.xp, as_model(cfg["model"])
    params = model.init(seed, backend)
    state = opt.init(params)
    rng = np.random.default_rng(1000 + seed)
    x_test, y_test = backend.asarray(data.x_test), data.y_test
    y_test_onehot = models.one_hot(y_test, 10, backend)
    batches: list = []
    results = {}
    for t in range(1, steps + 1):
        if not batches:
            batches = minibatches(len(data.y_train), cfg["batch"], rng)
        idx = batches.pop()
        x = backend.asarray(data.x_train[idx])
        _, grads = model.loss_and_grad(params, x, models.one_hot(data.y_train[idx], 10, backend), xp)
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        if (eval_at is None and t == steps) or (eval_at is not None and t in eval_at):
            evaluated = params if eval_at is None else adaptlr.schedule_free_eval_params(state, params)
            loss = float(backend.to_numpy(model.loss_value(evaluated, x_test, y_test_onehot, xp)))
            results[t] = (loss, models.accuracy(evaluated, x_test, y_test, xp, backend, model))
        if t % 100 == 0:
            progress.update(100)
    return results


def run(settings: Settings) -> Result:
    schedule_free_adamw = algorithm("schedule_free_adamw")
    cfg = config(settings)
    data = settings.load()
    lengths, grid, seeds = cfg["lengths"], cfg["grid"], cfg["seeds"]
    middle, longest = lengths[len(lengths) // 2], lengths[-1]
    total = seeds * len(grid) * (sum(lengths) + middle) + seeds * longest
    progress = Progress(total, "schedulefree", settings.progress)

    # cosine: one run per (T, peak lr, seed)
    cosine = {(T, lr): [_train(adaptlr.adamw(warmup_cosine(lr, T), weight_decay=0.0), data, cfg, settings.backend,
                               s, T, progress)[T] for s in range(seeds)] for T in lengths for lr in grid}
    best_cosine = {T: min(grid, key=lambda lr, T=T: np.mean([r[0] for r in cosine[(T, lr)]])) for T in lengths}

    # Schedule-Free: its learning rate tuned once, at the middle length
    warmup = max(1, round(0.05 * middle))

    def sf(lr):
        return schedule_free_adamw(lr, warmup_steps=warmup)

    pilot = {lr: [_train(sf(lr), data, cfg, settings.backend, s, middle, progress, {middle})[middle]
                  for s in range(seeds)] for lr in grid}
    sf_lr = min(grid, key=lambda lr: np.mean([r[0] for r in pilot[lr]]))
    sf_runs = [_train(sf(sf_lr), data, cfg, settings.backend, s, longest, progress, set(lengths)) for s in range(seeds)]
    progress.close()

    rows, checks, cos_curve, sf_curve, lower_loss, higher_acc = [], [], [], [], 0, 0
    for T in lengths:
        c = [r[0] for r in cosine[(T, best_cosine[T])]]
        s_ = [run_[T][0] for run_ in sf_runs]
        ca = [100 * r[1] for r in cosine[(T, best_cosine[T])]]
        sa = [100 * run_[T][1] for run_ in sf_runs]
        checks += [
            check(f"T = {T}: Schedule-Free's test acc % at least the tuned cosine's (margin {PARITY_POINTS:g} point)",
                  "Schedule-Free", sa, "cosine", ca, higher=True, margin=PARITY_POINTS),
            check(f"T = {T}: Schedule-Free's test loss lower than the tuned cosine's", "Schedule-Free", s_,
                  "cosine", c, higher=False, digits=4),
        ]
        lower_loss += int(np.mean(s_) < np.mean(c))
        higher_acc += int(np.mean(sa) > np.mean(ca))
        cos_curve.append(np.mean(c))
        sf_curve.append(np.mean(s_))
        rows.append([T, f"{best_cosine[T]:g}", mean_std(c, digits=4), mean_std(ca, digits=1),
                     mean_std(s_, digits=4), mean_std(sa, digits=1)])
    table = markdown_table(["steps T", "cosine peak lr (tuned for T)", "cosine test loss", "cosine test acc %",
                            f"Schedule-Free test loss (one run, lr {sf_lr:g})", "Schedule-Free test acc %"], rows)
    findings = [
        f"Schedule-Free AdamW: lr {sf_lr:g} tuned once at T = {middle}, one run evaluated at every T; AdamW + "
        "cosine: a run per T with its peak lr tuned for that T",
        f"means only: Schedule-Free's test loss is lower at {lower_loss} of {len(lengths)} lengths and its test "
        f"accuracy higher at {higher_acc} of {len(lengths)}",
        "grid of peak learning rates: " + ", ".join(f"{lr:g}" for lr in grid)
        + "; cosine's best per T: " + ", ".join(f"T={T}: {best_cosine[T]:g}" for T in lengths),
    ]

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(lengths, cos_curve, "o-", label="AdamW + cosine, tuned for each T (a run per T)")
    ax.plot(lengths, sf_curve, "s-", label=f"Schedule-Free AdamW, one run (lr {sf_lr:g}), x at T")
    ax.set_xscale("log")
    ax.set_xlabel("training steps T")
    ax.set_ylabel("test cross-entropy")
    ax.legend(fontsize=7)
    plot = save(fig, settings.out, settings.tag("schedulefree_lengths"))

    setup = (f"{as_model(cfg['model']).describe()} on {data.describe()}, batch {cfg['batch']}, no weight decay, "
             f"{seeds} seed(s), "
             f"backend {settings.backend.name}. Cosine: linear warm-up over 5 % of T, then cosine to 0 at T, peak "
             f"tuned per T. Schedule-Free: warm-up {warmup} steps, evaluated at its averaged parameters x.")
    return Result(settings.tag("schedulefree"),
                  f"Schedule-Free AdamW vs a tuned cosine schedule (Defazio et al. 2024) — {data.title}", setup,
                  table, findings, [plot], {"cosine": cosine, "schedule_free": sf_runs, "sf_lr": sf_lr}, checks)
