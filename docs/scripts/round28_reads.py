"""Round 28: the terms several sums read, made again for each sum under JAX tracing.

    python docs/scripts/round28_reads.py toy ROUNDS        # one 512×512×3×3 float32 tensor: G ⊙ P,
                                                           # G ⊙ G, P ⊙ P each summed over rows and
                                                           # over columns, the products kept or made
                                                           # per sum
    python docs/scripts/round28_reads.py ab BEFORE SET ROUNDS  # DSA(AdamW) on SET (resnet18, small500):
                                                               # jit_step with and without donation,
                                                               # BEFORE (a commit) against this
                                                               # checkout, against AdamW's

``toy``: ``jax.jit`` of the six sums with each product written once and read by two reductions,
with the same products written twice (XLA merges them: the same program), and with the second
reduction's inputs passed through ``jax.lax.optimization_barrier``
(:func:`adaptlr.backends.jax_reads.read_again`); median ms, the loop and custom (YNNPACK) fusions of
the optimized HLO, and whether the sums agree bit for bit.

``ab``: interleaved processes of each side (one round: a worker per side, in a random order, as
``docs/scripts/round26_boundary.py``; ``BEFORE`` checked out as ``docs/scripts/round24_ab.py`` does);
a worker compiles AdamW's and DSA(AdamW)'s ``jit_step`` with and without donation ahead of time,
runs two steps, times ``STEPS`` steps of each as ``adaptlr bench`` does (interleaved rounds after
one warm-up round), and reports medians; printed per side
the median over rounds, × AdamW on the same path, each round's median, and from the first round
XLA's temporaries × the largest tensor, the words per parameter that the entry computation's
instructions read and write (operands and results of every instruction on arrays, from the
optimized HLO: the traffic XLA's program makes, counted, not measured) and the compile seconds.
"""

from __future__ import annotations

import json
import math
import random
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round24_ab import _tree  # (the same checkout of BEFORE)
from round27_tiled import _interleaved  # adaptlr bench's interleaved timing of named calls

_ARRAY = re.compile(r"\b(f32|f64|s32|s64|u32|pred)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "f64": 8, "s32": 4, "s64": 8, "u32": 4, "pred": 1}
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (.*?) ([\w\-]+)\((.*)$")
_FREE = {"parameter", "tuple", "get-tuple-element", "constant", "bitcast"}


def words_per_parameter(hlo: str, parameters: int) -> float:
    """Words (4 bytes) that the entry computation's instructions read and write, per parameter."""
    entry = hlo[hlo.index("\nENTRY"):]
    entry = entry[: entry.index("\n}")]
    sizes: dict[str, int] = {}
    total = 0
    for line in entry.splitlines()[1:]:
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, op, rest = match.groups()
        sizes[name] = sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d)
                          for t, dims in _ARRAY.findall(shape))
        if op not in _FREE:
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            total += sizes[name] + sum(sizes.get(o, 0) for o in operands)
    return total / 4 / parameters


def toy(rounds: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adaptlr.backends.jax_reads import read_again

    rng = np.random.default_rng(0)
    shape = (512, 512, 3, 3)
    g, p = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))
    rows, cols = (1, 2, 3), (0,)

    def kept(g: Any, p: Any) -> list:
        out = []
        for term in (g * p, g * g, p * p):
            out += [jnp.sum(term, axis=rows), jnp.sum(term, axis=cols)]
        return out

    def written_twice(g: Any, p: Any) -> list:
        return [s for a, b in ((g, p), (g, g), (p, p)) for s in (jnp.sum(a * b, axis=rows), jnp.sum(a * b, axis=cols))]

    def per_sum(g: Any, p: Any) -> list:
        out = []
        for a, b in ((g, p), (g, g), (p, p)):
            again = read_again((a, b))
            out += [jnp.sum(a * b, axis=rows), jnp.sum(again[0] * again[1], axis=cols)]
        return out

    functions = {name: jax.jit(f) for name, f in
                 (("products kept", kept), ("products written twice", written_twice), ("made per sum", per_sum))}
    want = [np.asarray(x) for x in functions["products kept"](g, p)]
    medians = _interleaved({k: (lambda f=f: f(g, p)) for k, f in functions.items()}, rounds)
    print(f"one tensor of {shape} float32, six sums, {rounds} interleaved rounds")
    for name, f in functions.items():
        hlo = f.lower(g, p).compile().as_text()
        entry = hlo[hlo.index("\nENTRY"):]
        kinds = re.findall(r"kind=(\w+)", entry)
        same = all(np.array_equal(np.asarray(x), w) for x, w in zip(f(g, p), want, strict=True))
        print(f"  {name:24s} {medians[name] * 1e3:6.2f} ms  loop fusions {kinds.count('kLoop')}, "
              f"custom {kinds.count('kCustom')}; {'the same sums' if same else 'OTHER SUMS'}")


