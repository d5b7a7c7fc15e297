"""Pytree handling: the structure of the parameters, and conversions between trees and leaf lists.

Params, grads and per-parameter state are nested lists, tuples, dicts (and NamedTuples) of arrays.
``optree`` flattens them in C++; every algorithm works on the flat list of leaves and the
:class:`Layout` turns lists back into trees shaped like the params.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optree

__all__ = ["Layout", "leaf_path_names"]


def leaf_path_names(tree: Any) -> list[str]:
    """Readable paths of the leaves of ``tree`` (``"['layer1']['w']"``, ``"[0]"``), in leaf order."""
    paths = optree.tree_paths(tree)
    return ["".join(f"[{key!r}]" for key in path) or "<root>" for path in paths]


class Layout:
    """The tree structure of a params tree.

    ``Layout.of(params)`` flattens params once per step; ``layout.leaves(tree, what)`` flattens a
    tree that must have the same structure (grads, a state field) and names the first differing
    path when it does not; ``layout.tree(leaves)`` rebuilds a tree shaped like the params.
    """

    __slots__ = ("_reference", "num_leaves", "treespec")

    def __init__(self, treespec: optree.PyTreeSpec, reference: Any) -> None:
        self.treespec = treespec
        self.num_leaves = treespec.num_leaves
        self._reference = reference

    @classmethod
    def of(cls, params: Any) -> tuple[Layout, list[Any]]:
        leaves, treespec = optree.tree_flatten(params)
        if not leaves:
            raise ValueError("params contain no arrays: nothing to optimize")
        return cls(treespec, params), leaves

    def paths(self) -> list[str]:
        return leaf_path_names(self._reference)

    def leaves(self, tree: Any, what: str) -> list[Any]:
        """The leaves of ``tree``, which must be structured like the params (else ``ValueError``)."""
        leaves, treespec = optree.tree_flatten(tree)
        if treespec != self.treespec:
            raise ValueError(self._structure_message(tree, treespec, what))
        return leaves

    def tree(self, leaves: Sequence[Any]) -> Any:
        return optree.tree_unflatten(self.treespec, leaves)

    def _structure_message(self, tree: Any, treespec: optree.PyTreeSpec, what: str) -> str:
        expected = self.paths()
        got = leaf_path_names(tree) if treespec.num_leaves else []
        missing = [p for p in expected if p not in got]
        extra = [p for p in got if p not in expected]
        detail = []
        if missing:
            detail.append(f"missing leaf {missing[0]}")
        if extra:
            detail.append(f"unexpected leaf {extra[0]}")
        if not detail:
            detail.append(f"container types differ: params are {self.treespec}, {what} is {treespec}")
        return f"{what} and params have different tree structure: " + "; ".join(detail)
