"""Round 29: the leads round 28 left, measured (no change to the steps came of them).

    python docs/scripts/round29.py rows            # JAX: DSA's three products summed over rows / columns
    python docs/scripts/round29.py small           # JAX: a float64 sum over 500 tensors of 32×64
    python docs/scripts/round29.py numpy-blocks ROUNDS   # NumPy AdamW's blocked step, block sizes
    python docs/scripts/round29.py adapter STEPS   # torch AdamW: the adapter's step, its Python
    python docs/scripts/round29.py torch-blocks ROUNDS   # torch AdamW: the adapter's block sizes
    python docs/scripts/round29.py cold            # torch: an operation's dispatch after a block's kernel

``rows``: one 512×512×3×3 float32 tensor ``G`` and ``P``: the sums of ``G ⊙ P``, ``G ⊙ G`` and ``P ⊙ P`` over
its rows (axes 1, 2, 3) or its columns (axis 0), each followed by DSA's cosine and ``exp``; with and
without the tensor's sums taken from them; the row sums also stacked into one array (``jnp.stack``,
the sums' one consumer). Printed per variant: the words (4 bytes) per element that the optimized
HLO's entry instructions read and write (``round28_reads.words_per_parameter``) and its YNNPACK
(custom) and loop fusions. Reading ``G`` and ``P`` once is 2 words.

``small``: ``Σ_i Σ g_i ⊙ d_i`` accumulated in float64 over 500 float32 tensors of 32×64 (HD's global
sum on ``adaptlr bench``'s small500 set) written five ways, the sums chained (each tensor's
inputs passed with the running sum through ``jax.lax.optimization_barrier``, so that no product can
be made before the previous sum), and summed in float32 instead: XLA's temporaries × the largest
tensor, its ``reduce-window`` instructions (the entry's lines naming one), and whether the total is
the same number.

``numpy-blocks``: :class:`adaptlr.backends.fast.FlatOptimizer` AdamW on ResNet-18 shapes with
blocks of 16K to 208K elements (208K: the default there, ``cpu_block_size`` with
``NUMPY_BLOCK_LIVE_TEMPORARIES``), timed as ``adaptlr bench`` times (interleaved rounds), × the
copy bound of the same run (``np.copyto`` of 3.5 words per parameter, as the bench's bound).

``adapter``: the torch adapter's default AdamW step on ResNet-18 shapes (``round12_ab._adapter``):
its median wall time over ``STEPS`` steps, then ``cProfile`` of ``STEPS`` steps: the functions with
the most time of their own (aten operations and the Python around them).

``torch-blocks``: the torch adapter's AdamW on ResNet-18 shapes with its default options and with
``fast={"block_size": B}`` for B of 32K to 256K elements (256K: the default there), against
``torch.optim.AdamW(foreach=True)``, interleaved rounds.

``cold``: one ``torch.addcmul(out=)`` over blocks of 4K to 512K float32 elements (four arrays), then
the same slice of another tensor twice: the median time of the kernel, of the slice right after it,
and of the slice after the first slice.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round28_reads import words_per_parameter


def rows() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    shape = (512, 512, 3, 3)
    rng = np.random.default_rng(0)
    g, p = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(2))
    rows, cols = (1, 2, 3), (0,)

    def factor(dot: Any, g2: Any, p2: Any) -> Any:
        return jnp.exp(jnp.clip(dot / (jnp.sqrt(g2) * jnp.sqrt(p2) + 1e-12), -1.0, 1.0))

    def sums(g: Any, p: Any, axis: tuple) -> list:
        return [jnp.sum(a * b, axis=axis, keepdims=True) for a, b in ((g, p), (g, g), (p, p))]

    def over(axis: tuple, tensor: bool = False, stacked: bool = False) -> Any:
        def f(g: Any, p: Any) -> Any:
            three = sums(g, p, axis)
            if stacked:
                both = jnp.stack(three)
                three = [both[k] for k in range(3)]
                totals = list(jnp.sum(both, axis=tuple(range(1, both.ndim))))
            else:
                totals = [jnp.sum(x) for x in three]
            return (factor(*three), factor(*totals)) if tensor else factor(*three)

        return f

    variants = {
        "column sums": over(cols),
        "row sums": over(rows),
        "row sums stacked": over(rows, stacked=True),
        "column sums, tensor's from them": over(cols, tensor=True),
        "row sums, tensor's from them": over(rows, tensor=True),
        "row sums stacked, tensor's from them": over(rows, tensor=True, stacked=True),
    }
    print(f"one tensor of {shape} float32: the three products' sums, DSA's cosine and exp")
    for name, f in variants.items():
        hlo = jax.jit(f).lower(g, p).compile().as_text()
        kinds = re.findall(r"kind=(\w+)", hlo[hlo.index("\nENTRY"):])
        print(f"  {name:38s} {words_per_parameter(hlo, g.size):5.2f} words per element; "
              f"custom fusions {kinds.count('kCustom')}, loop fusions {kinds.count('kLoop')}")


def small() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from adaptlr.backends.jax_reads import read_again

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    gs = [jnp.asarray(rng.standard_normal((32, 64), dtype=np.float32)) for _ in range(500)]
    ds = [jnp.asarray(rng.standard_normal((32, 64), dtype=np.float32)) for _ in range(500)]
    f64 = jnp.float64

    def chained(gs: list, ds: list) -> Any:
        total = None
        for g, d in zip(gs, ds, strict=True):
            if total is not None:
                g, d, total = read_again((g, d, total))
            part = jnp.sum(g * d, dtype=f64)
            total = part if total is None else total + part
        return total

    variants = {
        "sum(g*d, dtype=float64)": lambda gs, ds: sum(jnp.sum(g * d, dtype=f64) for g, d in zip(gs, ds)),
        "sum((g*d).astype(float64))": lambda gs, ds: sum(jnp.sum((g * d).astype(f64)) for g, d in zip(gs, ds)),
        "the same, 1-D": lambda gs, ds: sum(jnp.sum((g * d).reshape(-1), dtype=f64) for g, d in zip(gs, ds)),
        "row sums, then theirs": lambda gs, ds: sum(jnp.sum(jnp.sum(g * d, axis=1, dtype=f64))
                                                    for g, d in zip(gs, ds)),
        "products stacked, one sum": lambda gs, ds: jnp.sum(jnp.stack([g * d for g, d in zip(gs, ds)]), dtype=f64),
        "chained through barriers": chained,
        "float32 sums (other numbers)": lambda gs, ds: sum(jnp.sum(g * d) for g, d in zip(gs, ds)),
    }
    largest = 32 * 64 * 4
    want = None
    print("500 float32 tensors of 32×64, Σ g ⊙ d in float64 under jax.jit")
    for name, f in variants.items():
        executable = jax.jit(f).lower(gs, ds).compile()
        temp = executable.memory_analysis().temp_size_in_bytes
        hlo = executable.as_text()
        entry = hlo[hlo.index("\nENTRY"):]
        windows = sum("reduce-window" in line for line in entry.splitlines())
        value = float(jax.jit(f)(gs, ds))
        want = value if want is None else want
        print(f"  {name:28s} temporaries {temp / largest:7.1f}× the largest tensor; "
              f"instructions on a reduce-window {windows}; "
              f"{'the same total' if value == want else 'another total'}")


def numpy_blocks(rounds: int) -> None:
    import numpy as np
    from round27_tiled import _interleaved

    import adaptlr
    from adaptlr.backends import bench
    from adaptlr.backends.fast import FlatOptimizer

    params, grads = bench._host_data(bench.SETS["resnet18"])
    calls: dict[str, Any] = {}
    for block in (1 << 14, 1 << 15, 1 << 16, 1 << 17, 13 << 14):
        flat = FlatOptimizer(adaptlr.adamw(1e-3), [p.copy() for p in params], block_size=block)
        flat.step(grads)  # the gradients land in the flat buffer once, as in adaptlr bench
        calls[f"blocks of {block >> 10}K"] = flat.step
    words = int(3.5 * sum(p.size for p in params))
    src, dst = np.ones(words, dtype=np.float32), np.empty(words, dtype=np.float32)
    calls["copy bound"] = lambda: np.copyto(dst, src)
    medians = _interleaved(calls, rounds)
    print(f"NumPy AdamW, ResNet-18 shapes, FlatOptimizer's blocked step, {rounds} interleaved rounds")
    for name, median in medians.items():
        print(f"  {name:16s} {median * 1e3:7.2f} ms  {median / medians['copy bound']:5.2f}× the copy bound")


def adapter(steps: int) -> None:
    import cProfile
    import pstats

    from round12_ab import _adapter
    from round18_sums import _median_us  # (20 warm-up calls, then the median)

    import adaptlr

    step = _adapter(adaptlr.adamw(1e-3))
    print(f"torch adapter, default AdamW, ResNet-18 shapes: median {_median_us(step, steps) / 1e3:.1f} ms a step")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        step()
    profile.disable()
    stats = pstats.Stats(profile)
    rows = sorted(stats.stats.items(), key=lambda item: -item[1][2])[:8]  # type: ignore[attr-defined]
    print(f"cProfile of {steps} steps (under the profiler), ms a step of each function's own time:")
    for (path, line, name), (_, calls, own, _, _) in rows:
        print(f"  {own / steps * 1e3:6.2f} ms  {calls // steps:5d} calls  {Path(path).name}:{line}({name})")


def torch_blocks(rounds: int) -> None:
    import torch
    from round12_ab import _params
    from round27_tiled import _interleaved

    import adaptlr
    from adaptlr.backends.torch import Optimizer

    calls: dict[str, Any] = {}
    for block in (None, 1 << 15, 1 << 16, 1 << 17, 1 << 18):
        opt = Optimizer(_params(), adaptlr.adamw(1e-3), fast="auto" if block is None else {"block_size": block})
        opt.step()
        calls["adapter, default" if block is None else f"adapter, {block >> 10}K"] = opt.step
    native = torch.optim.AdamW(_params(), lr=1e-3, weight_decay=1e-2, foreach=True)
    native.step()
    calls["AdamW(foreach)"] = native.step
    medians = _interleaved(calls, rounds)
    print(f"torch AdamW, ResNet-18 shapes, {rounds} interleaved rounds")
    for name, median in medians.items():
        print(f"  {name:18s} {median * 1e3:7.2f} ms  {median / medians['AdamW(foreach)']:5.2f}× foreach")


def cold() -> None:
    import statistics
    import time

    import torch

    torch.set_grad_enabled(False)
    other = torch.zeros(1 << 22)
    print("torch on the CPU: a kernel over four arrays, then a slice of another tensor (medians of 1000)")
    for log2 in (12, 14, 15, 16, 17, 18, 19):
        n = 1 << log2
        a, b, c, out = (torch.randn(n) for _ in range(4))
        kernel, after_kernel, after_slice = [], [], []
        for _ in range(1000):
            started = time.perf_counter()
            torch.addcmul(a, b, c, out=out)
            sliced = time.perf_counter()
            other[4096:4096 + n]
            again = time.perf_counter()
            other[4096:4096 + n]
            kernel.append(sliced - started)
            after_kernel.append(again - sliced)
            after_slice.append(time.perf_counter() - again)
        print(f"  {n >> 10:4d}K elements ({16 * n >> 10:5d} KB): kernel {statistics.median(kernel) * 1e6:6.1f} µs, "
              f"slice after it {statistics.median(after_kernel) * 1e6:5.1f} µs, "
              f"after a slice {statistics.median(after_slice) * 1e6:4.1f} µs")


if __name__ == "__main__":
    modes = {"rows": rows, "small": small, "numpy-blocks": numpy_blocks, "adapter": adapter,
             "torch-blocks": torch_blocks, "cold": cold}
    mode = modes[sys.argv[1]]
    mode(*map(int, sys.argv[2:]))  # type: ignore[operator]
