"""adaptlr: adaptive learning-rate optimizers written once against the Python array API.

Runs unchanged on NumPy, PyTorch, JAX and CuPy arrays (and any array-API library). Every optimizer
is a base direction times a learning rate (spec §0.1); adaptations wrap any base optimizer::

    opt = adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=len(loader))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = adaptlr.apply_updates(params, updates)
"""

from adaptlr.active import active, active_adabelief, active_adamw, active_radam, active_sgd
from adaptlr.adabelief import adabelief
from adaptlr.adam import adam, adamw
from adaptlr.autodrop import autodrop, autodrop_detector
from adaptlr.checkpoint import load_state, save_state
from adaptlr.core import Optimizer, OptimizerState, apply_updates, learning_rates
from adaptlr.dadapt import dadapt_adam, dadapt_sgd
from adaptlr.dog import dog, dowg
from adaptlr.dsa import dsa
from adaptlr.eg import eg_step_size
from adaptlr.hypergradient import adam_hd, hypergradient, sgd_hd, sgdn_hd
from adaptlr.mechanic import mechanic
from adaptlr.nonfinite import skip_nonfinite
from adaptlr.prodigy import prodigy
from adaptlr.radam import radam
from adaptlr.schedule_free import (
    schedule_free,
    schedule_free_adamw,
    schedule_free_eval_params,
    schedule_free_sgd,
    schedule_free_train_params,
)
from adaptlr.sgd import sgd
from adaptlr.summary import lr_summary

__version__ = "0.1.0"

__all__ = [
    "Optimizer",
    "OptimizerState",
    "active",
    "active_adabelief",
    "active_adamw",
    "active_radam",
    "active_sgd",
    "adabelief",
    "adam",
    "adam_hd",
    "adamw",
    "apply_updates",
    "autodrop",
    "autodrop_detector",
    "dadapt_adam",
    "dadapt_sgd",
    "dog",
    "dowg",
    "dsa",
    "eg_step_size",
    "hypergradient",
    "learning_rates",
    "load_state",
    "lr_summary",
    "mechanic",
    "prodigy",
    "radam",
    "save_state",
    "schedule_free",
    "schedule_free_adamw",
    "schedule_free_eval_params",
    "schedule_free_sgd",
    "schedule_free_train_params",
    "sgd",
    "sgd_hd",
    "sgdn_hd",
    "skip_nonfinite",
]
