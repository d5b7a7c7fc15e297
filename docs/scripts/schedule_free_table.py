"""Print the Schedule-Free and Mechanic tables of docs/algorithms/lr_free.md: adaptlr vs the upstreams,
and the upstreams against each other (PyTorch ``schedulefree`` vs ``optax.contrib`` vs Keras 3;
``mechanic_pytorch.mechanize`` vs ``optax.contrib.mechanize``).

Same problem as the other upstream rows (:mod:`adaptlr.conformance.upstream`: float64, 200 steps,
shapes (3, 4), (5,), (2, 3, 2), (), (7,), noisy gradients). Errors are the maximum over steps and
tensors of the normwise relative error of the training parameters ``y``, and the relative error of
the evaluation parameters ``x`` after the last step (upstream PyTorch: ``y.lerp(z, 1 - 1/β1)`` as its
``eval()``, the reference versions' ``state["x"]``; optax: ``schedule_free_eval_params``; Keras, which
has no eval view: ``(y - (1-β1)·z)/β1`` from its ``z`` variables).

Usage: ``python docs/scripts/schedule_free_table.py`` (needs torch, jax, optax, keras,
array-api-strict, schedulefree==1.4.1, mechanic-pytorch==0.0.1: ``pip install -e ".[test,all]"``). Mechanic's
rows use the problem with gradient noise 3 (as its upstream rows).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np

from adaptlr.conformance.backends import enable_jax_x64
from adaptlr.conformance.runner import max_rel_err
from adaptlr.conformance.upstream import (
    CASES,
    STEPS,
    TABLE_COLUMNS,
    UpstreamCase,
    agreement_table,
    optax_run,
    problem,
    reference,
)

COLUMNS = list(TABLE_COLUMNS)
WRAPPERS = ("schedule_free", "mechanic")  # this table's algorithms; lr_free_table.py has the others


def _keras(kw: dict, init: list, grad, steps: int = STEPS) -> tuple[list, np.ndarray]:
    """Keras 3's ``ScheduleFreeAdamW`` in float64: ``y`` after each step and the final ``x``."""
    import keras

    keras.config.set_floatx("float64")
    variables = [keras.Variable(p, dtype="float64") for p in init]
    opt = keras.optimizers.ScheduleFreeAdamW(
        learning_rate=kw.get("learning_rate", 0.0025), beta_1=kw.get("b1", 0.9), beta_2=kw.get("b2", 0.999),
        epsilon=kw.get("eps", 1e-8), warmup_steps=kw.get("warmup_steps", 0), weight_decay=kw.get("weight_decay"))
    opt.build(variables)
    trajectory = []
    for t in range(steps):
        grads = grad([np.asarray(v.value) for v in variables], t)
        opt.apply_gradients([(keras.ops.convert_to_tensor(g), v) for g, v in zip(grads, variables)])
        trajectory.append([np.asarray(v.value).copy() for v in variables])
    b1 = kw.get("b1", 0.9)
    zs = [np.asarray(opt._momentums[opt._get_variable_index(v)].value) for v in variables]
    x = np.concatenate([np.ravel((y - (1 - b1) * z) / b1) for y, z in zip(trajectory[-1], zs)])
    return trajectory, x


def _side(case, init, grad) -> tuple[list, np.ndarray]:
    if case.upstream == "keras.ScheduleFreeAdamW":
        return _keras(case.kwargs, init, grad)
    trajectory, xs = reference(case, init, grad)
    return trajectory, xs[-1]


def _sf(upstream: str, label: str, kw: dict | None = None) -> UpstreamCase:
    return UpstreamCase("schedule_free_adamw", upstream, label, kw or {})


TORCH, OPTAX, KERAS = "schedulefree.AdamWScheduleFree", "optax.contrib.schedule_free_adamw", "keras.ScheduleFreeAdamW"
W20, WD = {"warmup_steps": 20}, {"weight_decay": 0.1}

