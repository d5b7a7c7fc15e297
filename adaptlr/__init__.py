"""adaptlr: adaptive learning-rate optimizers written once against the Python array API.

Runs unchanged on NumPy, PyTorch, JAX and CuPy arrays (and any array-API library). Every optimizer
is a base direction times a learning rate (spec §0.1); adaptations wrap any base optimizer::

    opt = adaptlr.active(adaptlr.adamw(1e-3), steps_per_epoch=len(loader))
    state = opt.init(params)
    updates, state = opt.update(grads, state, params)
    params = adaptlr.apply_updates(params, updates)
"""

from adaptlr.adabelief import adabelief
from adaptlr.adam import adam, adamw
from adaptlr.core import Optimizer, OptimizerState, apply_updates, learning_rates
from adaptlr.radam import radam
from adaptlr.sgd import sgd

__version__ = "0.1.0"

__all__ = [
    "Optimizer",
    "OptimizerState",
    "adabelief",
    "adam",
    "adamw",
    "apply_updates",
    "learning_rates",
    "radam",
    "sgd",
]
