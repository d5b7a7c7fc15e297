"""``adaptlr bench --gpu-suite``: the conformance suite and the benchmark on the GPU backends, one report.

What it runs, in this order:

1. **Conformance** on ``torch-cuda``, ``jax-gpu`` and ``cupy``: every registered algorithm on its
   primary problem, ``K = 100`` steps, float64 and float32, against the NumPy float64 run (the rows
   of ``adaptlr conformance --backends torch-cuda jax-gpu cupy --steps 100 --no-checks``). The
   analytic and reference-library checks are left out: they do not depend on the device and CI runs
   them.
2. **Benchmark** (:mod:`adaptlr.backends.bench`), ResNet-18 shapes then 500 small tensors, AdamW and
   every wrapper (active, autodrop, hypergradient, dsa, eg_step_size): torch on CUDA (functional
   ``pure``; the adapter's default, ``fast="foreach"``, the same over chunks of the largest
   tensor's eighth (``adapter-foreach-chunks``: the launches chunks cost), list and, for AdamW on ResNet-18,
   ``fast="compile"`` and ``"compile-flat"``; ``flat``) against ``torch.optim.AdamW(foreach=True)`` /
   ``(fused=True)``; JAX on ``jax.devices("gpu")[0]`` (``jit-donate``; AdamW also ``jit``) against
   ``optax.adamw``; CuPy (``pure``, ``flat``) against the copy bound; every backend's copy bound.
   Peak extra memory of a step from the device allocators (``torch.cuda.max_memory_allocated``,
   XLA's ``memory_analysis()``, CuPy's memory pool) and, for torch, the aten ops (kernel launches)
   of a step.
3. **One JSON** (``{"meta", "conformance": {"rows", "summary"}, "benchmark": {"rows", "summary"}}``)
   and **one Markdown** report with every planned row. A row that cannot run is there with status
   ``skipped`` and the reason (no CUDA device, CuPy not installed, JAX has no GPU device, the time
   budget spent); a benchmark row that ran has status ``ran``.

Exit status: 0 when no row failed (skips are not failures), 1 when one did.

Time budget (8 minutes on one GPU): conformance is given until :data:`CONFORMANCE_DEADLINE_S` and
the benchmark until :data:`BENCH_DEADLINE_S` after the start; an algorithm or benchmark group that
would start later is reported as skipped (time budget), so the suite ends within the budget plus
the one group running at the deadline. The estimate the plan is sized by is in
``docs/performance.md`` ("GPU suite").
"""

from __future__ import annotations

import gc
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = [
    "BENCH_ALGORITHMS",
    "BENCH_DEADLINE_S",
    "BUILDERS",
    "CONFORMANCE_DEADLINE_S",
    "CONFORMANCE_DTYPES",
    "CONFORMANCE_STEPS",
    "GPU_BACKENDS",
    "BenchGroup",
    "bench_plan",
    "run_suite",
]

GPU_BACKENDS = ("torch-cuda", "jax-gpu", "cupy")
CONFORMANCE_DTYPES = ("float64", "float32")
CONFORMANCE_STEPS = 100
BENCH_ALGORITHMS = ("adamw", "active", "autodrop", "hypergradient", "dsa", "eg_step_size")
BENCH_SETS = ("resnet18", "small500")
BENCH_REPEATS = 5
CONFORMANCE_DEADLINE_S = 270.0
BENCH_DEADLINE_S = 450.0
NATIVES = {"torch-cuda": ("torch.optim.AdamW",), "jax-gpu": ("optax.adamw",), "cupy": ()}


@dataclass(frozen=True)
class BenchGroup:
    """One benchmark group: the runners of one GPU backend on one parameter set, timed together.

    Attributes:
        backend: the conformance backend it needs (``"torch-cuda"``, ``"jax-gpu"``, ``"cupy"``).
        set: the parameter set (a key of ``adaptlr.backends.bench.SETS``).
        algorithms: the adaptlr algorithms (names in ``adaptlr.backends.bench.ALGORITHMS``).
        compile_algorithms: the algorithms also run through ``torch.compile`` (torch only).
    """

    backend: str
    set: str
    algorithms: tuple[str, ...]
    compile_algorithms: tuple[str, ...] = ()

    def planned(self) -> list[str]:
        """The ``algorithm`` names its rows carry: the adaptlr algorithms, the natives, the copy bound."""
        return [*self.algorithms, *NATIVES[self.backend], "copy"]


def bench_plan(sets: Sequence[str] = BENCH_SETS, algorithms: Sequence[str] = BENCH_ALGORITHMS) -> list[BenchGroup]:
    """The benchmark groups, set by set (ResNet-18 first: the most informative rows run first).

    ``torch.compile`` runs for AdamW on ResNet-18 only: compiling the 500-tensor list step takes
    minutes, more than the budget allows.
    """
    return [BenchGroup(backend, set_name, tuple(algorithms),
                       ("adamw",) if backend == "torch-cuda" and set_name == "resnet18" and "adamw" in algorithms
                       else ())
            for set_name in sets for backend in GPU_BACKENDS]


# -- the runners of each GPU backend ---------------------------------------------------------------------


