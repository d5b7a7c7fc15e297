"""MkDocs hook: the API reference of every name in ``adaptlr.__all__``, generated at build time.

``docs/api/adaptlr.md`` holds the marker ``<!-- adaptlr.__all__ -->``; this hook replaces it with one
mkdocstrings block per public name, grouped by the module that defines it. A name added to
``adaptlr.__all__`` therefore appears in the reference with no edit to the docs
(``tests/test_docs_site.py`` checks that every public name has a docstring and an entry).

The blocks use the defining path (``adaptlr.active.active``): in ``adaptlr`` a function and the module
that defines it often share a name, and Griffe, which reads the source statically, resolves
``adaptlr.active`` to the module. The heading shows the public name (``adaptlr.active``).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

MARKER = "<!-- adaptlr.__all__ -->"
PAGE = "api/adaptlr.md"

# The order of the groups on the page: the functional core first, then the base optimizers, the
# adaptations and the learning-rate-free bases. Modules not listed (new ones) follow, alphabetically.
MODULE_ORDER = [
    "adaptlr.core", "adaptlr.summary", "adaptlr.checkpoint", "adaptlr.nonfinite",
    "adaptlr.sgd", "adaptlr.adam", "adaptlr.radam", "adaptlr.adabelief",
    "adaptlr.active", "adaptlr.autodrop", "adaptlr.hypergradient", "adaptlr.dsa", "adaptlr.eg",
    "adaptlr.prodigy", "adaptlr.dadapt", "adaptlr.dog",
]


def public_names() -> dict[str, list[tuple[str, str]]]:
    """``{defining module: [(public name, defining path), ...]}`` for every name in ``adaptlr.__all__``."""
    adaptlr = importlib.import_module("adaptlr")
    groups: dict[str, list[tuple[str, str]]] = {}
    for name in adaptlr.__all__:
        obj = getattr(adaptlr, name)
        module = getattr(obj, "__module__", None) or "adaptlr"
        qualname = getattr(obj, "__qualname__", name)
        groups.setdefault(module, []).append((name, f"{module}.{qualname}"))
    rank = {module: i for i, module in enumerate(MODULE_ORDER)}
    return dict(sorted(groups.items(), key=lambda item: (rank.get(item[0], len(rank)), item[0])))


def _module_title(module: str) -> str:
    """The start of a module's docstring up to ``:`` or `` (`` (``"ActiveLR"``), else the module's name."""
    doc = inspect.getdoc(importlib.import_module(module)) or ""
    title = doc.split("\n")[0].split(":")[0].split(" (")[0].strip().rstrip(".")
    return module if not title or title.startswith("`") or len(title) > 60 else title


def reference_markdown() -> str:
    """The Markdown that replaces :data:`MARKER`: a section per module (its docstring: the update rule
    and the paper), then a mkdocstrings block per name."""
    parts = []
    for module, names in public_names().items():
        parts.append(f"## {_module_title(module)}\n\nModule `{module}`:\n\n"
                     f"::: {module}\n"
                     f"    options:\n"
                     f"      members: false\n"
                     f"      show_root_heading: false\n"
                     f"      show_root_toc_entry: false\n")
        for name, path in names:
            parts.append(f"::: {path}\n"
                         f"    options:\n"
                         f'      heading: "adaptlr.{name}"\n'
                         f'      toc_label: "adaptlr.{name}"\n'
                         f"      heading_level: 3\n")
    return "\n".join(parts)


def on_page_markdown(markdown: str, page: Any, **kwargs: Any) -> str:
    """Expands :data:`MARKER` on the API page of ``adaptlr``."""
    if page.file.src_uri != PAGE:
        return markdown
    if MARKER not in markdown:
        raise ValueError(f"{PAGE} lost its marker {MARKER!r}: the public names would not be documented")
    return markdown.replace(MARKER, reference_markdown())
