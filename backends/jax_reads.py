"""Inputs a term is made again from, for one more of the sums that read it under JAX tracing.

:meth:`adaptlr._reduce.Term.made_for_one_sum` calls :func:`read_again` while ``jax.jit`` traces a
step whose term several sums read (DSA's ``G ⊙ P``, ``G ⊙ G`` and ``P ⊙ P``, each summed over rows
and over columns). XLA merges identical instructions (common subexpressions), so the same product
written twice is one array, read by both reductions; behind ``jax.lax.optimization_barrier`` the
inputs are values XLA cannot see through, the products stay apart, and each is fused into its own
reduction. The barrier computes nothing and copies nothing (the HLO of DSA's step has no copy), and
it has derivatives. Only JAX is imported (not optax, which :mod:`adaptlr.backends.jax` needs).
"""

from __future__ import annotations

import jax

__all__ = ["read_again"]


def read_again(inputs: tuple) -> tuple:
    """``inputs``, the same values, as arrays XLA does not identify with them."""
    return tuple(jax.lax.optimization_barrier(tuple(inputs)))
