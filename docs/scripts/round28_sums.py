"""Round 28: what spec §0.2's float64 sums cost the learning-rate-free steps on torch's CPU default path.

    python docs/scripts/round28_sums.py ROUNDS

Prodigy, D-Adapt SGD, D-Adapt Adam and DoG through the torch adapter's default path on ResNet-18
shapes (float32 parameters), as they are (each product of a sum stored in float64 as it is made,
``adaptlr._inplace.mul_for_sum``, and summed in float64) and with the sums patched to float32
(``x·y`` in float32, summed in float32, the total then widened: not spec §0.2, an experiment),
against the upstream PyTorch optimizer on the same tensors (``adaptlr bench``'s); interleaved as
``adaptlr bench`` times (``time_runners``: one warm-up round); median ms and × upstream.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAMES = ("prodigy", "dadapt_sgd", "dadapt_adam", "dog")


def main(rounds: int) -> None:
    import torch
    from round11_ab import _params
    from round12_ab import _adapter

    import adaptlr
    import adaptlr._reduce as reduce_module
    from adaptlr._inplace import mul_
    from adaptlr.backends.bench import Runner, _upstream_torch, time_runners

    modules = [sys.modules[m] for m in ("adaptlr.prodigy", "adaptlr.dadapt", "adaptlr.dog")]
    originals = [m.mul_for_sum for m in modules]
    total = reduce_module.Reducer.total

    def total_narrow(self: object, terms: object, dtype: object = None) -> object:
        result = total(self, terms, None)
        return result if dtype is None else self.xp.astype(result, dtype)  # type: ignore[attr-defined]

    def narrow(x: object, y: object, dtype: object, *, x_temporary: bool = False) -> object:
        return mul_(x, y) if x_temporary else x * y  # type: ignore[operator]

    def patched(on: bool) -> None:
        reduce_module.Reducer.total = total_narrow if on else total  # type: ignore[method-assign]
        for module, original in zip(modules, originals, strict=True):
            module.mul_for_sum = narrow if on else original

    runners: list[Runner] = []
    for name in NAMES:
        for narrow_sums in (False, True):
            patched(narrow_sums)
            step = _adapter(getattr(adaptlr, name)())
            patched(False)

            def run(step: Callable[[], None] = step, on: bool = narrow_sums) -> None:
                patched(on)
                try:
                    step()
                finally:
                    patched(False)

            runners.append(Runner("resnet18", "torch", name, "float32 sums" if narrow_sums else "float64 sums",
                                  "adaptlr", run))
        found = _upstream_torch(name)
        assert found is not None, name
        params = _params()
        native = found[1](params)
        generator = torch.Generator().manual_seed(0)
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator) * 0.01
        native.step()
        runners.append(Runner("resnet18", "torch", name, "upstream", "native", native.step))
    time_runners(runners, rounds)  # adaptlr bench's interleaved rounds, one warm-up round
    print(f"torch adapter default path, ResNet-18 shapes, {rounds} interleaved rounds; median ms, × upstream")
    medians = {(r.algorithm, r.path): statistics.median(r.times) for r in runners}
    for (name, kind), median in medians.items():
        print(f"  {name:12s} {kind:13s} {median * 1e3:6.1f} ms  {median / medians[(name, 'upstream')]:.2f}×")

if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    main(int(sys.argv[1]))
