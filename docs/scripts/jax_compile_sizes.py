"""How long ``jax.jit`` takes to compile a whole step, and how large it gets (docs/performance.md, round 15).

For each algorithm of ``adaptlr bench``, the whole step (``adaptlr.backends.fast.jit_step``: ``opt.update``
and ``apply_updates``, without donation) over
``LEAVES`` float32 tensors of 32×64 (the bench's ``small500`` set has 500) is lowered and compiled
once: the seconds that takes, the instructions of the optimized HLO (deterministic on a given
jax/jaxlib) and the process's peak resident memory so far. A step whose size grows with the
square of the leaves has a chain of 0-D operations that XLA copied into every leaf's loop.

    python docs/scripts/jax_compile_sizes.py [LEAVES] [ALGORITHM,...]    # default: 200, every bench algorithm
"""

from __future__ import annotations

import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from adaptlr.backends.bench import ALGORITHMS
from adaptlr.backends.fast import jit_step
from adaptlr.backends.xla_copies import instruction_count


def compiled_size(make, leaves: int) -> tuple[float, int]:
    """(seconds to lower and compile, instructions of the optimized HLO) of one jitted step."""
    opt = make()
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal((32, 64), dtype=np.float32)) for _ in range(leaves)]
    grads = [p * 0.1 for p in params]
    started = time.perf_counter()
    compiled = jit_step(opt, donate=False).compile(grads, opt.init(params), params)
    return time.perf_counter() - started, instruction_count(compiled.as_text())


def main(argv: list[str]) -> int:
    jax.config.update("jax_enable_x64", True)  # step scalars in float64, as adaptlr's tests and bench run
    leaves = int(argv[0]) if argv else 200
    names = argv[1].split(",") if len(argv) > 1 else list(ALGORITHMS)
    print(f"jax {jax.__version__}, {jax.default_backend()}; {leaves} float32 tensors of 32×64\n")
    print("| algorithm | compile s | HLO instructions | per leaf | peak RSS GB |")
    print("|---|---|---|---|---|")
    for name in names:
        seconds, instructions = compiled_size(ALGORITHMS[name], leaves)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        print(f"| {name} | {seconds:.1f} | {instructions} | {instructions / leaves:.0f} | {peak:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
