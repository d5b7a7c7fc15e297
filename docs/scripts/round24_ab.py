"""A/B timings of round 24 against an earlier commit: each side in its own processes, interleaved.

    python docs/scripts/round24_ab.py torch BEFORE ROUNDS [ALGORITHMS]   # torch adapter, default path
    python docs/scripts/round24_ab.py numpy BEFORE ROUNDS [ALGORITHMS]   # NumPy functional update + apply

``BEFORE`` is a commit (checked out with ``git worktree`` under /tmp/adaptlr-ab/<commit>/src, kept
for later runs: ``git worktree remove --force /tmp/adaptlr-ab/<commit>/src`` removes it); the
"after" side is this checkout. Each round starts one worker process per side, in a fresh random
order; a worker builds every algorithm on ResNet-18 parameter shapes (float32, fixed random
gradients), runs 3 warm-up steps, then times ``STEPS`` steps of each algorithm interleaved and
reports their medians. Printed: per side and algorithm the median over rounds of those medians
(ms), its quartiles, and the ratio to AdamW of the same worker (median over rounds). ALGORITHMS:
comma-separated names from ``MAKERS`` (default: all). The two sides run the same interpreter and
installed packages: a worker of the before side imports adaptlr from the worktree, not from the
editable install of this checkout.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
STEPS = 7

MAKERS = {
    "adamw": "adaptlr.adamw(1e-3, weight_decay=0.01)",
    "dsa": "adaptlr.dsa(adaptlr.adamw(1e-3, weight_decay=0.01))",
    "hd per tensor": "adaptlr.hypergradient(adaptlr.adamw(1e-3, weight_decay=0.01), hyper_lr=1e-8, "
                     "granularity='tensor')",
    "eg per tensor": "adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), 1e-3, 1e-3, scale='tensor')",
    "ldog": "adaptlr.dog(layerwise=True)",
    "hd": "adaptlr.hypergradient(adaptlr.adamw(1e-3, weight_decay=0.01), hyper_lr=1e-8)",
    "eg": "adaptlr.eg_step_size(adaptlr.adamw(1e-3, weight_decay=0.01), 1e-3, 1e-3)",
    "active": "adaptlr.active(adaptlr.adamw(1e-3, weight_decay=0.01), steps_per_epoch=100)",
    "dadapt_sgd": "adaptlr.dadapt_sgd()",
    "prodigy": "adaptlr.prodigy()",
    "dadapt_adam": "adaptlr.dadapt_adam()",
    "dog": "adaptlr.dog()",
}


def _tree(commit: str) -> Path:
    """A package directory importing ``adaptlr`` (with ``adaptlr.backends``) as of ``commit``."""
    base = Path("/tmp/adaptlr-ab") / commit
    package = base / "pkg"
    if not package.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(base / "src"), commit],
                       check=True, capture_output=True)
        (package / "adaptlr").parent.mkdir(parents=True)
        subprocess.run(["cp", "-r", str(base / "src" / "adaptlr"), str(package / "adaptlr")], check=True)
        subprocess.run(["cp", "-r", str(base / "src" / "backends"), str(package / "adaptlr" / "backends")], check=True)
    return package


def worker(library: str, package: str, names: list[str]) -> None:
    """One worker: medians of ``STEPS`` interleaved steps per algorithm, as JSON on stdout."""
    if package != "-":  # the worktree's adaptlr, not this checkout's editable install
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path.insert(0, package)
    import numpy as np

    import adaptlr  # (the makers use it)
    from adaptlr.backends.bench import RESNET18_SHAPES

    steps = {}
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in RESNET18_SHAPES]
    grads = [rng.standard_normal(s).astype(np.float32) for s in RESNET18_SHAPES]
    for name in names:
        opt = eval(MAKERS[name])  # (the fixed expressions above)
        if library == "torch":
            import torch

            from adaptlr.backends.torch import Optimizer

            params = [torch.nn.Parameter(torch.from_numpy(h.copy())) for h in host]
            for p, g in zip(params, grads):
                p.grad = torch.from_numpy(g)
            steps[name] = Optimizer(params, opt).step
        else:
            box = {"params": [h.copy() for h in host]}
            box["state"] = opt.init(box["params"])

            def step(opt=opt, box=box) -> None:
                updates, box["state"] = opt.update(grads, box["state"], box["params"])
                box["params"] = adaptlr.apply_updates(box["params"], updates)

            steps[name] = step
        for _ in range(3):
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(STEPS):
        for name in random.sample(names, len(names)):
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    import adaptlr.backends.torch as backend

    sources = {adaptlr.__file__, backend.__file__}
    print(json.dumps({"_sources": sorted(sources), **{name: statistics.median(t) * 1e3 for name, t in times.items()}}))


def compare(library: str, before: str, rounds: int, names: list[str]) -> None:
    sides = {f"before ({before})": str(_tree(before)), "after (this checkout)": "-"}
    results: dict[str, list[dict]] = {side: [] for side in sides}
    for _ in range(rounds):
        for side in random.sample(list(sides), len(sides)):
            out = subprocess.run([sys.executable, __file__, "_worker", library, sides[side], ",".join(names)],
                                 check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            expected = str(ROOT) if sides[side] == "-" else sides[side]
            if not all(source.startswith(expected) for source in result["_sources"]):
                raise SystemExit(f"{side} imported {result['_sources']}, not from {expected}")
            results[side].append(result)
    print(f"{library}, ResNet-18 shapes, {rounds} rounds of {STEPS} steps; median ms [quartiles], × AdamW")
    for name in names:
        for side, runs in results.items():
            ms = [r[name] for r in runs]
            q = statistics.quantiles(ms, n=4) if len(ms) > 1 else [ms[0]] * 3
            ratio = statistics.median(r[name] / r["adamw"] for r in runs) if "adamw" in names else float("nan")
            print(f"  {name:14s} {side:28s} {statistics.median(ms):7.1f} [{q[0]:.1f}, {q[2]:.1f}]  {ratio:.2f}×")


def main(argv: list[str]) -> None:
    if argv and argv[0] == "_worker":
        worker(argv[1], argv[2], argv[3].split(","))
        return
    if len(argv) < 3 or argv[0] not in ("torch", "numpy"):
        raise SystemExit(__doc__)
    names = argv[3].split(",") if len(argv) > 3 else list(MAKERS)
    if "adamw" not in names:
        names.insert(0, "adamw")
    compare(argv[0], argv[1], int(argv[2]), names)


if __name__ == "__main__":
    main(sys.argv[1:])
