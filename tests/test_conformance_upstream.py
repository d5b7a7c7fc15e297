"""``adaptlr conformance --checks upstream``: the learning-rate-free optimizers against their upstreams.

The rows themselves are the comparison of tests/test_prodigy.py, test_dog.py and test_dadapt.py,
made by the conformance suite (:mod:`adaptlr.conformance.upstream`); here every row passes on
NumPy and none is skipped where the upstream packages are installed.
"""

from __future__ import annotations

import importlib.util

import pytest

from adaptlr.conformance import analytic, cli, upstream
from adaptlr.conformance.backends import BACKENDS


def test_upstream_is_a_conformance_check(capsys):
    assert "upstream" in analytic.CHECKS
    assert cli.main(["--list"]) == 0
    assert "upstream" in capsys.readouterr().out


def test_every_upstream_row_passes_on_numpy():
    missing = [m for m in ("torch", "jax", "optax", "prodigyopt", "dadaptation", "dog", "schedulefree",
                                        "mechanic_pytorch")
               if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"the upstream packages are not installed: {missing}")
    from adaptlr.conformance.backends import enable_jax_x64

    enable_jax_x64()
    rows = upstream.upstream_rows([BACKENDS["numpy"]], 1)
    assert len(rows) == len(upstream.CASES)
    assert {r.algorithm.split(" vs ")[1] for r in rows} == {
        "prodigyopt.Prodigy", "optax.contrib.prodigy", "dog_optimizer.DoG", "optax.contrib.dog", "optax.contrib.dowg",
        "dadaptation.DAdaptAdam", "dadaptation.DAdaptSGD", "optax.contrib.dadapt_adamw",
        "schedulefree.AdamWScheduleFree", "schedulefree.AdamWScheduleFreeReference", "schedulefree.SGDScheduleFree",
        "schedulefree.SGDScheduleFreeReference", "optax.contrib.schedule_free_adamw", "optax.contrib.schedule_free_sgd",
        "mechanic_pytorch.mechanize"}
    failed = [(r.algorithm, r.problem, r.max_rel_err_params, r.max_rel_err_lr) for r in rows if r.status != "pass"]
    assert not failed
    assert all(r.steps == upstream.STEPS and r.max_rel_err_params <= r.tolerance for r in rows)
    # 1e-12 for every row but Mechanic's, which take the documented rule's tolerance with their condition
    assert {r.tolerance for r in rows if "mechanic" not in r.algorithm} == {upstream.TOLERANCE}
    assert all(upstream.TOLERANCE < r.tolerance < 2e-11 for r in rows if "mechanic" in r.algorithm)


def test_a_configuration_that_is_not_the_upstream_fails():
    """prodigyopt's default (no bias correction) is not optax.contrib.prodigy (always bias-corrected)."""
    pytest.importorskip("optax")
    from adaptlr.conformance.backends import enable_jax_x64

    enable_jax_x64()
    case = upstream.UpstreamCase("prodigy", "optax.contrib.prodigy", "prodigyopt-defaults", {})
    (row,) = upstream.upstream_rows([BACKENDS["numpy"]], 1, [case])
    assert row.status == "fail" and row.max_rel_err_params > 1e-3


def test_agreement_table_of_the_docs_scripts():
    """The table docs/scripts/*_table.py print: one row per case, the errors per column, ≤ 1e-12 for an
    upstream case; a configuration that is not its upstream shows its error."""
    pytest.importorskip("prodigyopt")
    pytest.importorskip("optax")
    from adaptlr.conformance.backends import enable_jax_x64

    enable_jax_x64()
    good = next(c for c in upstream.CASES if c.upstream == "prodigyopt.Prodigy")
    bad = upstream.UpstreamCase("prodigy", "optax.contrib.prodigy", "prodigyopt-defaults", {})
    lines = upstream.agreement_table([good, bad], ("numpy",)).splitlines()
    assert lines[0] == "| algorithm | upstream | settings | numpy |" and len(lines) == 4
    errors = [float(line.strip("| ").split("|")[-1]) for line in lines[2:]]
    assert errors[0] <= upstream.TOLERANCE < 1e-3 < errors[1]


@pytest.mark.parametrize("name", ["prodigy", "dadapt_adam", "dadapt_sgd", "dog", "ldog", "dowg"])
def test_learning_rate_free_agreement_rows(name, backend):
    """The registered entries agree across backends as every algorithm must (float64 and float32)."""
    from adaptlr.conformance import runner
    from adaptlr.conformance.algorithms import ALGORITHMS

    rows = runner.run_agreement([name], [backend.name], ["float64", "float32"], 120,
                                all_problems=True)
    assert rows and all(row.status == "pass" for row in rows), [(r.problem, r.dtype, r.reason) for r in rows]
    assert ALGORITHMS[name].problems == ("noisy_quadratic", "logistic")
