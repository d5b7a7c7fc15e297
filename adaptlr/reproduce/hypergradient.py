"""Hypergradient descent (spec §4): SGD, SGDN, Adam vs their HD versions from α_0 = 1e-3 and α_0 = 0.

Claim (Baydin et al. 2018; spec §7): the learning rate rises quickly (30–50× in tens of iterations on
MNIST logistic regression) and then decays; the HD variants reach a lower training loss than their
base at the same α_0; Adam-HD barely moves with β = 1e-7. Setup here: softmax regression (and, in the
full run, an MLP 64-64-10 on digits, batch 32, or the small 1-D CNN on MNIST-1D, batch 64), the
paper's hyper-learning rates (β = 1e-3 for SGD/SGDN, 1e-7 for Adam).

Computed verdicts (:mod:`.verdict`, paired by seed), per model and base: from α_0 = 1e-3 the peak α
exceeds α_0 (rise) and the final α is below half the peak (decay, as the paper's 0.047 → 0.0021);
from both α_0 the HD variant's final training loss is lower than its base's.
"""

from __future__ import annotations

import numpy as np

import adaptlr
from adaptlr.reproduce.cnn import CNN1d
from adaptlr.reproduce.harness import Progress, Settings, algorithm, as_model, train
from adaptlr.reproduce.report import Result, markdown_table, mean_std, pyplot, save
from adaptlr.reproduce.verdict import check

DATASETS = ("digits", "mnist1d")  # the --dataset values this experiment runs on (see cli.supported)

BASES = {
    "SGD": (lambda lr: adaptlr.sgd(lr), 1e-3),
    "SGDN": (lambda lr: adaptlr.sgd(lr, momentum=0.9, nesterov=True), 1e-3),
    "Adam": (lambda lr: adaptlr.adam(lr), 1e-7),
}
ALPHAS = (1e-3, 0.0)
DECAY = 0.5  # "then decays": the final α below this fraction of its peak


def config(settings: Settings) -> dict:
    if settings.dataset == "mnist1d":
        if settings.quick:
            return {"models": {"logreg": [40, 10]}, "epochs": 3, "seeds": settings.seed_count(5, 1), "batch": 64}
        return {"models": {"logreg": [40, 10], "cnn": CNN1d(channels=(16, 16, 16))}, "epochs": 12,
                "seeds": settings.seed_count(5, 1), "batch": 64}
    if settings.quick:
        return {"models": {"logreg": [64, 10]}, "epochs": 4, "seeds": settings.seed_count(5, 1), "batch": 32}
    return {"models": {"logreg": [64, 10], "mlp": [64, 64, 10]}, "epochs": 30, "seeds": settings.seed_count(5, 1),
            "batch": 32}


