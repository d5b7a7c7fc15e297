"""Round 26: the JAX epoch-boundary loops writing their carry in place (issue 20 target 5).

    python docs/scripts/round26_boundary.py temps [BEFORE]        # XLA temporaries of the jitted steps
    python docs/scripts/round26_boundary.py same BEFORE           # the same numbers as BEFORE, bit for bit
    python docs/scripts/round26_boundary.py ab BEFORE ROUNDS S    # JAX step times, BEFORE against this checkout

``temps``: ``jit_step(opt, donate=...).compile(...).memory_analysis().temp_size_in_bytes`` of
ActiveLR(AdamW) and AutoDrop(AdamW) (and AutoDrop's weighted average) on ResNet-18 shapes and on 500
tensors of 32×64, float32 parameters, float64 sums (``jax_enable_x64``), in MiB and × the largest
tensor; with ``BEFORE`` (a commit) the same from its package first. Deterministic on a given jax.

``same``: 40 steps over epoch boundaries (ActiveLR with S = 3; AutoDrop with drops, plain and
averaged) on NumPy, JAX ``jit_step`` with and without donation, and the torch adapter's list,
foreach and default paths, float32 and float64; prints the keys whose final parameters differ from
``BEFORE``'s (a hash of their bytes), and the number of drops.

``ab``: interleaved processes of each side (one round: a worker per side, in a random order); a
worker times ``STEPS`` jitted steps of AdamW, ActiveLR(AdamW) and AutoDrop(AdamW) with
``steps_per_epoch=S`` (100: ordinary steps, as ``adaptlr bench``; 1: every step at a boundary), with
and without donation, interleaved, and reports medians; printed per side the median over rounds,
× AdamW on the same path, and each round's median.

``BEFORE`` is a commit, checked out as ``docs/scripts/round24_ab.py`` does (a worktree under
/tmp/adaptlr-ab, its package imported instead of this checkout's editable install).
"""

from __future__ import annotations

import hashlib
import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round24_ab import _tree  # (the same checkout of BEFORE)

STEPS = 15


def _import_from(package: str) -> None:
    if package != "-":  # the worktree's adaptlr, not this checkout's editable install
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "")]
        sys.path.insert(0, package)


def _run_side(mode: str, package: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "_" + mode, package, *args], check=True, capture_output=True,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def temps_worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import adaptlr
    from adaptlr.backends.bench import RESNET18_SHAPES, SMALL_SHAPES
    from adaptlr.backends.fast import jit_step

    makers = {
        "active(adamw)": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=100),
        "autodrop(adamw)": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100),
        "autodrop(adamw), average": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=100, average=True),
    }
    rng = np.random.default_rng(0)
    result = {}
    for set_name, shapes in (("resnet18", RESNET18_SHAPES), ("small500", SMALL_SHAPES)):
        params = [jnp.asarray(rng.standard_normal(s), dtype=jnp.float32) for s in shapes]
        largest = max(int(np.prod(s)) for s in shapes) * 4
        for name, make in makers.items():
            for donate in (False, True):
                opt = make()
                compiled = jit_step(opt, donate=donate).compile(params, opt.init(params), params)
                temp = compiled.memory_analysis().temp_size_in_bytes
                result[f"{set_name} | {name} | {'jit-donate' if donate else 'jit'}"] = [temp / 2**20, temp / largest]
    return result


def same_worker() -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    jax.config.update("jax_enable_x64", True)
    import adaptlr
    from adaptlr.backends.fast import jit_step
    from adaptlr.backends.torch import Optimizer

    shapes = [(8, 5), (7,), (3, 2, 2)]
    makers = {
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-2), steps_per_epoch=3),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.adamw(1e-2), steps_per_epoch=3, theta=20.0, theta_max=50.0,
                                             patience_epochs=1),
        "autodrop-average": lambda: adaptlr.autodrop(adaptlr.sgd(1e-2, momentum=0.9), steps_per_epoch=2, theta=20.0,
                                                     theta_max=50.0, average=True, patience_epochs=2),
    }
    result: dict = {}
    for dtype in ("float64", "float32"):
        for name, make in makers.items():
            rng = np.random.default_rng(1)
            start = [rng.standard_normal(s).astype(dtype) for s in shapes]
            noise = [[(0.01 * rng.standard_normal(s)).astype(dtype) for s in shapes] for _ in range(40)]
            finals = {}
            opt = make()
            params = [x.copy() for x in start]
            state = opt.init(params)
            for n in noise:  # f = ‖θ‖²/2 plus noise
                updates, state = opt.update([e + p for e, p in zip(n, params)], state, params)
                params = adaptlr.apply_updates(params, updates)
            finals["numpy"] = params
            if name != "active":
                result[f"{dtype}/{name} drops"] = int(state.adaptations[0].drop_count)
            for donate in (False, True):
                opt = make()
                params = [jnp.asarray(x) for x in start]
                state = opt.init(params)
                step = jit_step(opt, donate=donate)
                for n in noise:
                    params, state = step([jnp.asarray(e) + p for e, p in zip(n, params)], state, params)
                finals[f"jax {'jit-donate' if donate else 'jit'}"] = [np.asarray(p) for p in params]
            for fast in (False, "foreach", "auto"):
                tensors = [torch.nn.Parameter(torch.from_numpy(x.copy())) for x in start]
                torch_opt = Optimizer(tensors, make(), fast=fast)
                for n in noise:
                    for p, e in zip(tensors, n):
                        p.grad = torch.from_numpy(e) + p.detach()
                    torch_opt.step()
                finals[f"torch fast={fast}"] = [p.detach().numpy().copy() for p in tensors]
            for path, arrays in finals.items():
                digest = hashlib.sha1(b"".join(np.ascontiguousarray(a).tobytes() for a in arrays)).hexdigest()
                result[f"{dtype}/{name}/{path}"] = digest
    return result


