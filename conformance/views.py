"""Views of the report a newcomer reads at a glance: the algorithm × backend matrix and the HTML page.

The matrix has one row per algorithm and one column per backend × dtype of the agreement rows; a
cell is the worst ``error / tolerance`` over the algorithm's problems (params and learning rates),
with ✔ (pass), ✘ (fail), ``ill`` (a discrete decision closer to its threshold than the tolerance)
or ``skip``. Columns where every cell is skipped are folded into one line that names them and why.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from typing import Any

from adaptlr.conformance.runner import Row

__all__ = ["analytic_lines", "html_report", "markdown_matrix", "matrix", "matrix_lines", "terminal_summary"]

_SHORT_BACKENDS = {"numpy": "np", "array_api_strict": "strict", "array_api_strict-device1": "strict1",
                   "torch": "torch", "jax": "jax", "torch-cuda": "t-cuda", "jax-gpu": "j-gpu", "cupy": "cupy"}
_SHORT_DTYPES = {"float64": "64", "float32": "32"}
_RANK = {"fail": 3, "ill-conditioned": 2, "pass": 1, "skipped": 0}


def _ratio(row: Row) -> float | None:
    if not row.tolerance:
        return None
    errors = [e for e in (row.max_rel_err_params, row.max_rel_err_lr) if e is not None]
    return max(errors) / row.tolerance if errors else None


def matrix(rows: Sequence[Row]) -> tuple[list[str], list[str], dict[tuple[str, str], dict[str, Any]]]:
    """``(algorithms, columns, cells)`` of the agreement rows; a cell has ``status``, ``ratio``, ``reason``."""
    algorithms: list[str] = []
    columns: list[str] = []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row.kind != "agreement":
            continue
        column = f"{_SHORT_BACKENDS.get(row.backend, row.backend)}/{_SHORT_DTYPES.get(row.dtype, row.dtype)}"
        if row.algorithm not in algorithms:
            algorithms.append(row.algorithm)
        if column not in columns:
            columns.append(column)
        cell = cells.setdefault((row.algorithm, column), {"status": "skipped", "ratio": None, "reason": ""})
        if _RANK.get(row.status, 3) > _RANK[cell["status"]]:
            cell["status"] = row.status if row.status in _RANK else "fail"
            cell["reason"] = row.reason
        ratio = _ratio(row)
        if ratio is not None and (cell["ratio"] is None or ratio > cell["ratio"]):
            cell["ratio"] = ratio
    return algorithms, columns, cells


def _cell_text(cell: dict[str, Any] | None) -> str:
    if cell is None:
        return "·"
    status, ratio = cell["status"], cell["ratio"]
    if status == "skipped":
        return "skip"
    mark = {"pass": "✔", "fail": "✘", "ill-conditioned": "ill"}[status]
    if ratio is None:
        return mark
    if ratio >= 0.01:
        value = f"{ratio:.2f}".lstrip("0") if ratio < 1 else (f"{ratio:.1f}" if ratio < 10 else f"{ratio:.0e}")
    else:  # 0.0012 -> 1e-3
        value = "0" if ratio == 0 else f"{ratio:.0e}".replace("e-0", "e-")
    return f"{mark} {value}"


def matrix_lines(rows: Sequence[Row], width: int = 100) -> list[str]:
    """The matrix as text lines no wider than ``width`` (wrapped into blocks of columns)."""
    algorithms, columns, cells = matrix(rows)
    if not algorithms:
        return []
    skipped = [c for c in columns if all(cells.get((a, c), {"status": "skipped"})["status"] == "skipped"
                                         for a in algorithms)]
    shown = [c for c in columns if c not in skipped]
    name_width = min(max(len(a) for a in algorithms), 28)
    cell_width = max([7] + [len(c) for c in shown])
    per_block = max(1, (width - name_width - 1) // (cell_width + 1))
    lines = []
    for start in range(0, len(shown), per_block):
        block = shown[start:start + per_block]
        lines.append(" " * name_width + " " + " ".join(c.rjust(cell_width) for c in block))
        for a in algorithms:
            name = a if len(a) <= name_width else a[:name_width - 1] + "…"
            lines.append(name.ljust(name_width) + " " +
                         " ".join(_cell_text(cells.get((a, c))).rjust(cell_width) for c in block))
        lines.append("")
    absent = {}  # backends skipped as a whole (no GPU, not installed): one line, with the reasons
    for r in rows:
        if r.kind == "backend" and r.status == "skipped":
            absent.setdefault(r.backend, r.reason)
    for c in skipped:
        absent.setdefault(c, "every row skipped")
    if absent:
        lines.extend(_wrap("skipped: " + "; ".join(f"{b} ({why})" for b, why in absent.items()), width))
    lines.append("cell: status and worst error / tolerance (✔ .02 = 2% of the tolerance)")
    return lines


def _wrap(text: str, width: int) -> list[str]:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = "  " + word
        else:
            line = f"{line} {word}" if line else word
    return out + ([line] if line else [])


def analytic_lines(rows: Sequence[Row], width: int = 100) -> list[str]:
    """One line per analytic or reference check: measured vs allowed, ✔/✘ (worst over backends)."""
    groups: dict[tuple[str, str, str], list[Row]] = {}
    for row in rows:
        if row.kind in ("analytic", "reference"):
            # reference rows: one line per optimizer, over its problems ("torch.optim on ...")
            problem = row.problem.split(" on ")[0] + " (all problems)" if row.kind == "reference" else row.problem
            groups.setdefault((row.kind, row.algorithm, problem), []).append(row)
    lines = []
    for (kind, algorithm, problem), group in groups.items():
        statuses = {r.status for r in group}
        mark = "✘" if "fail" in statuses else ("skip" if statuses == {"skipped"} else "✔")
        worst = max(group, key=lambda r: (_ratio(r) or 0.0))
        measured = worst.max_rel_err_params if worst.max_rel_err_params is not None else worst.max_rel_err_lr
        numbers = "" if measured is None or worst.tolerance is None else \
            f"{measured:.1e} ≤ {worst.tolerance:.1e}" if mark != "✘" else f"{measured:.1e} > {worst.tolerance:.1e}"
        backends = f" ({len(group)} rows)" if len(group) > 1 else ""
        text = f"{mark} {kind[:3]} {algorithm} — {problem}: {numbers}{backends}"
        lines.append(text if len(text) <= width else text[:width - 1] + "…")
    return lines


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1e}"


def _describe(r: Row) -> str:
    """A row in full, as one line to wrap."""
    mark = "✘" if r.status == "fail" else "ill"
    return (f"{mark} {r.kind} {r.algorithm} on {r.problem}, {r.backend} {r.dtype}, {r.steps} steps: "
            f"err params {_num(r.max_rel_err_params)}, err lr {_num(r.max_rel_err_lr)}, tolerance {_num(r.tolerance)}; "
            f"decisions {r.decisions} ({r.decision_mismatches} mismatched, {r.ill_conditioned_decisions} ill, "
            f"min margin {_num(r.min_margin)}); {r.status}: {r.reason or 'no reason given'}")


def terminal_summary(rows: Sequence[Row], width: int = 100) -> str:
    """Matrix, checks, every failing or ill-conditioned row in full, then the summary line."""
    from adaptlr.conformance.report import summary

    parts = ["Cross-backend agreement (algorithm × backend/dtype):", *matrix_lines(rows, width), "",
             "Analytic and reference checks:", *analytic_lines(rows, width)]
    notable = [r for r in rows if r.status in ("fail", "ill-conditioned")]
    if notable:
        parts += ["", "Rows that failed or are ill-conditioned:"]
        for r in notable:
            parts += _wrap(_describe(r), width)
    parts += ["", summary(rows)]
    return "\n".join(parts)


def markdown_matrix(rows: Sequence[Row]) -> str:
    """The matrix as a Markdown table (the top of ``--markdown``), then the checks as a list."""
    algorithms, columns, cells = matrix(rows)
    out = ["## At a glance", "", "| algorithm | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    out += ["| " + a + " | " + " | ".join(_cell_text(cells.get((a, c))) for c in columns) + " |" for a in algorithms]
    out += ["", "Cell: status and worst error / tolerance. Checks:", ""]
    out += [f"- {line}" for line in analytic_lines(rows, width=10_000)]
    return "\n".join(out) + "\n\n## Every row\n"


# -- HTML -------------------------------------------------------------------------------------------

def _colour(cell: dict[str, Any] | None) -> str:
    """Green (1e-3 of the tolerance or less) through yellow (3%) to red (at the tolerance), on a log scale."""
    if cell is None or cell["status"] == "skipped":
        return "#eeeeee"
    if cell["status"] == "fail":
        return "#d73027"
    if cell["ratio"] is None:
        return "#a6d96a"
    x = min(1.0, max(0.0, (math.log10(max(cell["ratio"], 1e-12)) + 3.0) / 3.0))  # 1e-3 -> 0, 1 -> 1
    red, green = (int(255 * min(1.0, 2 * x)), int(255 * min(1.0, 2 * (1 - x))))
    return f"#{red:02x}{green:02x}60"


def _svg_plot(title: str, series: dict[str, Sequence[float]], width: int = 420, height: int = 180) -> str:
    values = [v for ys in series.values() for v in ys if v is not None and math.isfinite(v)]
    if not values:
        return ""
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    n = max(len(ys) for ys in series.values())
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    paths = []

    def point(i: int, y: float) -> str:
        return f"{30 + (width - 40) * i / max(n - 1, 1):.1f},{height - 20 - (height - 40) * (y - low) / span:.1f}"

    for k, (name, ys) in enumerate(series.items()):
        points = " ".join(point(i, y) for i, y in enumerate(ys) if y is not None and math.isfinite(y))
        paths.append(f'<polyline fill="none" stroke="{colours[k % 4]}" stroke-width="2" points="{points}"/>'
                     f'<text x="{width - 10}" y="{14 + 14 * k}" text-anchor="end" fill="{colours[k % 4]}" '
                     f'font-size="11">{html.escape(name)}</text>')
    return (f'<figure><svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">'
            f'<rect width="100%" height="100%" fill="white" stroke="#ccc"/>'
            f'<text x="30" y="{height - 4}" font-size="10">{low:.4g}</text>'
            f'<text x="30" y="12" font-size="10">{high:.4g}</text>{"".join(paths)}</svg>'
            f'<figcaption>{html.escape(title)}</figcaption></figure>')


def html_report(rows: Sequence[Row], meta: dict[str, Any]) -> str:
    """A self-contained HTML page: heatmap, checks with plots, failing rows, machine and versions."""
    from adaptlr.conformance.report import summary

    algorithms, columns, cells = matrix(rows)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for a in algorithms:
        tds = []
        for c in columns:
            cell = cells.get((a, c))
            tip = "" if cell is None else f"{cell['status']}; error/tolerance {cell['ratio']}; {cell['reason']}"
            tds.append(f'<td class="cell" style="background:{_colour(cell)}" title="{html.escape(tip)}">'
                       f"{html.escape(_cell_text(cell))}</td>")
        body.append(f"<tr><th class='alg'>{html.escape(a)}</th>{''.join(tds)}</tr>")
    checks = "".join(f"<li>{html.escape(line)}</li>" for line in analytic_lines(rows, width=10_000))
    plots = "".join(_svg_plot(r.extra["plot"]["title"], r.extra["plot"]["series"]) for r in rows
                    if isinstance(r.extra, dict) and "plot" in r.extra)
    notable = [r for r in rows if r.status in ("fail", "ill-conditioned")]
    described = [f"{r.kind} {r.algorithm} {r.problem} {r.backend} {r.dtype}: {r.status} {r.reason}" for r in notable]
    failing = "".join(f"<li>{html.escape(text)}</li>" for text in described) or "<li>none</li>"
    info = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in meta.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>adaptlr conformance report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; color: #222; }}
table.matrix {{ border-collapse: collapse; font-size: 13px; }}
table.matrix td, table.matrix th {{ border: 1px solid #fff; padding: 3px 6px; }}
td.cell {{ text-align: center; min-width: 4em; }}
th.alg {{ text-align: left; font-weight: normal; font-family: monospace; }}
figure {{ display: inline-block; margin: 0.5em; }}
</style></head><body>
<h1>adaptlr conformance report</h1>
<p id="summary">{html.escape(summary(rows))}</p>
<h2>Cross-backend agreement</h2>
<p>Colour: worst error / tolerance, log scale (green ≤ 1e-3 of the tolerance, yellow 3%, red at the tolerance;
grey: skipped). Hover a cell for its status and reason.</p>
<table class="matrix" id="matrix"><tr><th></th>{head}</tr>{"".join(body)}</table>
<h2>Analytic and reference checks</h2><ul id="checks">{checks}</ul>
{plots}
<h2>Failing or ill-conditioned rows</h2><ul>{failing}</ul>
<h2>Run</h2><table>{info}</table>
</body></html>
"""
