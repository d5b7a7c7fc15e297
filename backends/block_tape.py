"""Replay one block's step on the next blocks of a blocked torch step: its aten operations, without
the Python that chose them.

:class:`~adaptlr.backends.fast.FlatOptimizer`'s blocked step (the torch adapter's CPU default on
large models) runs :meth:`adaptlr.core.Optimizer.update_leaves` once per block of ~256K elements, so
that a step's many passes stay in cache. Each such call costs ~130 µs of Python (the step's
bookkeeping: layouts, contexts, the choice of each operation) on top of its aten operations, a
third of AdamW's step on ResNet-18 shapes (docs/performance.md, round 19). Every block of a buffer
in one pass of a step runs the same operations on its own elements: the same algorithm, the same
0-D scalars of the step, the same choices (each choice depends on dtypes, on which arrays the
executor donated and on the step's count, all alike for these blocks; never on the values).

So the executor records one block's operations, as the dispatcher sees them
(:class:`~torch.utils._python_dispatch.TorchDispatchMode`), and for the next blocks of that buffer
and pass calls the same operations (:class:`Tape`), with the block's own parameters, gradients
and per-element state views in place of the recorded block's, and each operation's results in
place of the recorded ones. What the recorded block computed from the step's scalars alone (no
array of the block among its inputs: bias corrections, ``-α``, the whole sums of a second pass)
is not computed again: a replay reads the recorded results, as every block's step would have read
the values of the step's :class:`adaptlr.core.Scalars`. The same operations on the same inputs:
the replayed blocks' numbers are bit for bit those of running the step on them
(``tests/test_block_tape.py``).

A tape is made for one step (the scalars it reads are that step's) and only where the recorded
operations allow it (:attr:`Tape.replayable`): an operation on the block's arrays whose result is
not an array (a host read: the step would branch on the block's values) or that writes an array the
blocks share, and an operation that writes into a result the replays would not make again, make
the tape refuse, and the blocks run their steps as before; an argument that names the block's
length (an array made with the block's shape) keeps the tape to blocks of that length.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["Tape", "recording"]


class Tape:
    """The aten operations of one block's step that read the block's arrays, in order.

    Each entry is ``(op, args, kwargs, subs, outs, done)``: ``args``/``kwargs`` as recorded, with
    the block's arrays left out (None); ``subs`` where they go, ``(position, index in a list argument
    or None, slot)`` (a position is an int for ``args``, a str for ``kwargs``); ``outs`` the slots of
    the results (an int, a tuple of ints, or None); ``done`` the slots last read here (:meth:`finish`).
    Slots ``0..inputs-1`` are the block's inputs, the next ones the operations' results in order.
    """

    __slots__ = ("_inputs", "_ops", "_outputs", "_slots", "length", "replayable", "sized")

    def __init__(self, inputs: int, length: int) -> None:
        self._ops: list[tuple] = []
        self._outputs: tuple[int, ...] = ()
        self._inputs = inputs
        self._slots = inputs
        self.length = length  # the recorded block's elements
        self.replayable = True
        self.sized = False  # an argument names the block's length: replay only blocks of that length

    def fits(self, inputs: list) -> bool:
        """Whether the tape may run on a block with these inputs (same number; same length where
        an operation named it)."""
        if not self.replayable or len(inputs) != self._inputs:
            return False
        return not self.sized or all(x.numel() == self.length for x in inputs)

    def replay(self, inputs: list) -> list:
        """The recorded block's step on the block whose parameters, gradients and per-element state
        views are ``inputs`` (in the recorded order); returns its results named by :meth:`finish`
        (a first pass's partial sums)."""
        values: list = [*inputs, *([None] * (self._slots - self._inputs))]
        for op, args, kwargs, subs, outs, done in self._ops:
            if subs:
                args = list(args)
                if kwargs:
                    kwargs = dict(kwargs)
                for where, index, slot in subs:
                    holder = args if isinstance(where, int) else kwargs
                    if index is None:
                        holder[where] = values[slot]
                    else:
                        items = holder[where] = list(holder[where])
                        items[index] = values[slot]
            result = op(*args, **kwargs)
            if outs is not None:
                if isinstance(outs, int):
                    values[outs] = result
                else:
                    for slot, x in zip(outs, result):
                        values[slot] = x
            for slot in done:  # results read for the last time: freed, as the step frees them
                values[slot] = None
        return [values[slot] for slot in self._outputs]

    def finish(self, outputs: tuple[int, ...] = ()) -> None:
        """After recording: the slots :meth:`replay` returns, and each entry learns which results it
        reads (or makes) for the last time (an output's last read is the replay's end)."""
        self._outputs = outputs
        last: dict[int, int] = {}
        for k, (_, _, _, subs, outs, _) in enumerate(self._ops):
            made = () if outs is None else (outs,) if isinstance(outs, int) else outs
            for slot in (*[s for _, _, s in subs], *made):
                last[slot] = k
        done: list[list[int]] = [[] for _ in self._ops]
        for slot, k in last.items():
            if slot >= self._inputs and slot not in outputs:
                done[k].append(slot)
        self._ops = [(*entry[:5], tuple(d)) for entry, d in zip(self._ops, done)]

    # -- recording ---------------------------------------------------------------------------

    def _new_slot(self) -> int:
        self._slots += 1
        return self._slots - 1


class _Recording(TorchDispatchMode):
    """Runs every operation and records on ``tape`` those that read the block's arrays (or write
    an array the step shares with other blocks)."""

    def __init__(self, tape: Tape, inputs: list) -> None:
        super().__init__()
        self.tape = tape
        # id -> (weak reference, slot): the block's arrays, and the results made from them (a weak
        # reference, so a freed temporary's id, reused by another array, is not taken for it)
        self._where: dict[int, tuple[Any, int]] = {}
        self._made: dict[int, Any] = {}  # id -> weak reference: what the step made from its scalars alone
        for slot, x in enumerate(inputs):
            self._bind(x, slot)
        self._lengths = {x.numel() for x in inputs} | {d for x in inputs for d in x.shape}

    def _bind(self, x: torch.Tensor, slot: int) -> None:
        self._where[id(x)] = (weakref.ref(x), slot)

    def _slot(self, x: torch.Tensor) -> int | None:
        found = self._where.get(id(x))
        return found[1] if found is not None and found[0]() is x else None

    def _template(self, values: Any, subs: list, where: Any) -> Any:
        """``values`` (an argument) with the block's arrays left out, their slots added to ``subs``."""
        if isinstance(values, torch.Tensor):
            slot = self._slot(values)
            if slot is None:
                return values
            subs.append((where, None, slot))
            return None
        if isinstance(values, list | tuple):
            items = list(values)
            for k, x in enumerate(values):
                if isinstance(x, torch.Tensor):
                    slot = self._slot(x)
                    if slot is not None:
                        subs.append((where, k, slot))
                        items[k] = None
                elif self._names_length(x):
                    self.tape.sized = True
            return items if isinstance(values, list) else tuple(items)
        if self._names_length(values):
            self.tape.sized = True
        return values

    def _writes_shared(self, func: Any, args: tuple, kwargs: dict) -> bool:
        """Whether ``func`` writes into an argument that is not one of the block's arrays."""
        for position, name in _written(func):
            value = args[position] if position < len(args) else kwargs.get(name)
            values = value if isinstance(value, list | tuple) else [value]
            if any(isinstance(x, torch.Tensor) and self._slot(x) is None for x in values):
                return True
        return False

    def _writes_made(self, func: Any, args: tuple, kwargs: dict) -> bool:
        """Whether ``func`` writes into a result of an operation the tape does not replay."""
        for position, name in _written(func):
            value = args[position] if position < len(args) else kwargs.get(name)
            for x in value if isinstance(value, list | tuple) else [value]:
                found = self._made.get(id(x)) if isinstance(x, torch.Tensor) else None
                if found is not None and found() is x:
                    return True
        return False

    def finish(self, results: list) -> Tape | None:
        """The tape, once the block's step has run (None where it refused a replay); ``results``:
        arrays the step handed to the executor (a first pass's partial sums), which a replay returns."""
        slots = [self._slot(x) if isinstance(x, torch.Tensor) else None for x in results]
        if any(slot is None for slot in slots):  # not made from the block's arrays: nothing to replay
            self.tape.replayable = False
        self.tape.finish(tuple(slot for slot in slots if slot is not None))
        return self.tape if self.tape.replayable else None

    def _names_length(self, x: Any) -> bool:
        return type(x) is int and x in self._lengths

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        tape = self.tape
        if not tape.replayable:
            return result
        subs: list = []
        arg_template = tuple(self._template(a, subs, k) for k, a in enumerate(args))
        kwarg_template = {key: self._template(a, subs, key) for key, a in kwargs.items()}
        if not subs:
            if func._schema.is_mutable:
                if self._writes_made(func, args, kwargs):
                    # it writes what this block's step made: each block's step makes its own, a
                    # replay would write the recorded block's again
                    tape.replayable = False
                    return result
                # it writes an array the step was given (its state, its scalars): so does every block's
                tape._ops.append((_callable(func), arg_template, kwarg_template, (), None, ()))
            elif isinstance(result, torch.Tensor):
                self._made[id(result)] = weakref.ref(result)
                if result.ndim:
                    tape.sized = True  # an array made without the block's arrays: the replays share it
            return result  # computed once: the replays read this result
        if self._writes_shared(func, args, kwargs):
            # it writes, from the block's arrays, an array the step shares with the other blocks:
            # a replay would start from what the recorded block left there
            tape.replayable = False
            return result
        if isinstance(result, torch.Tensor):
            outs: Any = tape._new_slot()
            self._bind(result, outs)
        elif isinstance(result, list | tuple) and all(isinstance(x, torch.Tensor) for x in result):
            outs = tuple(tape._new_slot() for _ in result)
            for x, slot in zip(result, outs):
                self._bind(x, slot)
        elif result is None:
            outs = None
        else:  # a number read from the block's arrays: the step branches on them
            tape.replayable = False
            return result
        tape._ops.append((_callable(func), arg_template, kwarg_template, tuple(subs), outs, ()))
        return result


_WRITTEN: dict[Any, tuple] = {}


def _callable(func: Any) -> Any:
    """The operator itself (``OpOverload._op``: the same call without the overload's Python frame)."""
    return getattr(func, "_op", func)


def _written(func: Any) -> tuple:
    """``(position, name)`` of each argument that ``func`` writes into (its schema's alias annotations)."""
    found = _WRITTEN.get(func)
    if found is None:
        found = _WRITTEN[func] = tuple((k, a.name) for k, a in enumerate(func._schema.arguments)
                                       if a.alias_info is not None and a.alias_info.is_write)
    return found


def recording(tape: Tape, inputs: list) -> _Recording:
    """A context in which the operations of one block's step, whose arrays are ``inputs``, are
    recorded on ``tape`` (and run); its ``finish(results)`` gives the tape, or None."""
    return _Recording(tape, inputs)
