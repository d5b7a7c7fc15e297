"""Writers for the results: Markdown tables, PNG plots (matplotlib, imported lazily) and the report file."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import ArrayLike

from adaptlr.reproduce.data import require

__all__ = ["Result", "fmt", "markdown_table", "mean_std", "pyplot", "save", "smooth"]


@dataclass
class Result:
    """One experiment's output: a title, the table, computed claim checks, findings and the plot files."""

    name: str
    title: str
    setup: str
    table: str
    findings: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    checks: list[Any] = field(default_factory=list)  # verdict.Check

    def markdown(self) -> str:
        lines = [f"# {self.title}", "", self.setup, "", self.table, ""]
        if self.checks:
            from adaptlr.reproduce.verdict import checks_table

            lines += ["Verdicts (paired over seeds; 95 % percentile-bootstrap interval of the mean difference; "
                      "`agrees` when it lies wholly on the claimed side, `differs` when wholly on the other, "
                      "else `inconclusive` — adaptlr/reproduce/verdict.py):", "", checks_table(self.checks), ""]
        if self.findings:
            lines += ["Measurements (computed from the runs above):", ""]
            lines += [f"- {f}" for f in self.findings] + [""]
        lines += [f"![{p.stem}]({p.name})" for p in self.plots]
        return "\n".join(lines) + "\n"

    def write(self, out: Path) -> Path:
        path = out / f"{self.name}.md"
        path.write_text(self.markdown())
        return path


def fmt(x: float, digits: int = 3) -> str:
    """A number for a table: NaN as 'diverged', small/large values in scientific notation."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "diverged"
    if x != 0 and (abs(x) < 1e-3 or abs(x) >= 1e4):
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}f}" if abs(x) < 10 else f"{x:.{max(digits - 2, 1)}f}"


def mean_std(values: ArrayLike, scale: float = 1.0, digits: int = 1) -> str:
    """'mean ± std' over seeds (std with ddof=1; just the mean for one seed)."""
    arr = np.asarray(values, dtype=float) * scale
    if np.any(~np.isfinite(arr)):
        return "diverged"
    if len(arr) == 1:
        return f"{arr[0]:.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std(ddof=1):.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib.pyplot with the non-interactive Agg backend."""
    matplotlib = require("matplotlib", "the plots")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: Path, name: str) -> Path:
    """Save ``fig`` as a small PNG ``out/name.png`` and close it."""
    path = out / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    pyplot().close(fig)
    return path


def smooth(values: ArrayLike, window: int) -> np.ndarray:
    """A trailing moving average (shorter at the start), for noisy per-step curves."""
    arr = np.asarray(values, dtype=float)
    if window <= 1 or len(arr) == 0:
        return arr
    csum = np.cumsum(np.insert(arr, 0, 0.0))
    idx = np.arange(1, len(arr) + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[idx] - csum[lo]) / (idx - lo)
