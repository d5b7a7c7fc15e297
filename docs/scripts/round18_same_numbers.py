"""Round 18: do NumPy and JAX compute what round 17's code computed? (The fused forms are torch's.)

    git worktree add /tmp/round17 e5f9680
    python docs/scripts/round18_same_numbers.py /tmp/round17 /tmp/old.pkl   # round 17's code
    python docs/scripts/round18_same_numbers.py . /tmp/new.pkl              # this checkout
    python docs/scripts/round18_same_numbers.py compare /tmp/old.pkl /tmp/new.pkl

Twelve steps of ten algorithms on two parameters, NumPy, eager JAX and ``jax.jit(opt.update)``,
float32 and float64 (x64 enabled); the parameters' bytes are saved, and ``compare`` prints the cases
that differ with their largest difference in ulps.
"""

from __future__ import annotations

import pickle
import sys

import numpy as np


def trajectories(source: str) -> dict:
    import os

    sys.path.insert(0, os.path.abspath(source))
    import adaptlr  # the checkout at ``source``

    print(f"adaptlr from {os.path.dirname(adaptlr.__file__)}", file=sys.stderr)

    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    makers = {
        "adamw": lambda: adaptlr.adamw(1e-2, weight_decay=0.1),
        "adam": lambda: adaptlr.adam(1e-2, weight_decay=0.1),
        "radam": lambda: adaptlr.radam(1e-2),
        "adabelief": lambda: adaptlr.adabelief(1e-2, weight_decay=0.1),
        "sgd": lambda: adaptlr.sgd(1e-2, momentum=0.9, dampening=0.1),
        "prodigy": lambda: adaptlr.prodigy(weight_decay=0.1),
        "dadapt_adam": lambda: adaptlr.dadapt_adam(weight_decay=0.1, decouple=True),
        "eg": lambda: adaptlr.eg_step_size(adaptlr.adamw(1e-2), 1e-2, 1e-2),
        "schedule_free": lambda: adaptlr.schedule_free(adaptlr.adamw(1e-2)),
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=5),
    }
    out = {}
    for mode in ("numpy", "jax", "jax.jit"):
        convert = (lambda a: a) if mode == "numpy" else jnp.asarray
        for dtype in ("float32", "float64"):
            for name, make in makers.items():
                rng = np.random.default_rng(0)
                params = [convert(rng.standard_normal(s).astype(dtype)) for s in [(7, 5), (13,)]]
                opt = make()
                state = opt.init(params)
                update = jax.jit(opt.update) if mode == "jax.jit" else opt.update
                for _ in range(12):
                    grads = [convert((2.0 * np.asarray(p) + rng.standard_normal(p.shape)).astype(dtype))
                             for p in params]
                    updates, state = update(grads, state, params)
                    params = adaptlr.apply_updates(params, updates)
                out[(mode, dtype, name)] = [np.asarray(p) for p in params]
    return out


def compare(old: dict, new: dict) -> None:
    same = 0
    for key, before in old.items():
        after = new[key]
        if all(np.array_equal(a, b) for a, b in zip(before, after)):
            same += 1
            continue
        ulps = max(float(np.max(np.abs(a - b) / np.spacing(np.abs(a)))) for a, b in zip(before, after))
        print(f"{key}: differs, at most {ulps:.0f} ulps")
    print(f"{same} of {len(old)} cases bit for bit")


def main(argv: list[str]) -> None:
    if len(argv) == 3 and argv[0] == "compare":
        with open(argv[1], "rb") as f, open(argv[2], "rb") as g:
            compare(pickle.load(f), pickle.load(g))
    elif len(argv) == 2:
        with open(argv[1], "wb") as f:
            pickle.dump(trajectories(argv[0]), f)
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
