"""The copies XLA adds to a jitted step on ResNet-18 shapes (docs/performance.md, rounds 4, 5 and 16).

For AdamW, ActiveLR(AdamW) and AutoDrop(AdamW), with and without donating the state: the number of
``copy`` instructions on float32 arrays in the optimized HLO of the jitted update
(``adaptlr.backends.fast.jit_update``; before round 16 this script jitted ``opt.update`` itself, whose
outputs come in another order than the donated state; ``optax.adamw``'s ``jax.jit(tx.update)`` for
comparison) and the elements they copy per parameter (each copied element is read and written: two words of traffic),
in all and in the entry computation, which runs every step (the rest are in the body of the
epoch-boundary loop, which runs only at an epoch boundary, since round 22; before, in the branches
of a ``lax.cond``, one of which ran every step). Deterministic on a given jax/jaxlib; run on the CPU.

    python docs/scripts/jax_step_copies.py
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import adaptlr
from adaptlr.backends.bench import RESNET18_SHAPES
from adaptlr.backends.fast import jit_update
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
        for donated in (False, True):
            hlo = jit_update(opt, donate_state=donated).compile(params, state, params).as_text()
            print(_row(name, donated, hlo, n))
    # optax.adamw jitted as its users write it, the updates first and the state after: with the
    # state donated, JAX pairs the first moments' buffers with the updates (round 16)
    tx = optax.adamw(1e-3)
    for donated in ((), (1,)):
        jitted = jax.jit(tx.update, donate_argnums=donated)
        hlo = jitted.lower(params, tx.init(params), params).compile().as_text()
        print(_row("optax.adamw (`jax.jit(tx.update)`)", bool(donated), hlo, n))
    return 0


def _row(name: str, donated: bool, hlo: str, n: int) -> str:
    copies = copies_per_computation(hlo)
    count, elements = sum(c for c, _ in copies.values()), sum(e for _, e in copies.values())
    entry = copies.get(ENTRY, (0, 0))[1]
    return f"| {name} | {'yes' if donated else 'no'} | {count} | {elements / n:.2f} | {entry / n:.2f} |"


if __name__ == "__main__":
    sys.exit(main())
