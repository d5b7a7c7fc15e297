"""Computed verdicts: a claim, the per-seed measurements, a paired bootstrap interval, and its verdict.

A claim compares a quantity ``a`` (one value per seed) with ``b``: either another configuration's value
for the same seed (a paired comparison: seed ``i`` of both uses the same initialisation and the same
minibatch order) or a fixed reference number. It says ``sign·(a − b) > −margin``, where ``sign = +1``
for "a is higher" and ``−1`` for "a is lower", and ``margin ≥ 0`` turns "better" into "not worse by more
than ``margin``" (non-inferiority; 0 for a strict "better").

The rule (the same for every experiment and dataset):

1. ``d_i = a_i − b_i`` for each seed ``i``.
2. The 95 % confidence interval of ``mean(d)`` is the 2.5 and 97.5 percentiles of the means of
   10 000 bootstrap resamples of the seeds (drawn with replacement, a fixed generator seed, so a report
   is reproducible).
3. ``agrees`` when the whole interval lies on the claimed side (``sign·d > −margin`` at both ends),
   ``differs`` when the whole interval lies on the other side (``sign·d < −margin`` at both ends),
   ``inconclusive`` otherwise, when a run diverged (a non-finite value), and with a single seed (no
   seed-to-seed variation to judge by: ``--quick`` runs).

With 5 seeds the percentile bootstrap is a narrow interval (it does not widen for small samples the
way a t interval does), so ``agrees``/``differs`` means "every plausible resample of these seeds points
the same way", not a significance test at a fixed level.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["AGREES", "DIFFERS", "INCONCLUSIVE", "Check", "bootstrap_interval", "check", "checks_table", "verdict"]

AGREES, DIFFERS, INCONCLUSIVE = "agrees", "differs", "inconclusive"
RESAMPLES, CONFIDENCE, BOOTSTRAP_SEED = 10_000, 0.95, 0


def bootstrap_interval(d: ArrayLike, confidence: float = CONFIDENCE, resamples: int = RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """The percentile bootstrap interval of ``mean(d)`` (``d``: one value per seed)."""
    d = np.asarray(d, dtype=float)
    if d.size == 0:
        raise ValueError("bootstrap_interval needs at least one value")
    rng = np.random.default_rng(seed)
    means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def verdict(low: float, high: float, sign: int, margin: float = 0.0) -> str:
    """The verdict of the claim ``sign·(a − b) > −margin`` from the interval [low, high] of ``a − b``."""
    if sign not in (1, -1):
        raise ValueError(f"sign must be +1 or -1, got {sign!r}")
    if not (np.isfinite(low) and np.isfinite(high)):
        return INCONCLUSIVE
    ends = sorted((sign * low, sign * high))
    if ends[0] > -margin:
        return AGREES
    if ends[1] < -margin:
        return DIFFERS
    return INCONCLUSIVE


@dataclass(frozen=True)
class Check:
    """One computed claim check.

    Attributes:
        claim: the claim in words.
        a_label, b_label: what ``a`` and ``b`` are.
        a, b: the per-seed values (``b`` repeated when it is a fixed reference).
        sign, margin: the claim is ``sign·(a − b) > −margin``.
        low, high: the bootstrap interval of ``mean(a − b)``.
        verdict: ``agrees``, ``differs`` or ``inconclusive``.
        unit: printed after the numbers ("", " %", " points").
        digits: decimals printed.
    """

    claim: str
    a_label: str
    b_label: str
    a: tuple[float, ...]
    b: tuple[float, ...]
    sign: int
    margin: float
    low: float
    high: float
    verdict: str
    digits: int = 2

    @property
    def difference(self) -> float:
        return float(np.mean(np.subtract(self.a, self.b)))

    def _ms(self, values: Sequence[float]) -> str:
        arr = np.asarray(values, dtype=float)
        if not np.all(np.isfinite(arr)):
            return "diverged"
        if arr.size == 1 or np.all(arr == arr[0]):
            return f"{arr.mean():.{self.digits}f}"
        return f"{arr.mean():.{self.digits}f} ± {arr.std(ddof=1):.{self.digits}f}"

    def row(self) -> list[str]:
        d = self.digits
        side = ">" if self.sign > 0 else "<"
        rule = f"a − b {side} {-self.sign * self.margin:+.{d}f}" if self.margin else f"a − b {side} 0"
        return [self.claim, f"{self.a_label}: {self._ms(self.a)}", f"{self.b_label}: {self._ms(self.b)}",
                f"{self.difference:+.{d}f} [{self.low:+.{d}f}, {self.high:+.{d}f}]", rule, f"**{self.verdict}**"]

    def line(self) -> str:
        row = self.row()
        return f"{row[0]}: {row[1]} vs {row[2]}; a − b = {row[3]} (claim {row[4]}): {self.verdict}"


def check(claim: str, a_label: str, a: ArrayLike, b_label: str, b: ArrayLike | float, *, higher: bool,
          margin: float = 0.0, digits: int = 2) -> Check:
    """Check the claim "``a`` is higher (``higher=True``) / lower than ``b``", paired by seed.

    Args:
        claim: the claim in words, for the report.
        a_label: the name of ``a``.
        a: one value per seed.
        b_label: the name of ``b``.
        b: one value per seed (same order as ``a``) or one fixed reference number.
        higher: the claimed direction.
        margin: tolerated shortfall (non-inferiority); 0 for a strict claim.
        digits: decimals in the report.
    """
    a_arr = np.asarray(a, dtype=float).ravel()
    b_arr = np.broadcast_to(np.asarray(b, dtype=float), a_arr.shape) if np.ndim(b) == 0 else np.asarray(b, float)
    if b_arr.shape != a_arr.shape:
        raise ValueError(f"a and b need one value per seed each: {a_arr.shape} vs {b_arr.shape}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    d = a_arr - b_arr
    low, high = (bootstrap_interval(d) if np.all(np.isfinite(d)) else (float("nan"), float("nan")))
    judged = verdict(low, high, 1 if higher else -1, margin) if d.size >= 2 else INCONCLUSIVE
    sign = 1 if higher else -1
    return Check(claim, a_label, b_label, tuple(a_arr.tolist()), tuple(b_arr.tolist()), sign, margin, low, high,
                 judged, digits)


def checks_table(checks: Sequence[Check]) -> str:
    """The checks as a Markdown table (one row per claim)."""
    from adaptlr.reproduce.report import markdown_table

    return markdown_table(["claim", "a (mean ± std over seeds)", "b", "a − b [95 % bootstrap CI]", "claim holds if",
                           "verdict"], [c.row() for c in checks])
