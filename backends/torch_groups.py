"""Param-group hyper-parameters of the torch adapter, under ``torch.optim``'s names.

Each param group of :class:`adaptlr.backends.torch.Optimizer` carries the wrapped base optimizer's
hyper-parameters as ``torch.optim`` names them, so schedulers and tools that read or write them work:

============================  ======================================  =============================
group key                     adaptlr attribute                       bases
============================  ======================================  =============================
``lr``                        ``α`` (the user's learning rate)        all
``weight_decay``              ``λ``                                   all
``betas = (β1, β2)``, ``eps``  ``b1``, ``b2``, ``eps``                 Adam(W), RAdam, AdaBelief
``momentum``, ``dampening``,  ``momentum``, ``dampening``,            SGD
``nesterov``                  ``nesterov``
============================  ======================================  =============================

A value changed in a group (``OneCycleLR``/``CyclicLR`` with ``cycle_momentum=True`` write
``betas[0]`` or ``momentum`` every step) takes effect at the next step: :func:`base_for` gives the
base direction with the group's values. Values are checked as ``torch.optim`` checks them
(:func:`check_group`, ``ValueError``).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch

from adaptlr.core import BaseDirection

__all__ = ["base_for", "check_group", "group_defaults", "hyper_key"]

# torch name -> adaptlr attribute names on the base direction
_ADAM_LIKE = {"betas": ("b1", "b2"), "eps": ("eps",)}
_SGD = {"momentum": ("momentum",), "dampening": ("dampening",), "nesterov": ("nesterov",)}


def _names(base: BaseDirection) -> dict[str, tuple[str, ...]]:
    if all(hasattr(base, a) for a in ("b1", "b2", "eps")):
        return _ADAM_LIKE
    if all(hasattr(base, a) for a in ("momentum", "dampening", "nesterov")):
        return _SGD
    return {}


def group_defaults(base: BaseDirection) -> dict[str, Any]:
    """The group defaults of ``base`` under torch's names (``lr`` is set by the adapter)."""
    out: dict[str, Any] = {"weight_decay": float(base.weight_decay)}
    for key, attrs in _names(base).items():
        values = tuple(getattr(base, a) for a in attrs)
        out[key] = values if len(values) > 1 else values[0]
    return out


def _number(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"a tensor hyper-parameter must have one element, got shape {tuple(value.shape)}")
        return float(value)  # a host sync: only when a group is added, as torch.optim does
    return float(value)


def check_group(group: dict, base: BaseDirection, where: str) -> None:
    """Raise ValueError for a group value ``torch.optim`` would reject (and for changes of the state's layout)."""
    lr = _number(group["lr"])
    if not 0.0 <= lr:  # also NaN
        raise ValueError(f"Invalid learning rate in {where}: {group['lr']}")
    decay = _number(group["weight_decay"])
    if not 0.0 <= decay < math.inf:
        raise ValueError(f"Invalid weight_decay value in {where}: {group['weight_decay']}")
    names = _names(base)
    if "betas" in names:
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"betas in {where} must be a pair (beta1, beta2), got {betas!r}")
        for i, beta in enumerate(betas):
            if not 0.0 <= _number(beta) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i} in {where}: {beta}")
        if not 0.0 <= _number(group["eps"]) < math.inf:
            raise ValueError(f"Invalid epsilon value in {where}: {group['eps']}")
    if "momentum" in names:
        momentum, dampening = _number(group["momentum"]), _number(group["dampening"])
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value in {where}: {group['momentum']}")
        if not 0.0 <= dampening <= 1.0:
            raise ValueError(f"Invalid dampening value in {where}: {group['dampening']}")
        if (momentum == 0) != (base.momentum == 0):
            raise ValueError(
                f"momentum in {where} is {momentum} but the wrapped optimizer has momentum={base.momentum}: "
                "a momentum buffer cannot appear or vanish per group; build the optimizer with momentum > 0"
            )
        if group["nesterov"] and (momentum <= 0 or dampening != 0):
            raise ValueError(f"Nesterov momentum in {where} requires a momentum and zero dampening")


def hyper_key(group: dict, base: BaseDirection) -> tuple:
    """The base hyper-parameters of ``group`` (torch names), as a hashable key (floats)."""
    key = []
    for name, attrs in _names(base).items():
        value = group[name]
        if len(attrs) > 1:
            key.extend(_number(x) for x in value)
        elif name == "nesterov":
            key.append(bool(value))
        else:
            key.append(_number(value))
    return tuple(key)


def base_key(base: BaseDirection) -> tuple:
    """:func:`hyper_key` of the base's own values."""
    return hyper_key(group_defaults(base), base)


def base_for(base: BaseDirection, key: tuple) -> BaseDirection:
    """``base`` with the hyper-parameters ``key`` (from :func:`hyper_key`); ``base`` itself if unchanged."""
    if key == base_key(base):
        return base
    changed = copy.copy(base)
    attrs = [a for group_attrs in _names(base).values() for a in group_attrs]
    for attr, value in zip(attrs, key):
        setattr(changed, attr, value)
    return changed