# (one upstream, another, the formula difference between them)
PAIRS = [
    (_sf(TORCH, "AdamWScheduleFree()"), _sf(OPTAX, "schedule_free_adamw()"), "same algorithm"),
    (_sf(TORCH, "AdamWScheduleFree(weight_decay=0.1)", WD), _sf(OPTAX, "schedule_free_adamw(weight_decay=0.1)", WD),
     "same algorithm (decay at y, times the warmed-up rate, inside z's step)"),
    (_sf(TORCH, "AdamWScheduleFree(warmup_steps=20)", W20), _sf(OPTAX, "schedule_free_adamw(warmup_steps=20)", W20),
     "warm-up off by one step: optax's inner schedule counts from 0 (first step lr 0), its averaging weight from 1; "
     "schedulefree uses t/W for both"),
    (_sf(TORCH, "AdamWScheduleFree(r=1.0)", {"r": 1.0}), _sf(OPTAX, "schedule_free_adamw()"),
     "optax has no r (weights t^r·lr_max^p: r = 0 only)"),
    (UpstreamCase("schedule_free_sgd", "schedulefree.SGDScheduleFree", "SGDScheduleFree(lr=0.1, weight_decay=0.05)",
                  {"learning_rate": 0.1, "weight_decay": 0.05}),
     UpstreamCase("schedule_free_sgd", "optax.contrib.schedule_free_sgd", "schedule_free_sgd(0.1, weight_decay=0.05)",
                  {"learning_rate": 0.1, "weight_decay": 0.05}), "same algorithm"),
    (_sf(TORCH, "AdamWScheduleFree()"), _sf(KERAS, "ScheduleFreeAdamW()"),
     "same algorithm: a constant lr makes lr_max^2-weighting uniform, c_t = 1/t as Keras"),
    (_sf(TORCH, "AdamWScheduleFree(warmup_steps=20)", W20), _sf(KERAS, "ScheduleFreeAdamW(warmup_steps=20)", W20),
     "Keras averages uniformly (c_t = 1/t) during warm-up too; schedulefree weights step t by lr_t^2 "
     "(weight_lr_power=2), so the small warm-up steps count less"),
    (_sf(TORCH, "AdamWScheduleFree(warmup_steps=20, weight_lr_power=0)", {**W20, "weight_lr_power": 0.0}),
     _sf(KERAS, "ScheduleFreeAdamW(warmup_steps=20)", W20), "same algorithm (weight_lr_power=0 is 1/t)"),
    (_sf(TORCH, "AdamWScheduleFree(weight_decay=0.1)", WD), _sf(KERAS, "ScheduleFreeAdamW(weight_decay=0.1)", WD),
     "Keras decays y itself before the step (y ← y - lr·λ·y, z untouched); schedulefree puts λ·y into z's step"),
]


def _optax_mechanize(inner: str, lr: float, **kw) -> tuple[list, list]:
    import optax

    base = optax.sgd(lr) if inner == "sgd" else optax.adamw(lr, weight_decay=0.01)
    init, grad = problem(noise=3.0)
    return optax_run(optax.contrib.mechanize(base, **kw), lambda st: float(np.sum(st.s)), init, grad, STEPS)


def _torch_mechanize(inner: str, lr: float, **kw) -> tuple[list, list]:
    init, grad = problem(noise=3.0)
    return reference(UpstreamCase("mechanic", "mechanic_pytorch.mechanize", "",
                                  {"inner": (inner, {"learning_rate": lr}), **kw}), init, grad)


# (PyTorch call, its run, optax call, its run, the formula difference)
MECHANIC_PAIRS = [
    ("mechanize(SGD)(lr=0.1)", lambda: _torch_mechanize("sgd", 0.1),
     "mechanize(sgd(0.1))", lambda: _optax_mechanize("sgd", 0.1),
     "own defaults: s_init 1e-8 vs 1e-6, and the variant differences below"),
    ("mechanize(SGD)(lr=0.1)", lambda: _torch_mechanize("sgd", 0.1),
     "mechanize(sgd(0.1), s_init=1e-8)", lambda: _optax_mechanize("sgd", 0.1, s_init=1e-8),
     "optax: s starts at s_init (torch: 0), m at 0 with m = max(β·m, \\|h\\| + ε) (torch: 1e-6, \\|h\\|), h clipped to "
     "[-m, m], decay term at x_{t-1} (torch: after the inner step), no max(Σs, 0)"),
    ("mechanize(AdamW)(lr=0.01)", lambda: _torch_mechanize("adamw", 0.01),
     "mechanize(adamw(0.01, weight_decay=0.01), s_init=1e-8)",
     lambda: _optax_mechanize("adamw", 0.01, s_init=1e-8), "as above"),
]


def main() -> None:
    enable_jax_x64()
    print("### Schedule-Free and Mechanic: adaptlr vs the upstream packages (training parameters y)\n")
    print(agreement_table([c for c in CASES if c.algorithm.startswith(WRAPPERS)], COLUMNS))

    init, grad = problem()
    print("\n### Schedule-Free: PyTorch vs optax vs Keras\n")
    print("| one | other | y error | final x error | cause |")
    print("|---|---|---|---|---|")
    for one, other, why in PAIRS:
        y1, x1 = _side(one, init, grad)
        y2, x2 = _side(other, init, grad)
        x_err = float(np.linalg.norm(x1 - x2) / np.linalg.norm(x2))
        print(f"| `{one.settings}` | `{other.settings}` | {max_rel_err(y1, y2):.1e} | {x_err:.1e} | {why} |")


    print("\n### Mechanic: PyTorch vs optax\n")
    print("| mechanic_pytorch | optax.contrib | params error (max over steps) | after the last step "
          "| final scale Σs: torch / optax | cause |")
    print("|---|---|---|---|---|---|")
    for torch_call, torch_side, optax_call, optax_side, why in MECHANIC_PAIRS:
        y1, s1 = torch_side()
        y2, s2 = optax_side()
        last = max_rel_err([y1[-1]], [y2[-1]])
        print(f"| `{torch_call}` | `{optax_call}` | {max_rel_err(y1, y2):.1e} | {last:.1e} | "
              f"{s1[-1]:.3g} / {s2[-1]:.3g} | {why} |")


if __name__ == "__main__":
    main()
