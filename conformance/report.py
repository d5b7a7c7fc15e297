"""The report: a terminal table, Markdown, JSON, and a progress bar on stderr."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from adaptlr.conformance.runner import Row

__all__ = ["Progress", "markdown", "table", "write_json"]

COLUMNS = ("kind", "algorithm", "problem", "backend", "dtype", "steps", "err params", "err lr", "decisions",
           "mismatch", "ill", "min margin", "tolerance", "status")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _cells(row: Row) -> list[str]:
    status = row.status + (f" ({row.reason})" if row.reason and row.status != "pass" else "")
    return [row.kind, row.algorithm, row.problem, row.backend, row.dtype, str(row.steps), _num(row.max_rel_err_params),
            _num(row.max_rel_err_lr), str(row.decisions), str(row.decision_mismatches),
            str(row.ill_conditioned_decisions), _num(row.min_margin), _num(row.tolerance), status]


def summary(rows: Sequence[Row]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.status] = counts.get(row.status, 0) + 1
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def table(rows: Sequence[Row], width: int = 60) -> str:
    """A fixed-width table (the status column is cut at ``width`` characters)."""
    cells = [list(COLUMNS)] + [_cells(r) for r in rows]
    cells = [[*c[:-1], c[-1][:width]] for c in cells]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(c, widths)).rstrip() for c in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + f"\n\n{summary(rows)}"


def markdown(rows: Sequence[Row], header: str = "") -> str:
    out = [header] if header else []
    out.append("| " + " | ".join(COLUMNS) + " |")
    out.append("|" + "---|" * len(COLUMNS))
    for row in rows:
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in _cells(row)) + " |")
    out.append("")
    out.append(f"Summary: {summary(rows)}.")
    return "\n".join(out) + "\n"


def write_json(rows: Sequence[Row], path: str, meta: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": [r.record() for r in rows]}, f, indent=1, default=str)


class Progress:
    """tqdm on stderr when importable, else a one-line counter; silent when ``enabled`` is False."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled, self._bar = total, 0, enabled, None
        if enabled:
            try:
                from tqdm import tqdm

                self._bar = tqdm(total=total, file=sys.stderr, unit="run", dynamic_ncols=True, leave=False)
            except ImportError:
                self._bar = None

    def __call__(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(label[:40])
            self._bar.update(1)
        else:
            filled = int(30 * self.done / max(self.total, 1))
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label[:40]:40s}")
            sys.stderr.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self.enabled:
            sys.stderr.write("\n")
