"""The precision table of docs/algorithms/base.md: distance from a float64 run, adaptlr next to the reference.

    python docs/scripts/precision_table.py

For each base and parameter dtype: the normwise relative distance of the final parameters (200
steps, :mod:`adaptlr.conformance.precision`) from the same optimizer's float64 run, for the
reference library (torch.optim; adabelief-pytorch for AdaBelief) and for adaptlr on NumPy, PyTorch
and JAX (state in the parameter dtype, and with ``state_dtype="float32"``). The float64 row gives
adaptlr's distance from the reference library's float64 run.
"""

from __future__ import annotations

import warnings

import adaptlr
from adaptlr.conformance import precision
from adaptlr.conformance.backends import BACKENDS, enable_jax_x64

STEPS = 200


def main() -> None:
    warnings.filterwarnings("ignore")
    enable_jax_x64()
    print("| base | dtype | reference | adaptlr NumPy | adaptlr PyTorch | adaptlr JAX "
          "| PyTorch, state float32 |")
    print("|---|---|---|---|---|---|---|")
    for name, make in precision.BASES.items():
        exact = precision.run_adaptlr(make(adaptlr), BACKENDS["numpy"], "float64", STEPS)
        reference64 = precision.run_reference(name, "float64", STEPS)
        print(f"| {name} | float64 | — | {precision.distance(exact, reference64):.1e} (vs reference) | | | |")
        for dtype in ("float32", "bfloat16", "float16"):
            cells = [f"{precision.reference_distance(name, dtype, STEPS):.1e}"]
            for backend in ("numpy", "torch", "jax"):
                if backend == "numpy" and dtype == "bfloat16":
                    cells.append("—")
                    continue
                run = precision.run_adaptlr(make(adaptlr), BACKENDS[backend], dtype, STEPS)
                cells.append(f"{precision.distance(run, exact):.1e}")
            if dtype == "float32":
                cells.append("—")
            else:
                run = precision.run_adaptlr(make(adaptlr, state_dtype="float32"), BACKENDS["torch"], dtype, STEPS)
                cells.append(f"{precision.distance(run, exact):.1e}")
            print(f"| {name} | {dtype} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