def _torch_cuda(group: BenchGroup, shapes: list) -> list:
    from adaptlr.backends.bench import torch_runners

    return torch_runners(group.set, shapes, group.algorithms, "cuda", group.compile_algorithms)


def _jax_gpu(group: BenchGroup, shapes: list) -> list:
    import jax

    from adaptlr.backends.bench import jax_runners

    # Wrappers donated only: each extra compilation of a 500-tensor step costs seconds on the budget.
    return jax_runners(group.set, shapes, group.algorithms, device=jax.devices("gpu")[0], undonated=("adamw",))


def _cupy(group: BenchGroup, shapes: list) -> list:
    from adaptlr.backends.bench import cupy_runners

    return cupy_runners(group.set, shapes, group.algorithms)


BUILDERS: dict[str, Callable[[BenchGroup, list], list]] = {
    "torch-cuda": _torch_cuda, "jax-gpu": _jax_gpu, "cupy": _cupy,
}


def _release(backend: str) -> None:
    """Give the device memory of a finished group back (the next group gets the whole device)."""
    gc.collect()
    try:
        if backend == "torch-cuda":
            import torch

            torch.cuda.empty_cache()
        elif backend == "jax-gpu":
            import jax

            jax.clear_caches()
        elif backend == "cupy":
            import cupy

            cupy.get_default_memory_pool().free_all_blocks()
    except Exception:  # releasing is best effort; the next group still runs
        pass


# -- the two sections ----------------------------------------------------------------------------------------


def _reason(backend: str) -> str | None:
    from adaptlr.conformance.backends import BACKENDS

    return BACKENDS[backend].unavailable_reason()


def run_conformance(backends: Sequence[str], algorithms: Sequence[str], dtypes: Sequence[str], steps: int,
                    deadline: float) -> list:
    """Agreement rows of ``algorithms`` on ``backends``: unavailable backends as one skipped row per
    dtype (``extra["planned_algorithms"]``: how many algorithms it would have run), and each algorithm
    that would start after ``deadline`` (a ``time.perf_counter()`` value) as one skipped row."""
    from adaptlr.conformance.runner import Row, run_agreement

    rows = run_agreement([], backends, dtypes, steps)  # the skipped backends, nothing run
    for row in rows:
        row.extra["planned_algorithms"] = len(algorithms)
    usable = [b for b in backends if _reason(b) is None]
    if not usable:
        return rows
    if any(b.startswith("jax") for b in usable):
        from adaptlr.conformance.backends import enable_jax_x64

        enable_jax_x64()
    for name in algorithms:
        if time.perf_counter() > deadline:
            rows.append(Row("agreement", name, "*", ",".join(usable), "*", "*", steps, status="skipped",
                            reason="the suite's time budget for conformance was spent"))
            continue
        print(f"  conformance {name}", file=sys.stderr)
        rows += run_agreement([name], usable, dtypes, steps)
    return rows


def _skipped_rows(group: BenchGroup, reason: str) -> list[dict]:
    return [{"set": group.set, "backend": group.backend, "algorithm": name, "path": "*", "status": "skipped",
             "reason": reason} for name in group.planned()]


def run_group(group: BenchGroup, repeats: int) -> list[dict]:
    """The rows of one benchmark group: measured (status ``ran``), or skipped / failed with the reason."""
    from adaptlr.backends.bench import SETS, summarise, time_runners

    reason = _reason(group.backend)
    if reason is not None:
        return _skipped_rows(group, reason)
    shapes = SETS[group.set]
    try:
        runners = BUILDERS[group.backend](group, shapes)
    except ImportError as error:  # an optional library of the group (optax, ...) is missing
        return _skipped_rows(group, f"{type(error).__name__}: {error}")
    except Exception as error:
        return [{"set": group.set, "backend": group.backend, "algorithm": "*", "path": "*", "status": "fail",
                 "reason": f"building the runners raised {type(error).__name__}: {error}"}]
    try:
        time_runners(runners, repeats)
        rows = summarise(runners, shapes, memory=True)
    except Exception as error:
        return [{"set": group.set, "backend": group.backend, "algorithm": "*", "path": "*", "status": "fail",
                 "reason": f"a step raised {type(error).__name__}: {error}"}]
    finally:
        del runners
        _release(group.backend)
    for row in rows:
        row.update(backend=group.backend, status="ran", reason="")
    seen = {row["algorithm"] for row in rows}
    for name in group.planned():  # a planned runner that was not built (the bench prints why on stderr)
        if name not in seen:
            rows.append({"set": group.set, "backend": group.backend, "algorithm": name, "path": "*",
                         "status": "fail", "reason": "no runner was built (see stderr)"})
    return rows


def run_benchmark(groups: Sequence[BenchGroup], repeats: int, deadline: float) -> list[dict]:
    """Every group's rows; groups that would start after ``deadline`` are skipped (time budget)."""
    rows: list[dict] = []
    for group in groups:
        if time.perf_counter() > deadline:
            rows += _skipped_rows(group, "the suite's time budget for the benchmark was spent")
            continue
        print(f"  bench {group.backend} / {group.set}", file=sys.stderr)
        rows += run_group(group, repeats)
    return rows