STEPS = 15


def ab_worker(set_name: str) -> dict:
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    import adaptlr
    from adaptlr.backends import bench
    from adaptlr.backends.fast import jit_step

    host_params, host_grads = bench._host_data(bench.SETS[set_name])
    grads = [jnp.asarray(g) for g in host_grads]
    parameters = sum(p.size for p in host_params)
    largest = max(p.size for p in host_params) * 4
    makers = {"adamw": lambda: adaptlr.adamw(1e-3), "dsa": lambda: adaptlr.dsa(adaptlr.adamw(1e-3))}
    runners: dict[str, Callable[[], Any]] = {}
    notes: dict[str, list] = {}
    for name, make in makers.items():
        for donate in (False, True):
            opt = make()
            box = {"params": [jnp.asarray(p) for p in host_params]}
            box["state"] = opt.init(box["params"])
            started = time.perf_counter()
            step = jit_step(opt, donate=donate).compile(grads, box["state"], box["params"])
            seconds = time.perf_counter() - started

            def run(step: Any = step, box: dict = box) -> None:
                box["params"], box["state"] = step(grads, box["state"], box["params"])
                jax.block_until_ready(box["params"])

            for _ in range(2):
                run()
            key = f"{name} {'jit-donate' if donate else 'jit'}"
            (executable,) = step.executables.values()
            temp = executable.memory_analysis().temp_size_in_bytes / largest
            notes[key] = [temp, words_per_parameter(executable.as_text(), parameters), seconds]
            runners[key] = run
    medians = _interleaved(runners, STEPS)
    return {key: [median * 1e3, *notes[key]] for key, median in medians.items()}


def ab(before: str, set_name: str, rounds: int) -> None:
    package = str(_tree(before))
    results: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(rounds):
        for side in random.sample(list(results), 2):
            out = subprocess.run([sys.executable, __file__, "_ab", package if side == "before" else "-", set_name],
                                 check=True, capture_output=True, text=True).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))
    print(f"JAX, {set_name} shapes, {rounds} rounds of {STEPS} steps; median ms, × AdamW on the same path, "
          "XLA temporaries × the largest tensor, HLO words per parameter, compile s; each round's median")
    for key in results["after"][0]:
        for side, runs in results.items():
            ms = [r[key][0] for r in runs]
            ratio = statistics.median(r[key][0] / r["adamw " + key.split()[1]][0] for r in runs)
            temp, words, seconds = runs[0][key][1:]
            print(f"  {key:16s} {side:7s} {statistics.median(ms):7.1f}  {ratio:.2f}×  temp {temp:.2f}×  "
                  f"{words:5.1f} words  {seconds:4.1f} s  " + " ".join(f"{m:.0f}" for m in ms))


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "toy":
        toy(int(sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "_ab":
        if sys.argv[2] != "-":  # the worktree's adaptlr, not this checkout's editable install
            sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
            sys.path.insert(0, sys.argv[2])
        print(json.dumps(ab_worker(sys.argv[3])))
    elif len(sys.argv) >= 5 and sys.argv[1] == "ab":
        ab(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        raise SystemExit(__doc__)