def run(settings: Settings) -> Result:
    cfg = config(settings)
    hypergradient = algorithm("hypergradient")
    data = settings.load()
    batch = cfg["batch"]
    steps = data.x_train.shape[0] // batch
    runs = [(m, b, a, hd) for m in cfg["models"] for b in BASES for a in ALPHAS for hd in (False, True)]
    progress = Progress(len(runs) * cfg["seeds"] * cfg["epochs"] * steps, "hypergradient", settings.progress)
    logs: dict[tuple, list] = {}
    for model, base, alpha, hd in runs:
        make, beta = BASES[base]
        for seed in range(cfg["seeds"]):
            opt = hypergradient(make(alpha), beta) if hd else make(alpha)
            log = train(opt, data, cfg["models"][model], backend=settings.backend, seed=seed, epochs=cfg["epochs"],
                        batch_size=batch, progress=progress, log_lr=hd)
            logs.setdefault((model, base, alpha, hd), []).append(log)
    progress.close()

    rows, findings = [], []
    for model, base, alpha, hd in runs:
        group = logs[(model, base, alpha, hd)]
        name = f"{base}-HD" if hd else base
        peak = peak_step = final_lr = "—"
        if hd:
            lrs = np.mean([lg.step_lr for lg in group], axis=0)
            peak, peak_step, final_lr = f"{lrs.max():.3g}", str(int(lrs.argmax()) + 1), f"{lrs[-1]:.3g}"
        rows.append([model, name, f"{alpha:g}",
                     mean_std([lg.final_train_loss for lg in group], digits=3),
                     mean_std([lg.epoch_test_loss[-1] for lg in group], digits=3),
                     mean_std([lg.final_test_acc for lg in group], 100),
                     peak, peak_step, final_lr])
    table = markdown_table(["model", "optimizer", "α_0", "train loss", "test loss", "test acc %", "peak α",
                            "peak at step", "final α"], rows)

    checks = []
    for model in cfg["models"]:
        for base in BASES:
            hd = logs[(model, base, ALPHAS[0], True)]
            peaks = np.asarray([max(lg.step_lr) for lg in hd])
            finals = np.asarray([lg.step_lr[-1] for lg in hd])
            checks.append(check(f"{model} {base}-HD from α_0 = {ALPHAS[0]:g}: α rises (peak α / α_0)", "peak/α_0",
                                peaks / ALPHAS[0], "1", 1.0, higher=True))
            checks.append(check(f"{model} {base}-HD: α then decays (final α / peak α below {DECAY:g})",
                                "final/peak", finals / peaks, f"{DECAY:g}", DECAY, higher=False))
            for alpha in ALPHAS:
                checks.append(check(
                    f"{model} {base}-HD from α_0 = {alpha:g}: lower final train loss than {base}", f"{base}-HD",
                    [lg.final_train_loss for lg in logs[(model, base, alpha, True)]], base,
                    [lg.final_train_loss for lg in logs[(model, base, alpha, False)]], higher=False, digits=4))
        for base in BASES:
            for alpha in ALPHAS:
                hd = logs[(model, base, alpha, True)]
                plain = logs[(model, base, alpha, False)]
                loss_hd = float(np.mean([lg.final_train_loss for lg in hd]))
                loss_base = float(np.mean([lg.final_train_loss for lg in plain]))
                lrs = np.mean([lg.step_lr for lg in hd], axis=0)
                k = int(lrs.argmax())
                rise = (f"α rises to {lrs[k]:.3g} at step {k + 1} ({lrs[k] / alpha:.3g}× α_0)" if alpha
                        else f"α rises from 0 to {lrs[k]:.3g} at step {k + 1}")
                after = f"decays to {lrs[-1]:.3g}" if lrs[-1] < 0.9 * lrs[k] else f"stays near it ({lrs[-1]:.3g})"
                findings.append(
                    f"{model} {base}-HD from α_0 = {alpha:g}: {rise}, then "
                    f"{after}"
                    f"; final train loss {loss_hd:.4f} vs base {loss_base:.4f} "
                    f"({'lower' if loss_hd < loss_base else 'NOT lower'})")

    plt = pyplot()
    plots = []
    for model in cfg["models"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
        for base in BASES:
            for alpha, style in zip(ALPHAS, ("-", ":")):
                lrs = np.mean([lg.step_lr for lg in logs[(model, base, alpha, True)]], axis=0)
                axes[0].plot(np.arange(1, len(lrs) + 1), lrs, style, label=f"{base}-HD α_0={alpha:g}")
                for hd in (False, True):
                    curve = np.mean([lg.epoch_train_loss for lg in logs[(model, base, alpha, hd)]], axis=0)
                    axes[1].plot(np.arange(1, len(curve) + 1), curve, style, marker="o" if hd else None,
                                 markersize=3, label=f"{base}{'-HD' if hd else ''} α_0={alpha:g}")
        axes[0].set_xscale("log")
        axes[0].set_yscale("symlog", linthresh=1e-4)
        axes[0].set_xlabel("iteration")
        axes[0].set_ylabel("learning rate α_t")
        axes[1].set_yscale("log")
        axes[1].set_xlabel("epoch")
        axes[1].set_ylabel("training loss (full batch)")
        axes[0].legend(fontsize=6)
        axes[1].legend(fontsize=5, ncol=2)
        fig.suptitle(f"hypergradient descent, {model}")
        plots.append(save(fig, settings.out, settings.tag(f"hypergradient_{model}")))

    setup = (f"Models {', '.join(f'{m}: {as_model(s).describe()}' for m, s in cfg['models'].items())} on "
             f"{data.describe()}, "
             f"batch {batch} ({steps} steps per epoch), {cfg['epochs']} epochs, β = 1e-3 (SGD, SGDN μ=0.9) and "
             f"1e-7 (Adam), additive global HD; mean ± std over {cfg['seeds']} seed(s); backend "
             f"{settings.backend.name}.")
    return Result(settings.tag("hypergradient"), f"Hypergradient descent — {data.title} (spec §4)", setup, table,
                  findings, plots, {"logs": logs}, checks)