def ab_worker(steps_per_epoch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    jax.config.update("jax_enable_x64", True)
    import adaptlr
    from adaptlr.backends.bench import RESNET18_SHAPES
    from adaptlr.backends.fast import jit_step

    makers = {
        "adamw": lambda: adaptlr.adamw(1e-3),
        "active": lambda: adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=steps_per_epoch),
        "autodrop": lambda: adaptlr.autodrop(adaptlr.adamw(1e-3), steps_per_epoch=steps_per_epoch),
    }
    rng = np.random.default_rng(0)
    host = [(rng.standard_normal(s) * 0.1).astype(np.float32) for s in RESNET18_SHAPES]
    grads = [jnp.asarray(rng.standard_normal(s).astype(np.float32)) for s in RESNET18_SHAPES]
    runners = {}
    for name, make in makers.items():
        for donate in (False, True):
            opt = make()
            box = {"params": [jnp.asarray(h) for h in host]}
            box["state"] = opt.init(box["params"])
            step = jit_step(opt, donate=donate)

            def run(step=step, box=box) -> None:
                box["params"], box["state"] = step(grads, box["state"], box["params"])
                jax.block_until_ready(box["params"])

            for _ in range(3):
                run()
            runners[f"{name} {'jit-donate' if donate else 'jit'}"] = run
    times: dict[str, list[float]] = {key: [] for key in runners}
    for _ in range(STEPS):
        for key in random.sample(list(runners), len(runners)):
            start = time.perf_counter()
            runners[key]()
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(t) * 1e3 for key, t in times.items()}


def main(argv: list[str]) -> None:
    if argv and argv[0].startswith("_"):
        _import_from(argv[1])
        worker = {"_temps": temps_worker, "_same": same_worker}.get(argv[0])
        print(json.dumps(worker() if worker else ab_worker(int(argv[2]))))
        return
    if not argv or argv[0] not in ("temps", "same", "ab") or (argv[0] != "temps" and len(argv) < 2):
        raise SystemExit(__doc__)
    before = str(_tree(argv[1])) if len(argv) > 1 else None
    if argv[0] == "temps":
        after = _run_side("temps", "-")
        old = _run_side("temps", before) if before else {}
        print("| set | step | path | XLA temp MiB | × largest tensor |" + (" before |" if old else ""))
        for key, (mib, ratio) in after.items():
            was = f" {old[key][0]:.2f} MiB, {old[key][1]:.2f}× |" if key in old else ""
            print(f"| {key} | {mib:.2f} | {ratio:.2f} |{was}")
    elif argv[0] == "same":
        old, new = _run_side("same", before), _run_side("same", "-")
        print("differ:", [key for key in new if old.get(key) != new[key]] or "none", "of", len(new))
        print({key: value for key, value in new.items() if key.endswith("drops")})
    else:
        rounds, steps_per_epoch = int(argv[2]), argv[3]
        results: dict[str, list[dict]] = {"before": [], "after": []}
        for _ in range(rounds):
            for side in random.sample(list(results), 2):
                results[side].append(_run_side("ab", before if side == "before" else "-", steps_per_epoch))
        print(f"JAX, ResNet-18 shapes, steps_per_epoch={steps_per_epoch}, {rounds} rounds of {STEPS} steps; "
              "median ms, × AdamW on the same path, each round's median")
        for key in results["after"][0]:
            for side, runs in results.items():
                ms = [r[key] for r in runs]
                base = "adamw " + key.split()[1]
                ratio = statistics.median(r[key] / r[base] for r in runs)
                print(f"  {key:20s} {side:7s} {statistics.median(ms):7.1f}  {ratio:.2f}×  "
                      + " ".join(f"{m:.0f}" for m in ms))


if __name__ == "__main__":
    main(sys.argv[1:])
