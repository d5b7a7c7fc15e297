"""adaptlr's conformance suite: every algorithm on every installed backend against the NumPy float64
run, plus analytic checks (spec test vectors, closed forms, known minimisers) and reference libraries.

Run it with ``adaptlr conformance`` or ``python -m adaptlr.conformance``; add your own optimizer
with :func:`register_algorithm` and your own problem with :func:`register_problem`.
"""

from adaptlr.conformance.algorithms import (
    ALGORITHMS,
    Algorithm,
    AngleDrops,
    EpochSignFlips,
    HypergradientSigns,
    register_algorithm,
)
from adaptlr.conformance.problems import PROBLEMS, Problem, register_problem

__all__ = [
    "ALGORITHMS",
    "PROBLEMS",
    "Algorithm",
    "AngleDrops",
    "EpochSignFlips",
    "HypergradientSigns",
    "Problem",
    "register_algorithm",
    "register_problem",
]
