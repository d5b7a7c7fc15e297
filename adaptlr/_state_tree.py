"""The fields of an optimizer state: which are per-parameter trees and which are global arrays.

An :class:`adaptlr.OptimizerState` nests NamedTuples (and tuples) whose fields are either trees
shaped like the params (``mu``, ``gamma``: one array per parameter) or single arrays shared by all
parameters (the step counter, AutoDrop's angle, a global learning rate). The checkpoint format, the
torch adapter (which stores per-parameter fields in ``optimizer.state[p]`` and may update a subset of
the parameters) and :func:`adaptlr.lr_summary` all need that split; :func:`split_state` computes it
once and :func:`rebuild_state` puts a state back together from the pieces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import optree

from adaptlr import _validation as v

__all__ = ["Field", "Node", "dtype_name", "field_values", "rebuild_state", "split_state", "to_numpy"]


class Field(NamedTuple):
    """One leaf field of a state: ``path`` (``"base.mu"``), whether it is per-parameter, its value."""

    path: str
    per_param: bool
    value: Any


class Node(NamedTuple):
    """The skeleton of a state: ``kind`` is "namedtuple", "tuple", "list", "none" or "field".

    ``cls`` is the NamedTuple class (kind "namedtuple"), ``children`` the child nodes, ``index`` the
    position in the field list (kind "field").
    """

    kind: str
    cls: Any = None
    children: tuple = ()
    index: int = -1


def _is_namedtuple(x: Any) -> bool:
    return isinstance(x, tuple) and hasattr(type(x), "_fields")


def split_state(state: Any, params_treespec: optree.PyTreeSpec) -> tuple[Node, list[Field]]:
    """``(skeleton, fields)`` of ``state``, whose per-parameter trees have ``params_treespec``.

    A subtree with the params' structure (each parameter's slot an array, or a small tree of arrays
    such as DSA's ``{kind: factor}``) is one per-parameter field, unless the params are a single
    array, where every array is treated as its own field; any other array is a global field.
    """
    fields: list[Field] = []
    skeleton = _split_node(state, "", fields, params_treespec, params_treespec.is_leaf())
    return skeleton, fields


# The walks below are module-level functions, not recursive closures: a closure that calls itself
# is a reference cycle (function -> cell -> function) that keeps what it captured (the state's
# arrays) alive until Python's cyclic collector runs, which on a large model held a step's new
# state as extra memory into the next step.


def _split_node(node: Any, path: str, fields: list[Field], params_treespec: optree.PyTreeSpec,
                params_is_leaf: bool) -> Node:
    if node is None:
        return Node("none")
    if not params_is_leaf and not _is_namedtuple(node) and _is_per_param(node, params_treespec):
        fields.append(Field(path, True, node))
        return Node("field", index=len(fields) - 1)
    if _is_namedtuple(node):
        names = type(node)._fields
        children = tuple(_split_node(child, f"{path}.{name}" if path else name, fields, params_treespec,
                                     params_is_leaf) for name, child in zip(names, node))
        return Node("namedtuple", type(node), children)
    if isinstance(node, (tuple, list)):
        children = tuple(_split_node(child, f"{path}[{i}]", fields, params_treespec, params_is_leaf)
                         for i, child in enumerate(node))
        return Node("tuple" if isinstance(node, tuple) else "list", children=children)
    if v.library_of(node) is None:
        raise TypeError(f"optimizer state field {path} is a {type(node).__name__}, not an array")
    fields.append(Field(path, False, node))
    return Node("field", index=len(fields) - 1)


def _is_per_param(node: Any, params_treespec: optree.PyTreeSpec) -> bool:
    # Cheap rejection first: a failing flatten_up_to formats both trees into its error message,
    # which costs ~0.1 s for a state of hundreds of tensors.
    if type(node) is not params_treespec.type or (
            isinstance(node, (list, tuple, dict)) and len(node) != params_treespec.num_children):
        return False
    try:
        params_treespec.flatten_up_to(node)  # pyright: ignore[reportArgumentType] (optree's PyTree type: no list[Any])
    except (ValueError, TypeError):
        return False
    return True


def slots(value: Any, params_treespec: optree.PyTreeSpec) -> list[Any]:
    """The per-parameter slots of a per-parameter field (an array or a small tree each)."""
    return params_treespec.flatten_up_to(value)


def from_slots(slots: list[Any], params_treespec: optree.PyTreeSpec) -> Any:
    """The per-parameter field with these slots (inverse of :func:`slots`)."""
    return optree.tree_unflatten(params_treespec, slots)


def rebuild_state(skeleton: Node, values: list[Any]) -> Any:
    """The state with skeleton ``skeleton`` and field values ``values`` (in field order)."""
    if skeleton.kind == "field":
        return values[skeleton.index]
    if skeleton.kind == "none":
        return None
    children = [rebuild_state(child, values) for child in skeleton.children]
    if skeleton.kind == "namedtuple":
        return skeleton.cls(*children)
    return tuple(children) if skeleton.kind == "tuple" else children


def field_values(skeleton: Node, state: Any, num_fields: int) -> list[Any]:
    """The field values of ``state`` in field order (inverse of :func:`rebuild_state`); ``state`` must
    have the structure of ``skeleton`` (cheaper than :func:`split_state` when the skeleton is known)."""
    out: list[Any] = [None] * num_fields
    _collect_fields(skeleton, state, out)
    return out


def _collect_fields(node: Node, value: Any, out: list[Any]) -> None:
    if node.kind == "field":
        out[node.index] = value
        return
    if node.kind == "none":
        if value is not None:
            raise RuntimeError("the optimizer changed the layout of its state during a step")
        return
    if (node.kind == "namedtuple" and type(value) is not node.cls) or len(value) != len(node.children):
        raise RuntimeError("the optimizer changed the layout of its state during a step")
    for child, item in zip(node.children, value):
        _collect_fields(child, item, out)


def map_fields(state: Any, params_treespec: optree.PyTreeSpec, fn: Callable[[Field], Any]) -> Any:
    """``state`` with every field value replaced by ``fn(field)``."""
    skeleton, fields = split_state(state, params_treespec)
    return rebuild_state(skeleton, [fn(f) for f in fields])


def dtype_name(dtype: Any) -> str:
    """``"float32"`` for NumPy, torch (``torch.float32``), JAX and array-api-strict dtypes alike."""
    name = str(dtype)
    for prefix in ("torch.", "array_api_strict.", "dtype("):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return name.strip("')\"")


def to_numpy(x: Any, *, bits: bool = False) -> np.ndarray:
    """A host NumPy copy of the array ``x`` of any library (a sync: for logging and checkpoints).

    With ``bits=True`` a bfloat16 array comes back as its int16 bit pattern (NumPy has no bfloat16);
    otherwise bfloat16 is widened to float32.
    """
    library = v.library_of(x)
    if library == "torch":
        x = x.detach()
        if dtype_name(x.dtype) == "bfloat16":
            x = x.view(_torch_int16(x)) if bits else x.float()
        return x.cpu().numpy()
    if library == "cupy":
        x = x.get()
    elif library == "array_api_strict":
        import array_api_strict

        x = array_api_strict.asarray(x, device=array_api_strict.Device("CPU_DEVICE"))
    out = np.asarray(x)
    if dtype_name(out.dtype) == "bfloat16":
        out = out.view(np.int16) if bits else out.astype(np.float32)
    return out


def _torch_int16(x: Any) -> Any:
    import array_api_compat

    return array_api_compat.array_namespace(x).int16
