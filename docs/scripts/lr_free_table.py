"""Print the tables of docs/algorithms/lr_free.md: learning-rate-free optimizers vs their upstreams.

Runs the cases of tests/test_prodigy.py, tests/test_dog.py and tests/test_dadapt.py on their problem
(tests/lr_free_problem.py: float64, 200 steps, shapes (3, 4), (5,), (2, 3, 2), (), (7,), noisy
gradients) and prints, as Markdown:

1. adaptlr vs each upstream, per backend: the maximum over steps and tensors of the normwise relative
   error ``max|x - x_ref| / max|x_ref|`` of the parameters;
2. upstream PyTorch vs upstream optax, under each package's own defaults and under matched
   settings: the same error between the two upstreams, and the relative difference of the final
   estimate (``d`` or ``η``).

Usage: ``python docs/scripts/lr_free_table.py`` (needs torch, jax, optax, array-api-strict,
prodigyopt==1.1.2, dadaptation==3.2, dog-optimizer==1.0.3: ``pip install -e ".[test,all]"``).
"""

import contextlib
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "tests"))
import conftest  # noqa: F401  (enables JAX's float64)
import jax
import optax
import test_dadapt
import test_dog
import test_prodigy
from conftest import max_rel_err

import adaptlr
from adaptlr.conformance.backends import BACKENDS

BACKEND_NAMES = ["numpy", "array_api_strict", "torch", "jax"]
COLUMNS = [*BACKEND_NAMES, "jax (jit)"]


def _worst(a, b) -> float:
    return max(max_rel_err(x, y) for x, y in zip(a, b))


def _adaptlr_errors(module, make, init, grad, expected) -> list[float]:
    errors = []
    for name in COLUMNS:
        backend = BACKENDS["jax" if name == "jax (jit)" else name]
        opt = make()
        step = jax.jit(opt.update) if name == "jax (jit)" else None
        trajectory = module._run(opt, backend, init, grad, step=step)[0]
        errors.append(_worst(trajectory, expected))
    return errors


def _prodigy_upstream(kwargs):
    return lambda init, grad: test_prodigy._reference(kwargs, init, grad)[0]


def _prodigy_optax(kwargs):
    return lambda init, grad: test_prodigy._optax_reference(kwargs, init, grad)[0]


def _dog_upstream(kwargs):
    return lambda init, grad: test_dog._dog_reference(kwargs, init, grad)[0]


def _dog_optax(transform):
    return lambda init, grad: test_dog._optax_reference(transform, init, grad)


def _dadapt_upstream(name, kwargs):
    return lambda init, grad: test_dadapt._dadapt_reference(name, kwargs, init, grad)[0]


def _dadapt_optax(kwargs):
    return lambda init, grad: test_dadapt._optax_reference(kwargs, init, grad)[0]


def _agreement_rows():
    """(algorithm, upstream, settings, test module, adaptlr factory, reference)."""
    rows = []
    for case, kw in test_prodigy.CASES.items():
        rows.append(("prodigy", "prodigyopt 1.1.2", case, test_prodigy,
                     lambda kw=kw: adaptlr.prodigy(**kw), _prodigy_upstream(kw)))
    for case, kw in test_prodigy.OPTAX_CASES.items():
        rows.append(("prodigy", f"optax {optax.__version__} contrib.prodigy", case, test_prodigy,
                     lambda kw=kw: adaptlr.prodigy(use_bias_correction=True, **kw), _prodigy_optax(kw)))
    for case, kw in test_dog.DOG_CASES.items():
        rows.append(("dog", "dog-optimizer 1.0.3", case, test_dog, lambda kw=kw: adaptlr.dog(**kw), _dog_upstream(kw)))
    for case, (ours, theirs) in test_dog.OPTAX_DOG_CASES.items():
        rows.append(("dog", "optax contrib.dog", case, test_dog, lambda kw=ours: adaptlr.dog(**kw),
                     _dog_optax(optax.contrib.dog(**theirs))))
    for case, (ours, theirs) in test_dog.OPTAX_DOWG_CASES.items():
        rows.append(("dowg", "optax contrib.dowg", case, test_dog, lambda kw=ours: adaptlr.dowg(**kw),
                     _dog_optax(optax.contrib.dowg(**theirs))))
    for case, kw in test_dadapt.ADAM_CASES.items():
        rows.append(("dadapt_adam", "dadaptation 3.2 DAdaptAdam", case, test_dadapt,
                     lambda kw=kw: adaptlr.dadapt_adam(**kw), _dadapt_upstream("adam", kw)))
    for case, kw in test_dadapt.OPTAX_CASES.items():
        rows.append(("dadapt_adam", "optax contrib.dadapt_adamw", case, test_dadapt,
                     lambda kw=kw: adaptlr.dadapt_adam(decouple=True, use_bias_correction=True, **kw),
                     _dadapt_optax(kw)))
    for case, kw in test_dadapt.SGD_CASES.items():
        rows.append(("dadapt_sgd", "dadaptation 3.2 DAdaptSGD", case, test_dadapt,
                     lambda kw=kw: adaptlr.dadapt_sgd(**kw), _dadapt_upstream("sgd", kw)))
    return rows


