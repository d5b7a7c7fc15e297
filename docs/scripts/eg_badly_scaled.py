"""EG (spec §6) on a badly scaled quadratic: which max_log_step keeps it finite (docs/algorithms/eg.md).

f(x) = ½ Σ h_i x_i², h = 1e-4 .. 1e4 (9 values, log-spaced), x_0 = 1, 2000 steps, NumPy.
Run: python docs/scripts/eg_badly_scaled.py
"""

import numpy as np

import adaptlr

STEPS = 2000
BASES = {
    "sgd(1e-4)": lambda: adaptlr.sgd(1e-4),
    "sgd(1e-4, momentum=0.9)": lambda: adaptlr.sgd(1e-4, momentum=0.9),
    "adam(1e-2)": lambda: adaptlr.adam(1e-2),
}


def run(opt, dtype):
    h = np.logspace(-4, 4, 9).astype(dtype)
    x = np.ones(9, dtype=dtype)
    state = opt.init(x)
    with np.errstate(all="ignore"):
        for _ in range(STEPS):
            updates, state = opt.update(h * x, state, x)
            x = x + updates
    loss = 0.5 * float(np.sum(h * x.astype(np.float64) ** 2))
    if not state.adaptations:
        return f"{loss:.2g}", "", ""
    eg = state.adaptations[-1]
    return f"{loss:.2g}", f"{float(eg.scale):.2g}", f"{float(np.max(eg.gain)):.2g}"


print("| base | γ_s = γ_p | max_log_step | dtype | loss after 2000 steps | s | max p |")
print("|---|---|---|---|---|---|---|")
for name, make in BASES.items():
    for dtype in ("float64", "float32"):
        print(f"| {name} | (base alone) | | {dtype} | " + " | ".join(run(make(), dtype)) + " |")
        for mls in (None, 1.0, 0.1):
            opt = adaptlr.eg_step_size(make(), 1.0, 1.0, max_log_step=mls)
            print(f"| {name} | 1 | {mls} | {dtype} | " + " | ".join(run(opt, dtype)) + " |")
