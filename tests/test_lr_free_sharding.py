"""Learning-rate-free bases inside ``jax.shard_map``: a sharded run equals the unsharded one (issue 18).

As tests/test_shard_map.py (a subprocess with 8 host devices): Prodigy, DoG, LDoG, DoWG, D-Adapt
Adam and SGD through ``to_optax``, on a 1×8 mesh with ``axis_name="d"`` and on a 2×4 mesh with
per-parameter partition specs, against the plain jitted run: ≤ 1e-12 (float64) for the params and
the learning rates (which include the estimates ``d`` / ``η``).
"""

from __future__ import annotations

import pytest

pytest.importorskip("jax", reason="JAX is not installed")
pytest.importorskip("optax", reason="optax is not installed")

from test_shard_map import run_check


def test_shard_map_equals_unsharded_run_for_learning_rate_free_bases():
    run_check("lr_free")
