"""Print the table of docs/algorithms/base.md: base optimizers vs torch.optim / adabelief-pytorch, per backend.

Runs the problem of tests/test_base_optimizers.py (float64, 60 steps) on every CPU backend and prints
the maximum normwise relative error of the parameters against the reference library.
"""

import pathlib
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
import conftest  # noqa: F401  (enables JAX's float64)
import test_base_optimizers as cases
from conftest import max_rel_err

import adaptlr
from adaptlr.conformance.backends import BACKENDS

NAMES = ["numpy", "array_api_strict", "array_api_strict-device1", "torch", "jax"]


def worst_error(backend, make, init, grad, expected) -> float:
    opt = make()
    params = [backend.asarray(p) for p in init]
    state = opt.init(params)
    worst = 0.0
    for step in range(cases.STEPS):
        grads = [backend.asarray(g) for g in grad([backend.to_numpy(p) for p in params])]
        updates, state = opt.update(grads, state, params)
        params = adaptlr.apply_updates(params, updates)
        worst = max(worst, max_rel_err([backend.to_numpy(p) for p in params], expected[step]))
    return worst


def main() -> None:
    print("| case | " + " | ".join(NAMES) + " |")
    print("|---" * (len(NAMES) + 1) + "|")
    for case, (make, make_reference) in cases.CASES.items():
        init, grad = cases._problem(np.random.default_rng(20261122))
        expected = cases._reference_trajectory(make_reference, init, grad)
        errors = [worst_error(BACKENDS[n], make, init, grad, expected) for n in NAMES]
        print(f"| {case} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
