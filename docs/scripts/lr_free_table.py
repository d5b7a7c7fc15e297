"""Print the tables of docs/algorithms/lr_free.md: learning-rate-free optimizers vs their upstreams.

Runs the "upstream" cases of the conformance suite (:mod:`adaptlr.conformance.upstream`: float64,
200 steps, shapes (3, 4), (5,), (2, 3, 2), (), (7,), noisy gradients) and prints, as Markdown:

1. adaptlr vs each upstream, per backend (and ``jax.jit`` of the step): the maximum over steps and
   tensors of the normwise relative error ``max|x - x_ref| / max|x_ref|`` of the parameters (the
   rows of ``adaptlr conformance --checks upstream``, plus the jit column);
2. upstream PyTorch vs upstream optax, under each package's own defaults and under matched
   settings: the same error between the two upstreams, and the relative difference of the final
   estimate ``d``.

Usage: ``python docs/scripts/lr_free_table.py`` (needs torch, jax, optax, array-api-strict,
prodigyopt==1.1.2, dadaptation==3.2, dog-optimizer==1.0.3: ``pip install -e ".[test,all]"``).
"""


from adaptlr.conformance.backends import enable_jax_x64
from adaptlr.conformance.runner import max_rel_err
from adaptlr.conformance.upstream import CASES, TABLE_COLUMNS, UpstreamCase, agreement_table, problem, reference

COLUMNS = list(TABLE_COLUMNS)

# (PyTorch upstream case, optax upstream case, the formula difference between them)
UPSTREAM_PAIRS = [
    (UpstreamCase("prodigy", "prodigyopt.Prodigy", "Prodigy()"),
     UpstreamCase("prodigy", "optax.contrib.prodigy", "prodigy()"),
     "optax always multiplies by Adam's bias correction c_t; prodigyopt defaults to use_bias_correction=False"),
    (UpstreamCase("prodigy", "prodigyopt.Prodigy", "Prodigy(use_bias_correction=True)", {"use_bias_correction": True}),
     UpstreamCase("prodigy", "optax.contrib.prodigy", "prodigy()"), "same algorithm"),
    (UpstreamCase("prodigy", "prodigyopt.Prodigy", "Prodigy(use_bias_correction=True, weight_decay=0.05, d0=1e-3)",
                  {"use_bias_correction": True, "weight_decay": 0.05, "d0": 1e-3}),
     UpstreamCase("prodigy", "optax.contrib.prodigy", "prodigy(weight_decay=0.05, estim_lr0=1e-3)",
                  {"weight_decay": 0.05, "d0": 1e-3}), "same algorithm"),
    (UpstreamCase("dadapt_adam", "dadaptation.DAdaptAdam", "DAdaptAdam()"),
     UpstreamCase("dadapt_adam", "optax.contrib.dadapt_adamw", "dadapt_adamw()"),
     "optax always applies the bias correction c_t; DAdaptAdam defaults to use_bias_correction=False"),
    (UpstreamCase("dadapt_adam", "dadaptation.DAdaptAdam", "DAdaptAdam(weight_decay=0.05)", {"weight_decay": 0.05}),
     UpstreamCase("dadapt_adam", "optax.contrib.dadapt_adamw", "dadapt_adamw(weight_decay=0.05)",
                  {"weight_decay": 0.05}),
     "c_t as above, and DAdaptAdam's decay is coupled (g + λθ enters m, v, s and the estimate) while optax's is "
     "decoupled (-η·λ·θ)"),
    (UpstreamCase("dadapt_adam", "dadaptation.DAdaptAdam",
                  "DAdaptAdam(weight_decay=0.05, decouple=True, use_bias_correction=True)",
                  {"weight_decay": 0.05, "decouple": True, "use_bias_correction": True}),
     UpstreamCase("dadapt_adam", "optax.contrib.dadapt_adamw", "dadapt_adamw(weight_decay=0.05)",
                  {"weight_decay": 0.05}), "same algorithm"),
    (UpstreamCase("dog", "dog_optimizer.DoG", "DoG()"), UpstreamCase("dog", "optax.contrib.dog", "dog()"),
     "same algorithm (r_ε = 1e-6·(1 + ‖x_0‖) in both)"),
    (UpstreamCase("dog", "dog_optimizer.DoG", "DoG(lr=0.8, init_eta=1e-3)", {"learning_rate": 0.8, "init_eta": 1e-3}),
     UpstreamCase("dog", "optax.contrib.dog", 'dog(0.8, init_step=("learning_rate", 1e-3))',
                  {"learning_rate": 0.8, "init_eta": 1e-3}),
     "the first step: DoG takes init_eta as it is, optax multiplies it by the learning rate"),
    (UpstreamCase("dog", "dog_optimizer.DoG", "DoG(init_eta=1e-3)", {"init_eta": 1e-3}),
     UpstreamCase("dog", "optax.contrib.dog", 'dog(init_step=("learning_rate", 1e-3))', {"init_eta": 1e-3}),
     "same algorithm"),
]


def main() -> None:
    enable_jax_x64()
    init, grad = problem()
    print("### adaptlr vs the upstream packages\n")
    print(agreement_table([c for c in CASES if not c.algorithm.startswith(("schedule_free", "mechanic"))], COLUMNS))

    print("\n### upstream PyTorch vs upstream optax\n")
    print("| algorithm | PyTorch package | optax.contrib | params error | final estimate gap | cause |")
    print("|---|---|---|---|---|---|")
    for torch_case, optax_case, why in UPSTREAM_PAIRS:
        torch_run, torch_d = reference(torch_case, init, grad)
        optax_run, optax_d = reference(optax_case, init, grad)
        gap = "–" if optax_d[-1] is None else f"{abs(torch_d[-1] - optax_d[-1]) / abs(optax_d[-1]):.1e}"
        print(f"| {torch_case.algorithm} | `{torch_case.settings}` | `{optax_case.settings}` | "
              f"{max_rel_err(torch_run, optax_run):.1e} | {gap} | {why} |")


if __name__ == "__main__":
    main()
