"""The copies XLA adds to a jitted step on ResNet-18 shapes (docs/performance.md, rounds 4 and 5).

For AdamW, ActiveLR(AdamW) and AutoDrop(AdamW), with and without donating the state: the number of
``copy`` instructions on float32 arrays in the optimized HLO of ``jax.jit(opt.update)`` and the
elements they copy per parameter (each copied element is read and written: two words of traffic),
in all and in the entry computation (the rest are in the branches of the epoch-boundary
``lax.cond``, one of which runs). Deterministic on a given jax/jaxlib; run on the CPU.

    python docs/scripts/jax_step_copies.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np

import adaptlr
from adaptlr.backends.bench import RESNET18_SHAPES
from adaptlr.backends.xla_copies import ENTRY, copies_per_computation

ALGORITHMS = {
    "adamw": lambda: adaptlr.adamw(1e-3),
    "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100),
    "autodrop(adamw)": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100),
}


def main() -> int:
    jax.config.update("jax_enable_x64", True)  # step scalars in float64, as adaptlr's tests and bench run
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32) * 0.1) for s in RESNET18_SHAPES]
    n = sum(int(np.prod(s)) for s in RESNET18_SHAPES)
    print(f"jax {jax.__version__}, {jax.default_backend()}; ResNet-18 shapes, {n / 1e6:.1f}M float32 parameters\n")
    print("| algorithm | state donated | f32 copies | elements copied per parameter | in the entry computation |")
    print("|---|---|---|---|---|")
    for name, make in ALGORITHMS.items():
        opt = make()
        state = opt.init(params)
        for donated in ((), (1,)):
            jitted = jax.jit(lambda g, s, p, opt=opt: opt.update(g, s, p), donate_argnums=donated)
            hlo = jitted.lower(params, state, params).compile().as_text()
            copies = copies_per_computation(hlo)
            count, elements = sum(c for c, _ in copies.values()), sum(e for _, e in copies.values())
            entry = copies.get(ENTRY, (0, 0))[1]
            print(f"| {name} | {'yes' if donated else 'no'} | {count} | {elements / n:.2f} | {entry / n:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
