"""``adaptlr conformance``: run the conformance suite and print (and optionally save) the report.

    adaptlr conformance [--backends ...] [--dtypes ...] [--algorithms ...] [--problems ...] [--all-problems] [--steps N]
                        [--checks ...] [--no-checks] [--json PATH] [--markdown PATH] [--html PATH] [--quiet]
                        [--full] [--width N]

Exit status 0 when no row fails, 1 when one does, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from collections.abc import Sequence

__all__ = ["main"]


def _names(values: Sequence[str] | None) -> list[str] | None:
    if values is None:
        return None
    return [n.strip() for v in values for n in v.split(",") if n.strip()]


def _check(kind: str, given: list[str] | None, valid: Sequence[str]) -> list[str]:
    if given is None:
        return list(valid)
    unknown = [n for n in given if n not in valid]
    if unknown:
        raise SystemExit(f"adaptlr conformance: unknown {kind} {', '.join(map(repr, unknown))}; "
                         f"valid: {', '.join(valid)}")
    return given


def _versions() -> str:
    from importlib import metadata

    found = []
    for name in ("adaptlr", "numpy", "array-api-compat", "array-api-strict", "torch", "jax", "optax", "cupy",
                 "adabelief-pytorch"):
        try:
            found.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ", ".join(found)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adaptlr conformance",
                                description="Cross-backend agreement and analytic checks of adaptlr's algorithms.")
    p.add_argument("--backends", nargs="+", help="backends (default: all; missing ones are reported as skipped)")
    p.add_argument("--dtypes", nargs="+", help="float64 and/or float32 (default: both)")
    p.add_argument("--algorithms", nargs="+", help="registry names (default: all)")
    p.add_argument("--problems", nargs="+", help="restrict the agreement runs to these problems")
    p.add_argument("--all-problems", action="store_true",
                   help="run every algorithm on all its problems (default: its first, primary one)")
    p.add_argument("--steps", type=int, default=150, help="steps K of every agreement run (>= 1; default 150)")
    p.add_argument("--checks", nargs="+", help="analytic checks to run (default: all)")
    p.add_argument("--no-checks", action="store_true", help="only the cross-backend agreement rows")
    p.add_argument("--json", metavar="PATH", help="write one record per row as JSON")
    p.add_argument("--markdown", metavar="PATH", help="write the table as Markdown")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the summary line")
    p.add_argument("--full", action="store_true",
                   help="print every row in one wide table (default: the algorithm × backend matrix, the checks, "
                        "and the failing rows in full)")
    p.add_argument("--width", type=int, default=100, help="width of the terminal summary (default 100)")
    p.add_argument("--html", metavar="PATH", help="write a self-contained HTML report (heatmap, plots)")
    p.add_argument("--list", action="store_true", help="list backends, algorithms, problems and checks")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from adaptlr.conformance import analytic, report, runner, views
    from adaptlr.conformance.algorithms import ALGORITHMS
    from adaptlr.conformance.backends import BACKENDS, enable_jax_x64
    from adaptlr.conformance.problems import PROBLEMS

    args = parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.list:
        for title, names in (("backends", BACKENDS), ("dtypes", runner.DTYPES), ("algorithms", ALGORITHMS),
                             ("problems", PROBLEMS), ("checks", analytic.CHECKS)):
            print(f"{title}: {', '.join(names)}")
        return 0
    try:
        backends = _check("backend", _names(args.backends), list(BACKENDS))
        dtypes = _check("dtype", _names(args.dtypes), list(runner.DTYPES))
        algorithms = _check("algorithm", _names(args.algorithms), list(ALGORITHMS))
        problems = _check("problem", _names(args.problems), list(PROBLEMS)) if args.problems else None
        checks = [] if args.no_checks else _check("check", _names(args.checks), list(analytic.CHECKS))
    except SystemExit as error:
        print(error, file=sys.stderr)
        return 2
    if args.steps < 1:
        print("adaptlr conformance: --steps must be a positive integer", file=sys.stderr)
        return 2
    if any(BACKENDS[b].library == "jax" and BACKENDS[b].available for b in backends):
        enable_jax_x64()

    # The rows actually run: unavailable backends are reported as skipped rows, not run.
    total = runner.planned_runs(algorithms, backends, dtypes, problems, args.all_problems) + len(checks)
    progress = report.Progress(total, enabled=not args.quiet)
    start = time.perf_counter()
    try:
        rows = runner.run_agreement(algorithms, backends, dtypes, args.steps, progress, problems=problems,
                                    all_problems=args.all_problems)
        usable = [BACKENDS[b] for b in backends if BACKENDS[b].available]
        rows += analytic.run_checks(usable, args.steps, progress, checks) if checks else []
    finally:
        progress.close()
    seconds = time.perf_counter() - start
    meta = {"command": "adaptlr conformance " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.machine()}, {platform.system()}, Python {platform.python_version()}",
            "seconds": round(seconds, 1), "steps": args.steps,
            "tolerance": "100·sqrt(K)·eps(dtype)·c_problem·c_algorithm + 4·eps(float64)·κ_scalars·c_problem "
                         "(adaptlr.conformance.tolerances)"}
    meta["versions"] = _versions()
    if args.quiet:
        print(report.summary(rows))
    else:
        print(report.table(rows) if args.full else views.terminal_summary(rows, width=args.width))
        print(f"{len(rows)} rows in {seconds:.1f} s; tolerance = {meta['tolerance']}")
    if args.html:
        with open(args.html, "w", encoding="utf-8") as f:
            f.write(views.html_report(rows, meta))
    if args.json:
        report.write_json(rows, args.json, meta)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(report.markdown(rows, header=views.markdown_matrix(rows)))
    return 1 if any(r.status == "fail" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
