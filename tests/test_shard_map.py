"""``axis_name`` / ``partition_specs`` inside ``jax.shard_map``: a sharded run equals the unsharded one.

Runs ``tests/shard_map_check.py adaptations`` in a subprocess with 8 host devices
(``XLA_FLAGS=--xla_force_host_platform_device_count=8``), so the rest of the suite keeps its single
device. Every algorithm that reduces over parameters (AutoDrop's angle, HD and EG global/tensor, DSA's
tensor/row/column factors) on a 1×8 mesh with ``axis_name="d"`` and on a 2×4 mesh with per-parameter
partition specs, against the plain jitted run: ≤ 1e-12 (float64) for params and learning rates,
AutoDrop's drop counts equal. Without ``axis_name`` shard_map refuses the step (``check_vma``) or, with
``check_vma=False``, computes from one shard.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("jax", reason="JAX is not installed")
pytest.importorskip("optax", reason="optax is not installed")

SCRIPT = os.path.join(os.path.dirname(__file__), "shard_map_check.py")


def run_check(algorithm_set: str) -> str:
    """Run the check for ``algorithm_set`` on 8 host devices; its stdout (the agreement table)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    result = subprocess.run([sys.executable, SCRIPT, algorithm_set], env=env, capture_output=True, text=True,
                            timeout=300)
    print(result.stdout)  # the agreement table (pytest -s shows it)
    assert "SHARD-MAP-OK" in result.stdout, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def test_shard_map_equals_unsharded_run_for_every_algorithm():
    run_check("adaptations")