# -- the report ------------------------------------------------------------------------------------------------


def _count(statuses: Sequence[str]) -> str:
    counts: dict[str, int] = {}
    for status in statuses:
        counts[status] = counts.get(status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items())) or "no rows"


def _markdown(meta: dict, conformance: list, bench_rows: list[dict]) -> str:
    from adaptlr.backends.bench import table
    from adaptlr.conformance import report

    measured = [row for row in bench_rows if row["status"] == "ran"]
    others = [row for row in bench_rows if row["status"] != "ran"]
    lines = ["# adaptlr GPU suite", "",
             f"Command: `{meta['command']}`; wall time {meta['wall_s']:.0f} s; machine: {json.dumps(meta['machine'])}",
             "", f"## Conformance ({meta['conformance']['summary']})", "", report.markdown(conformance),
             f"## Benchmark ({meta['benchmark']['summary']})", ""]
    if measured:
        lines += [table(measured, markdown=True), ""]
    if others:
        lines += ["Not measured:", "", table(others, markdown=True, columns=[
            ("set", "set"), ("backend", "backend"), ("algorithm", "algorithm"), ("path", "path"),
            ("status", "status"), ("reason", "reason")]), ""]
    return "\n".join(lines)


def run_suite(json_path: str | None = None, markdown_path: str | None = None, *,
              backends: Sequence[str] = GPU_BACKENDS, algorithms: Sequence[str] | None = None,
              dtypes: Sequence[str] = CONFORMANCE_DTYPES, steps: int = CONFORMANCE_STEPS,
              groups: Sequence[BenchGroup] | None = None, repeats: int = BENCH_REPEATS,
              conformance_deadline_s: float = CONFORMANCE_DEADLINE_S,
              bench_deadline_s: float = BENCH_DEADLINE_S) -> int:
    """Run the GPU suite, print a summary, write the reports; the exit status.

    Args:
        json_path: where to write the JSON report (None: not written).
        markdown_path: where to write the Markdown report (None: not written).
        backends: the conformance backends (default: the three GPU backends).
        algorithms: the conformance algorithms (None: every registered one).
        dtypes: the conformance dtypes.
        steps: K, the steps of every conformance run.
        groups: the benchmark groups (None: :func:`bench_plan`).
        repeats: timed rounds of each benchmark group.
        conformance_deadline_s: seconds after the start past which no conformance algorithm starts.
        bench_deadline_s: seconds after the start past which no benchmark group starts.

    Returns:
        0 when no row failed, 1 when one did.
    """
    from adaptlr.backends.bench import machine
    from adaptlr.conformance.algorithms import ALGORITHMS

    started = time.perf_counter()
    algorithms = list(ALGORITHMS) if algorithms is None else list(algorithms)
    groups = bench_plan() if groups is None else list(groups)
    if any(b.startswith("jax") and _reason(b) is None for b in [*backends, *(g.backend for g in groups)]):
        import jax

        jax.config.update("jax_enable_x64", True)  # float64 conformance runs; float32 runs are unaffected
    print("adaptlr GPU suite: conformance", file=sys.stderr)
    conformance = run_conformance(backends, algorithms, dtypes, steps, started + conformance_deadline_s)
    conformance_s = time.perf_counter() - started
    print("adaptlr GPU suite: benchmark", file=sys.stderr)
    bench_rows = run_benchmark(groups, repeats, started + bench_deadline_s)
    wall = time.perf_counter() - started
    records = [row.record() for row in conformance]
    meta = {
        "command": "adaptlr bench --gpu-suite" + (f" --json {json_path}" if json_path else "")
                   + (f" --markdown {markdown_path}" if markdown_path else ""),
        "machine": machine(), "wall_s": wall, "conformance_s": conformance_s, "bench_s": wall - conformance_s,
        "plan": {"conformance": {"backends": list(backends), "algorithms": len(algorithms), "dtypes": list(dtypes),
                                 "steps": steps, "deadline_s": conformance_deadline_s},
                 "benchmark": {"groups": [f"{g.backend}/{g.set}" for g in groups], "repeats": repeats,
                               "deadline_s": bench_deadline_s}},
        "conformance": {"summary": _count([r["status"] for r in records])},
        "benchmark": {"summary": _count([r["status"] for r in bench_rows])},
    }
    print(f"conformance: {meta['conformance']['summary']}; benchmark: {meta['benchmark']['summary']}; "
          f"wall time {wall:.1f} s")
    for record in [*records, *bench_rows]:
        if record["status"] == "fail":
            print(f"  FAIL {record['backend']} {record['algorithm']}: {record['reason']}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"meta": meta, "conformance": {"rows": records, "summary": meta["conformance"]["summary"]},
                       "benchmark": {"rows": bench_rows, "summary": meta["benchmark"]["summary"]}},
                      f, indent=1, default=str)
    if markdown_path:
        with open(markdown_path, "w") as f:
            f.write(_markdown(meta, conformance, bench_rows))
    failed = any(r["status"] == "fail" for r in [*records, *bench_rows])
    return 1 if failed else 0
