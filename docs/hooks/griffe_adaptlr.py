"""Griffe extension for adaptlr's API reference (``mkdocs.yml``, mkdocstrings ``extensions``).

Two things Griffe cannot know from the source alone:

1. pyproject installs ``backends/`` and ``conformance/`` as ``adaptlr.backends`` and
   ``adaptlr.conformance`` (``[tool.setuptools.package-dir]``). Griffe reads the source statically and
   only follows a package's own folder, so this attaches those folders to ``adaptlr`` under their
   installed names (otherwise ``adaptlr.backends.torch`` is not found at all).
2. The docstrings are Google style with Sphinx cross-reference roles (``:func:`adaptlr.adam```),
   which Markdown would show verbatim; they are rendered as code (``adaptlr.adam``), and a Sphinx
   literal-block marker ``::`` at the end of a line as ``:``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import griffe

ROOT = Path(__file__).resolve().parents[2]
SUBPACKAGES = {"backends": ROOT / "backends", "conformance": ROOT / "conformance"}
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`~?([^`]+)`")
_LITERAL_MARKER = re.compile(r"(?<=\S)::$", re.M)


def markdown_docstring(text: str) -> str:
    """``text`` with Sphinx roles turned into code spans and ``::`` literal markers into ``:``."""
    text = _ROLE.sub(lambda m: f"`{m.group(1)}`", text)
    return _LITERAL_MARKER.sub(":", text)


class AdaptlrDocs(griffe.Extension):
    """Attaches ``adaptlr.backends`` / ``adaptlr.conformance`` and converts Sphinx roles."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = markdown_docstring(obj.docstring.value)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.name != "adaptlr":
            return
        for name, path in SUBPACKAGES.items():
            pkg.set_member(name, loader.load(path))
