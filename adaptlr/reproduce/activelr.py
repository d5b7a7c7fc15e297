"""ActiveLR (spec §2): final test accuracy across base learning rates, base vs Active variant.

Claim (Wadi et al. 2023; spec §7 table): with ``increase=2, decrease=0.5`` and no schedule, the
Active variant's final accuracy varies much less across learning rates than its base's, and is far
better at the smallest learning rates (parity at the best one, slightly worse at large ones).
Setup here: an MLP 64-64-10 on digits (batch 32) or 40-100-100-10 on MNIST-1D (batch 128), weight
decay 0, learning rates 1e-5 … 1e-1.

Computed verdicts per base (:mod:`.verdict`, paired by seed): the spread of the final accuracy across
the learning rates (max − min over them, per seed) is smaller with Active; Active is better at the
smallest learning rate; at the base's best learning rate Active is not worse by more than 1 point.
"""

from __future__ import annotations

import numpy as np

import adaptlr
from adaptlr.reproduce.harness import Progress, Settings, algorithm, as_model, train
from adaptlr.reproduce.report import Result, markdown_table, mean_std, pyplot, save
from adaptlr.reproduce.verdict import check

DATASETS = ("digits", "mnist1d")  # the --dataset values this experiment runs on (see cli.supported)

INCREASE, DECREASE = 2.0, 0.5
PARITY_MARGIN = 1.0  # points of accuracy: "parity at the best learning rate"
BASES = {
    "AdamW": (lambda lr: adaptlr.adamw(lr, weight_decay=0.0), "active_adamw"),
    "RAdam": (lambda lr: adaptlr.radam(lr), "active_radam"),
    "AdaBelief": (lambda lr: adaptlr.adabelief(lr), "active_adabelief"),
    "SGDM": (lambda lr: adaptlr.sgd(lr, momentum=0.9), "active_sgd"),
}


def config(settings: Settings) -> dict:
    if settings.dataset == "mnist1d":
        if settings.quick:
            return {"lrs": [1e-5, 1e-3, 1e-1], "epochs": 4, "seeds": settings.seed_count(5, 1), "model": [40, 32, 10],
                    "batch": 128}
        return {"lrs": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "epochs": 20, "seeds": settings.seed_count(5, 1),
                "model": [40, 100, 100, 10], "batch": 128}
    if settings.quick:
        return {"lrs": [1e-5, 1e-3, 1e-1], "epochs": 6, "seeds": settings.seed_count(5, 1), "model": [64, 32, 10],
                "batch": 32}
    return {"lrs": [1e-5, 1e-4, 1e-3, 1e-2, 1e-1], "epochs": 30, "seeds": settings.seed_count(5, 1),
            "model": [64, 64, 10], "batch": 32}


def run(settings: Settings) -> Result:
    cfg = config(settings)
    active = algorithm("active")
    data = settings.load()
    batch = cfg["batch"]
    steps = data.x_train.shape[0] // batch
    names = [n for base in BASES for n in (base, f"Active {base}")]
    total = len(names) * len(cfg["lrs"]) * cfg["seeds"] * cfg["epochs"] * steps
    progress = Progress(total, "activelr", settings.progress)
    acc: dict[tuple[str, float], list[float]] = {}
    for base, (make, _) in BASES.items():
        for lr in cfg["lrs"]:
            for seed in range(cfg["seeds"]):
                for name, opt in ((base, make(lr)),
                                  (f"Active {base}", active(make(lr), steps, increase=INCREASE, decrease=DECREASE))):
                    log = train(opt, data, cfg["model"], backend=settings.backend, seed=seed, epochs=cfg["epochs"],
                                batch_size=batch, progress=progress)
                    acc.setdefault((name, lr), []).append(log.final_test_acc)
    progress.close()

    means = {k: float(np.mean(v)) * 100 for k, v in acc.items()}
    rows = [[f"{lr:g}"] + [mean_std(acc[(n, lr)], 100) for n in names] for lr in cfg["lrs"]]
    spread = {n: max(means[(n, lr)] for lr in cfg["lrs"]) - min(means[(n, lr)] for lr in cfg["lrs"]) for n in names}
    rows.append(["spread (max − min)", *(f"{spread[n]:.1f}" for n in names)])
    table = markdown_table(["base lr", *names], rows)

    findings, checks, smallest = [], [], cfg["lrs"][0]
    for base in BASES:
        act = f"Active {base}"
        per_seed = {n: np.asarray([acc[(n, lr)] for lr in cfg["lrs"]]) * 100 for n in (base, act)}  # (lrs, seeds)
        best = max(cfg["lrs"], key=lambda lr: means[(base, lr)])
        checks += [
            check(f"{base}: Active's accuracy varies less across the learning rates (spread, points)",
                  act, per_seed[act].max(0) - per_seed[act].min(0), base,
                  per_seed[base].max(0) - per_seed[base].min(0), higher=False, digits=1),
            check(f"{base}: Active is better at lr {smallest:g} (test acc %)", act, per_seed[act][0], base,
                  per_seed[base][0], higher=True, digits=1),
            check(f"{base}: Active at parity at the base's best lr {best:g} (test acc %, margin "
                  f"{PARITY_MARGIN:g})", act, np.asarray(acc[(act, best)]) * 100, base,
                  np.asarray(acc[(base, best)]) * 100, higher=True, margin=PARITY_MARGIN, digits=1),
        ]
        gain = means[(act, smallest)] - means[(base, smallest)]
        findings.append(
            f"{base}: spread across learning rates {spread[base]:.1f} points, Active {spread[act]:.1f} "
            f"({'smaller' if spread[act] < spread[base] else 'NOT smaller'}); at lr {smallest:g} Active − base = "
            f"{gain:+.1f} points; at the base's best lr Active − base = "
            f"{_at_best(means, base, act, cfg['lrs']):+.1f} points")

    plt = pyplot()
    fig, axes = plt.subplots(1, len(BASES), figsize=(12, 3.2), sharey=True)
    for ax, base in zip(axes, BASES):
        for name, style in ((base, "o--"), (f"Active {base}", "s-")):
            m = [np.mean(acc[(name, lr)]) * 100 for lr in cfg["lrs"]]
            s = [np.std(acc[(name, lr)]) * 100 for lr in cfg["lrs"]]
            ax.errorbar(cfg["lrs"], m, yerr=s, fmt=style, label=name, capsize=2)
        ax.set_xscale("log")
        ax.set_xlabel("base learning rate")
        ax.set_title(base)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("final test accuracy %")
    plot = save(fig, settings.out, settings.tag("activelr_accuracy_vs_lr"))

    setup = (f"{as_model(cfg['model']).describe()} on {data.describe()}, batch {batch} "
             f"({steps} steps per epoch), {cfg['epochs']} epochs, no schedule, weight decay 0, "
             f"increase={INCREASE:g}, decrease={DECREASE:g}; final test accuracy %, mean ± std over "
             f"{cfg['seeds']} seed(s); backend {settings.backend.name}.")
    return Result(settings.tag("activelr"), f"ActiveLR: accuracy across learning rates — {data.title} (spec §2)", setup,
                  table, findings, [plot], {"means": means, "spread": spread}, checks)


def _at_best(means: dict, base: str, act: str, lrs: list[float]) -> float:
    best = max(lrs, key=lambda lr: means[(base, lr)])
    return means[(act, best)] - means[(base, best)]
