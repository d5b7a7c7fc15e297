"""Round 30: what moves issue 20's target 1 between runs, and two JAX structures measured.

    python docs/scripts/round30.py faults STEPS     # torch: page faults and system time of a step
    python docs/scripts/round30.py heap ROUNDS      # torch: the adapter × foreach as the process's heap grows
    python docs/scripts/round30.py words            # JAX: words per parameter of the jitted steps
    python docs/scripts/round30.py variadic         # JAX: DSA's three row sums as one variadic reduce

``faults``: the torch adapter's default AdamW step and ``torch.optim.AdamW(foreach=True)`` on
ResNet-18 shapes (``round12_ab._params``), three times ``STEPS`` steps each, alternating: wall time
per step, minor page faults per step and system and user CPU time per step (``getrusage``).

``heap``: the same two steps, interleaved (median of ``ROUNDS`` rounds in a random order, as
``adaptlr bench`` times), in this fresh process; after 20,000 tensors of 1 KB to 4 MB were made and
every other one freed (a fragmented heap); and after six more adapters were built and stepped (a
grown heap, as in ``adaptlr bench``'s process, which holds every runner).

``words``: ``fast.jit_step`` (donated) of AdamW, HD, DSA and EG (``adaptlr bench``'s settings) on
ResNet-18 shapes: the words (4 bytes) per parameter that the optimized HLO's entry instructions
read and write (``round28_reads.words_per_parameter``) and its fusions.

``variadic``: one 512×512×3×3 float32 ``G`` and ``P``: the sums of ``G ⊙ P``, ``G ⊙ G`` and ``P ⊙ P``
over the rows (axes 1-3) or the column (axis 0), each followed by DSA's cosine and ``exp``, written
as three ``jnp.sum`` (as DSA does; ``round29.py rows``) and as one ``jax.lax.reduce`` of the three
products (one HLO reduce with three outputs): words per element, fusions and the median time.
"""

from __future__ import annotations

import random
import re
import resource
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round28_reads import words_per_parameter


def _two_steps() -> dict[str, Any]:
    import torch
    from round12_ab import _params

    import adaptlr
    from adaptlr.backends.torch import Optimizer

    torch.set_grad_enabled(False)
    adapter = Optimizer(_params(), adaptlr.adamw(1e-3))
    native = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=1e-2, foreach=True)
    adapter.step()
    native.step()
    return {"adapter": adapter.step, "AdamW(foreach)": native.step}


def faults(steps: int) -> None:
    calls = _two_steps()
    print(f"torch AdamW, ResNet-18 shapes: per step over {steps} steps (three times each, alternating)")
    for _ in range(3):
        for name, step in calls.items():
            before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
            for _ in range(steps):
                step()
            wall, after = (time.perf_counter() - started) / steps, resource.getrusage(resource.RUSAGE_SELF)
            faulted = (after.ru_minflt - before.ru_minflt) / steps
            print(f"  {name:15s} {wall * 1e3:6.1f} ms, {faulted:6.0f} page faults, "
                  f"system {(after.ru_stime - before.ru_stime) / steps * 1e3:5.1f} ms, "
                  f"user {(after.ru_utime - before.ru_utime) / steps * 1e3:5.1f} ms")


def heap(rounds: int) -> None:
    import torch
    from round12_ab import _params

    import adaptlr
    from adaptlr.backends.torch import Optimizer

    calls = _two_steps()

    def measure(when: str) -> None:
        times: dict[str, list] = {name: [] for name in calls}
        for _ in range(rounds):
            for name in random.sample(list(calls), len(calls)):
                started = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - started)
        median = {name: statistics.median(t) for name, t in times.items()}
        print(f"  {when:34s} adapter {median['adapter'] * 1e3:5.1f} ms, foreach "
              f"{median['AdamW(foreach)'] * 1e3:5.1f} ms: {median['adapter'] / median['AdamW(foreach)']:.2f}×")

    print(f"torch AdamW, ResNet-18 shapes, median of {rounds} interleaved rounds: the adapter × foreach")
    measure("a fresh process")
    rng, kept = random.Random(0), []
    for i in range(20_000):
        tensor = torch.empty(rng.randint(256, 1 << 20))
        if i % 2:
            kept.append(tensor)
    del tensor
    measure("after a fragmented heap")
    others = [Optimizer(_params(), adaptlr.adamw(1e-3)) for _ in range(6)]
    for other in others:
        other.step()
    measure("after six more adapters stepped")


def words() -> None:
    import jax.numpy as jnp
    import numpy as np

    from adaptlr.backends import bench, fast

    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in bench.RESNET18_SHAPES]
    grads = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in bench.RESNET18_SHAPES]
    n = sum(p.size for p in params)
    print("jitted steps (donated), ResNet-18 shapes: HLO words per parameter, loop fusions")
    for name in ("adamw", "hypergradient", "dsa", "eg_step_size"):
        opt = bench.ALGORITHMS[name]()
        hlo = fast.jit_step(opt, donate=True).compile(grads, opt.init(params), params).as_text()
        kinds = re.findall(r"kind=(\w+)", hlo[hlo.index("\nENTRY"):])
        print(f"  {name:14s} {words_per_parameter(hlo, n):5.2f} words, {kinds.count('kLoop')} loop fusions")


def variadic() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    shape = (512, 512, 3, 3)
    rng = np.random.default_rng(0)
    g, p = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))

    def factor(dot: Any, g2: Any, p2: Any) -> Any:
        return jnp.exp(jnp.clip(dot / (jnp.sqrt(g2) * jnp.sqrt(p2) + 1e-12), -1.0, 1.0))

    def three_sums(axis: tuple) -> Any:
        return lambda g, p: factor(*[jnp.sum(a * b, axis=axis, keepdims=True) for a, b in ((g, p), (g, g), (p, p))])

    def one_reduce(axis: tuple) -> Any:
        def f(g: Any, p: Any) -> Any:
            zero = jnp.zeros((), g.dtype)
            sums = jax.lax.reduce((g * p, g * g, p * p), (zero, zero, zero),
                                  lambda a, b: (a[0] + b[0], a[1] + b[1], a[2] + b[2]), axis)
            return factor(*[jnp.expand_dims(x, axis) for x in sums])

        return f

    print(f"one tensor of {shape} float32: three products summed, DSA's cosine and exp (median of 7 × 20 calls)")
    for over, axis in (("rows", (1, 2, 3)), ("columns", (0,))):
        for how, make in (("three jnp.sum", three_sums), ("one variadic reduce", one_reduce)):
            f = jax.jit(make(axis))
            hlo = f.lower(g, p).compile().as_text()
            kinds = re.findall(r"kind=(\w+)", hlo[hlo.index("\nENTRY"):])
            f(g, p).block_until_ready()
            times = []
            for _ in range(7):
                started = time.perf_counter()
                for _ in range(20):
                    f(g, p).block_until_ready()
                times.append((time.perf_counter() - started) / 20)
            print(f"  {over:7s} {how:20s} {words_per_parameter(hlo, g.size):5.2f} words per element, "
                  f"{kinds.count('kCustom')} custom and {kinds.count('kLoop')} loop fusions, "
                  f"{statistics.median(times) * 1e3:6.3f} ms")


if __name__ == "__main__":
    modes = {"faults": faults, "heap": heap, "words": words, "variadic": variadic}
    modes[sys.argv[1]](*map(int, sys.argv[2:]))  # type: ignore[operator]
