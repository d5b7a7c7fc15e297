"""The problem of the learning-rate-free tests (test_prodigy, test_dog, test_dadapt): the one of the
conformance suite's "upstream" rows (:func:`adaptlr.conformance.upstream.problem`, which says why
its gradients are noisy)."""

from adaptlr.conformance.upstream import SHAPES, STEPS, problem

__all__ = ["SHAPES", "STEPS", "problem"]
