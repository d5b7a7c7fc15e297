"""MkDocs hook: pages added to some docs folders join their nav section without editing mkdocs.yml.

For each section of ``SECTIONS`` (nav title -> folder under docs/), every ``folder/*.md`` that the nav
does not list yet is appended to that section, sorted by file name, titled by its first heading (with
a trailing ``(spec §N)`` dropped). A new algorithm or reproduction page is then in the navigation as
soon as it exists, and the strict build never fails on a nav entry for a page renamed elsewhere.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SECTIONS = {"Algorithms": "algorithms", "Reproductions": "reproductions", "Framework guides": "frameworks"}


def _listed(nav: Any) -> set[str]:
    """Every page path anywhere in ``nav``."""
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav))
    return set()


def page_title(path: Path) -> str:
    """The first ``# `` heading of a page (without a trailing ``(spec §N...)``), else its file name."""
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("# "):
            return re.sub(r"\s*\(spec §[^)]*\)\s*$", "", line[2:].strip())
    return path.stem


def missing_pages(nav: list, docs_dir: Path) -> dict[str, list[dict[str, str]]]:
    """``{section title: [{title: path}, ...]}``: the pages of each section's folder not in ``nav``."""
    listed = _listed(nav)
    out = {}
    for title, folder in SECTIONS.items():
        pages = sorted((docs_dir / folder).glob("*.md"))
        rel = [p.relative_to(docs_dir).as_posix() for p in pages]
        out[title] = [{page_title(p): r} for p, r in zip(pages, rel) if r not in listed]
    return out


def on_config(config: Any, **kwargs: Any) -> Any:
    """Appends the missing pages to their sections of ``config["nav"]``."""
    nav = config["nav"]
    if not nav:
        return config
    additions = missing_pages(nav, Path(config["docs_dir"]))
    for item in nav:
        if isinstance(item, dict) and len(item) == 1:
            (title, entries), = item.items()
            if title in additions and isinstance(entries, list):
                entries.extend(additions[title])
            elif title in additions and isinstance(entries, str) and additions[title]:
                item[title] = [{"Overview": entries}, *additions[title]]
    return config
