"""``adaptlr reproduce NAME [--dataset digits|mnist1d] [--quick] [--backend B] [--seeds N] [--out DIR]``.

Runs one experiment (or ``all``), writes ``DIR/NAME.md`` (``DIR/NAME_mnist1d.md`` on MNIST-1D: the
table, the computed verdicts and the measurements) and PNG plots into ``DIR``, and prints the report.
Exit status 0 when every requested experiment ran, 1 when one could not (an algorithm missing from
this adaptlr, or an optional dependency missing: reported before any training starts), 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from adaptlr.reproduce import EXPERIMENTS
from adaptlr.reproduce.data import DATASETS, missing_modules
from adaptlr.reproduce.harness import AlgorithmMissing, Settings

__all__ = ["main", "run_experiment"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaptlr reproduce",
        description="Small-scale reproductions of the papers' claims on scikit-learn's digits or MNIST-1D.",
    )
    parser.add_argument("name", choices=[*EXPERIMENTS, "all"], help="the experiment to run")
    parser.add_argument("--dataset", choices=list(DATASETS), default="digits",
                        help="digits (default; scikit-learn's 8x8 images) or mnist1d (generated locally)")
    parser.add_argument("--quick", action="store_true", help="a small configuration (under a minute each)")
    parser.add_argument("--backend", default="numpy", help="array backend: numpy (default), torch, jax, ...")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default: per experiment)")
    parser.add_argument("--out", type=Path, default=Path("reproductions"), help="output folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def supported(name: str) -> tuple[str, ...]:
    """The datasets experiment ``name`` runs on: its module's ``DATASETS`` (digits alone when it has none)."""
    return tuple(getattr(importlib.import_module(f"adaptlr.reproduce.{name}"), "DATASETS", ("digits",)))


def run_experiment(name: str, settings: Settings):  # -> report.Result
    """Run experiment ``name`` with ``settings``, write its files, and return its Result."""
    module = importlib.import_module(f"adaptlr.reproduce.{name}")
    result = module.run(settings)
    result.write(settings.out)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    """The ``adaptlr reproduce`` command; returns the exit status."""
    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exit_:
        return int(exit_.code or 0)
    from adaptlr.conformance.backends import BACKENDS

    backend = BACKENDS.get(args.backend)
    if backend is None:
        print(f"adaptlr reproduce: unknown --backend {args.backend!r}; valid: {', '.join(BACKENDS)}", file=sys.stderr)
        return 2
    reason = backend.unavailable_reason()
    if reason:
        print(f"adaptlr reproduce: backend {args.backend} is not available: {reason}", file=sys.stderr)
        return 2
    if args.seeds is not None and args.seeds < 1:
        print("adaptlr reproduce: --seeds must be a positive integer", file=sys.stderr)
        return 2
    missing = missing_modules(args.dataset)
    if missing:
        print(f"adaptlr reproduce: {', '.join(missing)} not installed (needed for --dataset {args.dataset} and the "
              "plots); install them with `pip install adaptlr[reproduce]`. Nothing was run.", file=sys.stderr)
        return 1
    names = EXPERIMENTS if args.name == "all" else (args.name,)
    unsupported = [n for n in names if args.dataset not in supported(n)]
    if unsupported:
        print(f"adaptlr reproduce: {', '.join(unsupported)} cannot run on --dataset {args.dataset} (only on "
              f"{', '.join(supported(unsupported[0]))}). Nothing was run.", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.quick, backend, args.seeds, args.out, progress=not args.no_progress,
                        dataset=args.dataset)
    status = 0
    for name in names:
        start = time.perf_counter()
        try:
            result = run_experiment(name, settings)
        except (AlgorithmMissing, ImportError) as error:
            print(f"adaptlr reproduce {name}: skipped: {error}", file=sys.stderr)
            status = 1
            continue
        print(result.markdown())
        print(f"({name} on {args.dataset}: {time.perf_counter() - start:.1f} s on {backend.name}; written to "
              f"{args.out / result.name}.md)\n")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