def _estimate_gap(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def _upstream_rows():
    """(algorithm, PyTorch call, optax call, formula difference, error, final-estimate gap)."""
    out = []
    init, grad = test_prodigy._problem()
    for torch_kw, optax_kw, torch_call, optax_call, why in [
        ({}, {}, "Prodigy()", "prodigy()", "optax always multiplies by Adam's bias correction c_t; "
         "prodigyopt defaults to use_bias_correction=False"),
        ({"use_bias_correction": True}, {}, "Prodigy(use_bias_correction=True)", "prodigy()", "same algorithm"),
        ({"use_bias_correction": True, "weight_decay": 0.05, "d0": 1e-3}, {"weight_decay": 0.05, "d0": 1e-3},
         "Prodigy(use_bias_correction=True, weight_decay=0.05, d0=1e-3)", "prodigy(weight_decay=0.05, estim_lr0=1e-3)",
         "same algorithm"),
    ]:
        ref, ref_d = test_prodigy._reference(torch_kw, init, grad)
        opt, opt_d = test_prodigy._optax_reference(optax_kw, init, grad)
        out.append(("prodigy", torch_call, optax_call, why, _worst(ref, opt), _estimate_gap(ref_d[-1], opt_d[-1])))

    init, grad = test_dadapt._problem()
    for torch_kw, optax_kw, torch_call, optax_call, why in [
        ({}, {}, "DAdaptAdam()", "dadapt_adamw()", "optax always applies the bias correction c_t; "
         "DAdaptAdam defaults to use_bias_correction=False"),
        ({"weight_decay": 0.05}, {"weight_decay": 0.05}, "DAdaptAdam(weight_decay=0.05)",
         "dadapt_adamw(weight_decay=0.05)", "c_t as above, and DAdaptAdam's decay is coupled (g + λθ enters m, v, s "
         "and the estimate) while optax's is decoupled (-η·λ·θ)"),
        ({"weight_decay": 0.05, "decouple": True, "use_bias_correction": True}, {"weight_decay": 0.05},
         "DAdaptAdam(weight_decay=0.05, decouple=True, use_bias_correction=True)", "dadapt_adamw(weight_decay=0.05)",
         "same algorithm"),
    ]:
        ref, ref_d = test_dadapt._dadapt_reference("adam", torch_kw, init, grad)
        opt, opt_d = test_dadapt._optax_reference(optax_kw, init, grad)
        out.append(("dadapt_adam", torch_call, optax_call, why, _worst(ref, opt),
                    _estimate_gap(ref_d[-1], opt_d[-1])))

    init, grad = test_dog._problem()
    for torch_kw, transform, torch_call, optax_call, why in [
        ({}, optax.contrib.dog(), "DoG()", "dog()", "same algorithm (r_ε = 1e-6·(1 + ‖x_0‖) in both)"),
        ({"learning_rate": 0.8, "init_eta": 1e-3}, optax.contrib.dog(0.8, init_step=("learning_rate", 1e-3)),
         "DoG(lr=0.8, init_eta=1e-3)", 'dog(0.8, init_step=("learning_rate", 1e-3))',
         "the first step: DoG takes init_eta as it is, optax multiplies it by the learning rate"),
        ({"init_eta": 1e-3}, optax.contrib.dog(init_step=("learning_rate", 1e-3)), "DoG(init_eta=1e-3)",
         'dog(init_step=("learning_rate", 1e-3))', "same algorithm"),
    ]:
        ref = test_dog._dog_reference(torch_kw, init, grad)[0]
        opt = test_dog._optax_reference(transform, init, grad)
        out.append(("dog", torch_call, optax_call, why, _worst(ref, opt), float("nan")))
    return out


def main() -> None:
    with contextlib.redirect_stdout(sys.stderr):  # what the upstreams print ("Using decoupled weight decay")
        agreement = []
        for algorithm, upstream, case, module, make, reference in _agreement_rows():
            init, grad = module._problem()
            expected = reference(init, grad)
            agreement.append((algorithm, upstream, case, _adaptlr_errors(module, make, init, grad, expected)))
        upstream_rows = _upstream_rows()

    print("### adaptlr vs the upstream packages\n")
    print("| algorithm | upstream | settings | " + " | ".join(COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 3) + "|")
    for algorithm, upstream, case, errors in agreement:
        print(f"| {algorithm} | {upstream} | {case} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")

    print("\n### upstream PyTorch vs upstream optax\n")
    print("| algorithm | PyTorch package | optax.contrib | params error | final estimate gap | cause |")
    print("|---|---|---|---|---|---|")
    for algorithm, torch_call, optax_call, why, error, gap in upstream_rows:
        gap_text = "–" if gap != gap else f"{gap:.1e}"
        print(f"| {algorithm} | `{torch_call}` | `{optax_call}` | {error:.1e} | {gap_text} | {why} |")


if __name__ == "__main__":
    main()
