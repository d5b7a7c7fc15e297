"""Round 31: the learning-rate-free bases' steps written for torch's CPU (issue 18 item 6).

    python docs/scripts/round31.py before ROUNDS    # the adapter's default now and as in round 30, × upstream
    python docs/scripts/round31.py blocks ROUNDS    # block sizes of the written steps, ResNet-18 shapes
    python docs/scripts/round31.py sums             # a float64 sum of a float32 block: cost and error
    python docs/scripts/round31.py adam ROUNDS      # AdamW through the adapter with fast="fused", × torch.optim

``before``: Prodigy, D-Adapt Adam, D-Adapt SGD and DoG through the torch adapter's default path
(``fast="auto"``) with the written steps (``adaptlr.backends.torch_lr_free``) and with them switched
off (round 30's default: the blocked array-API step on ResNet-18 shapes, the flat one on 500 tensors
of 2K), against the upstream PyTorch optimizer on the same tensors; interleaved as ``adaptlr bench``
times (one warm-up round), median ms and × upstream.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable

NAMES = ("prodigy", "dadapt_adam", "dadapt_sgd", "dog")


def _params(shapes: list) -> list:
    import torch

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape) * 0.01
    return params


def _interleaved(steps: dict, rounds: int) -> dict:
    times: dict = {k: [] for k in steps}
    for step in steps.values():
        step()
    for _ in range(rounds):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            times[key].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def before(rounds: int) -> None:
    import adaptlr
    from adaptlr.backends import torch_lr_free
    from adaptlr.backends.bench import SETS, _upstream_torch
    from adaptlr.backends.torch import Optimizer

    original = torch_lr_free.step_module

    def switched_off(step: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            torch_lr_free.step_module = lambda opt: None  # type: ignore[assignment]
            try:
                step()
            finally:
                torch_lr_free.step_module = original  # type: ignore[assignment]
        return run

    for set_name in ("resnet18", "small500"):
        shapes = SETS[set_name]
        steps, paths = {}, {}
        for name in NAMES:
            found = _upstream_torch(name)
            assert found is not None
            steps[(name, "upstream")] = found[1](_params(shapes)).step
            now = Optimizer(_params(shapes), getattr(adaptlr, name)())
            then = Optimizer(_params(shapes), getattr(adaptlr, name)())
            steps[(name, "now")], steps[(name, "round 30")] = now.step, switched_off(then.step)
            paths[name] = (now, then)
        medians = _interleaved(steps, rounds)
        print(f"{set_name}: torch adapter default, {rounds} interleaved rounds; median ms, × upstream")
        for name in NAMES:
            up = medians[(name, "upstream")]
            now, then = paths[name]
            print(f"  {name:12s} upstream {up * 1e3:6.1f}   now ({now.fast_path}) {medians[(name, 'now')] * 1e3:6.1f} "
                  f"{medians[(name, 'now')] / up:.2f}×   round 30 ({then.fast_path}) "
                  f"{medians[(name, 'round 30')] * 1e3:6.1f} {medians[(name, 'round 30')] / up:.2f}×")


def blocks(rounds: int) -> None:
    import adaptlr
    from adaptlr.backends import torch_block_sums
    from adaptlr.backends.bench import RESNET18_SHAPES, _upstream_torch
    from adaptlr.backends.torch import Optimizer

    sizes = (1 << 16, 1 << 17, 1 << 18, 1 << 19)
    steps = {}
    for name in NAMES:
        found = _upstream_torch(name)
        assert found is not None
        steps[(name, "upstream")] = found[1](_params(RESNET18_SHAPES)).step
        for size in sizes:
            opt = Optimizer(_params(RESNET18_SHAPES), getattr(adaptlr, name)())

            def run(opt: Optimizer = opt, size: int = size) -> None:
                torch_block_sums.BLOCK_ELEMENTS = size
                opt.step()
            steps[(name, size)] = run
    medians = _interleaved(steps, rounds)
    print(f"ResNet-18 shapes, torch adapter default (fused), {rounds} interleaved rounds; × upstream per block size")
    for name in NAMES:
        up = medians[(name, "upstream")]
        cells = "  ".join(f"{s >> 10}K {medians[(name, s)] / up:.2f}" for s in sizes)
        print(f"  {name:12s} upstream {up * 1e3:5.1f} ms   {cells}")


def sums() -> None:
    import torch

    from adaptlr.backends.torch_block_sums import RowSums

    n = 1 << 18
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(n, generator=generator), torch.randn(n, generator=generator) + 0.1
    product, wide = torch.empty(n), torch.empty(n, dtype=torch.float64)

    def row_sums(squares: bool) -> Callable[[], object]:
        def run() -> object:
            partial = RowSums([x], n, torch.float64, squares)
            partial.add(product if not squares else x)
            return partial.total()
        return run

    forms = {
        "float64 product, float64 sum (round 20)": lambda: torch.mul(x, y, out=wide).sum(),
        "float32 product, sum(dtype=float64)": lambda: torch.mul(x, y, out=product).sum(dtype=torch.float64),
        "float32 product, RowSums (round 31)": lambda: (torch.mul(x, y, out=product), row_sums(False)())[1],
        "float32 product, float32 sum": lambda: torch.mul(x, y, out=product).sum(),
        "sum of squares, RowSums (row 2-norms)": row_sums(True),
    }
    exact_dot = math.fsum((x.double() * y.double()).tolist())
    exact_squares = math.fsum((x.double() ** 2).tolist())
    scale_dot = math.fsum((x.double() * y.double()).abs().tolist())
    print(f"one block of {n} float32 elements: median µs of 300, |error| / Σ|terms| against the exact sum")
    for label, form in forms.items():
        times = []
        for _ in range(300):
            start = time.perf_counter()
            value = form()
            times.append(time.perf_counter() - start)
        exact, scale = (exact_squares, exact_squares) if "squares" in label else (exact_dot, scale_dot)
        error = abs(float(value) - exact) / scale  # type: ignore[arg-type]
        print(f"  {label:42s} {statistics.median(times) * 1e6:6.1f} µs   {error:.1e}")


def adam(rounds: int) -> None:
    import torch

    import adaptlr
    from adaptlr.backends.bench import SETS
    from adaptlr.backends.torch import Optimizer

    for set_name in ("resnet18", "small500"):
        shapes = SETS[set_name]
        steps = {
            "torch.optim.AdamW(fused=True)": torch.optim.AdamW(_params(shapes), fused=True).step,
            "torch.optim.AdamW(foreach=True)": torch.optim.AdamW(_params(shapes), foreach=True).step,
            'adapter fast="fused"': Optimizer(_params(shapes), adaptlr.adamw(), fast="fused").step,
            "adapter default": Optimizer(_params(shapes), adaptlr.adamw()).step,
        }
        medians = _interleaved(steps, rounds)
        fused = medians["torch.optim.AdamW(fused=True)"]
        print(f"{set_name}: AdamW, {rounds} interleaved rounds; median ms, × torch.optim.AdamW(fused=True)")
        for label, median in medians.items():
            print(f"  {label:34s} {median * 1e3:6.1f} ms  {median / fused:.2f}×")


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in ("before", "blocks", "sums", "adam"):
        raise SystemExit(__doc__)
    if sys.argv[1] == "sums":
        sums()
    else:
        {"before": before, "blocks": blocks, "adam": adam}[sys.argv[1]](int(sys.argv[2]))
