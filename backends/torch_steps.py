"""Per-parameter step counts for the torch adapter's base optimizer, as ``torch.optim`` keeps them.

The functional API has one step counter ``t`` (spec §0): the base's bias correction (Adam, RAdam,
AdaBelief), SGD's first-step momentum and the adaptations' epoch boundaries all follow it. A
``torch.optim`` optimizer counts steps per parameter instead (``state[p]["step"]``), so a parameter
that first gets a gradient late (progressive unfreezing, ``add_param_group`` mid-run) starts with
its own first step. The adapter keeps both: ``state[p]["step"]`` counts the steps that updated
``p``, and :class:`PerParameterSteps` runs the base direction with those counts, while the
adaptations keep the optimizer's step counter (an epoch is the same for every parameter).

Parameters that step together share one 0-D count tensor (the step adds 1 once per distinct
tensor), so in the usual case, where every parameter steps every time, the base runs once, with one
count, exactly as in the functional API.
"""

from __future__ import annotations

from typing import Any

from adaptlr.backends.fast import ListLayout
from adaptlr.core import BaseDirection, Scalars, StepContext, StepSize

__all__ = ["PerParameterSteps", "advance", "by_identity"]


def by_identity(tensors: list) -> list[tuple[Any, list[int]]]:
    """``[(tensor, indices)]``: the positions of each distinct tensor object in ``tensors``, in order."""
    groups: list[tuple[Any, list[int]]] = []
    for i, t in enumerate(tensors):
        for first, members in groups:
            if first is t:
                members.append(i)
                break
        else:
            groups.append((t, [i]))
    return groups


def advance(entries: list[dict]) -> list:
    """``entry["step"] += 1`` for each state entry, one addition per distinct count tensor (entries that
    shared a count keep sharing one); returns the new counts, one per entry."""
    out: list = [None] * len(entries)
    for old, members in by_identity([e["step"] for e in entries]):
        new = old + 1
        for i in members:
            entries[i]["step"] = new
            out[i] = new
    return out


class PerParameterSteps(BaseDirection):
    """``base`` with the step count of each leaf taken from :attr:`steps` (set before each update).

    ``steps``: a 0-D count tensor for every leaf, or a list of one per leaf (leaves with the same
    tensor object run together); None: the optimizer's count. The base's state fields must be lists
    of per-leaf values (or None), as the adapter's list layout makes them.
    """

    def __init__(self, base: BaseDirection) -> None:
        self.base = base
        self.steps: Any = None
        self.name = base.name
        self.state_class = base.state_class
        self.learning_rate = base.learning_rate
        self.weight_decay = base.weight_decay
        self.decoupled = base.decoupled
        self.flat_safe = True  # every base is elementwise; flat_safety checks the base itself first

    def init(self, params: list, layout: Any, xp: Any) -> Any:
        return self.base.init(params, layout, xp)

    def step(self, ctx: StepContext, size: StepSize, state: Any) -> tuple[list, StepSize, Any]:
        if type(self.base).step is BaseDirection.step:  # a direction per leaf: counts per parameter
            return super().step(ctx, size, state)
        # A learning-rate-free base estimates one rate from every parameter and counts the steps of the
        # optimizer, as its upstream package does (Prodigy's and D-Adaptation's ``k`` per optimizer).
        return self.base.step(ctx, size, state)

    def direction(self, grads: list, state: Any, scalars: Scalars, layout: Any) -> tuple[list, Any]:
        steps = self.steps
        if steps is None:
            return self.base.direction(grads, state, scalars, layout)
        if not isinstance(steps, list):
            return self.base.direction(grads, state, scalars.with_count(steps), layout)
        groups = by_identity(steps)
        if len(groups) == 1:
            return self.base.direction(grads, state, scalars.with_count(steps[0]), layout)
        fields = list(state)
        if any(f is not None and not isinstance(f, list) for f in fields):
            raise TypeError(f"{self.name}: per-parameter step counts need a state of per-leaf lists")
        directions: list = [None] * len(grads)
        new_fields: list = [None if f is None else [None] * len(grads) for f in fields]
        for count, members in groups:
            sub_state = type(state)(*[None if f is None else [f[i] for i in members] for f in fields])
            sub_directions, sub_new = self.base.direction(
                [grads[i] for i in members], sub_state, scalars.with_count(count),
                ListLayout(len(members)))
            for k, i in enumerate(members):
                directions[i] = sub_directions[k]
                for field, values in zip(new_fields, sub_new):
                    if field is not None:
                        field[i] = values[k]
        return directions, type(state)(*new_fields)
