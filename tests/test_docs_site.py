"""The documentation site (mkdocs.yml) documents every public name.

The API page of ``adaptlr`` is generated at build time from ``adaptlr.__all__`` by
``docs/hooks/api_reference.py``; these tests check, without building the site (CI builds it with
``mkdocs build --strict``, which needs the ``docs`` extra), that every public name has a docstring
and an entry in that page, and that each framework module has its page.
"""

from __future__ import annotations

import ast
import doctest
import importlib
import importlib.util
import inspect
import re
from pathlib import Path

import pytest

import adaptlr

ROOT = Path(__file__).resolve().parent.parent
# module -> its page in the API reference (besides adaptlr's generated one)
MODULE_PAGES = {
    "adaptlr.backends.torch": "api/torch.md",
    "adaptlr.backends.jax": "api/jax.md",
    "adaptlr.backends.keras": "api/keras.md",
    "adaptlr.backends.fast": "api/fast.md",
    "adaptlr.conformance": "api/conformance.md",
}


def _hook(name: str = "api_reference"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "docs" / "hooks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _nav_pages() -> set[str]:
    """The pages named in mkdocs.yml's nav (``Title: path.md`` lines)."""
    text = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    nav = text[text.index("\nnav:"):]
    return set(re.findall(r":\s+(\S+\.md)\s*$", nav, re.M))


@pytest.mark.parametrize("name", adaptlr.__all__)
def test_public_name_has_a_docstring(name):
    doc = inspect.getdoc(getattr(adaptlr, name))
    assert doc and doc.strip(), f"adaptlr.{name} has no docstring"


_ARGS_SECTION = re.compile(r"^(?:Args|Arguments|Parameters):\n((?:[ \t]+.*\n?|\n)+)", re.M)
_ARG_ENTRY = re.compile(r"^    (\S[^:]*?)(?: \([^)]*\))?:(?:\s|$)", re.M)


@pytest.mark.parametrize("name", adaptlr.__all__)
def test_documented_arguments_are_parameters(name):
    """What Griffe (mkdocstrings) warns about: an ``Args:`` entry that is not one parameter name."""
    obj = getattr(adaptlr, name)
    doc = inspect.getdoc(obj) or ""
    section = _ARGS_SECTION.search(doc)
    if section is None or not callable(obj):
        return
    parameters = set(inspect.signature(obj).parameters)
    entries = [m.group(1).lstrip("*") for m in _ARG_ENTRY.finditer(section.group(1))]
    assert entries, f"adaptlr.{name}: an empty Args section"
    wrong = [e for e in entries if e not in parameters]
    assert not wrong, f"adaptlr.{name}: Args entries {wrong} are not parameters {sorted(parameters)} (one name each)"


def test_every_public_name_has_an_entry_in_the_reference():
    hook = _hook()
    markdown = hook.reference_markdown()
    entries = re.findall(r'^::: (\S+)\n    options:\n      heading: "adaptlr\.(\w+)"', markdown, re.M)
    assert sorted(name for _, name in entries) == sorted(adaptlr.__all__)
    for path, name in entries:  # each entry points at the object adaptlr.<name> is
        module, _, qualname = path.rpartition(".")
        assert getattr(importlib.import_module(module), qualname) is getattr(adaptlr, name), path
    page = (ROOT / "docs" / hook.PAGE).read_text(encoding="utf-8")
    assert hook.MARKER in page
    assert hook.PAGE in _nav_pages()


def test_reference_groups_names_by_module_with_the_core_first():
    groups = list(_hook().public_names())
    assert groups[0] == "adaptlr.core"
    assert sorted(groups) == sorted({getattr(adaptlr, n).__module__ for n in adaptlr.__all__})


def test_the_hook_refuses_a_page_without_its_marker():
    hook = _hook()

    class Page:
        class file:
            src_uri = hook.PAGE

    with pytest.raises(ValueError, match="marker"):
        hook.on_page_markdown("# adaptlr\n", page=Page)
    assert hook.on_page_markdown("text", page=type("P", (), {"file": type("F", (), {"src_uri": "x.md"})})) == "text"


def _public_docstrings(module_name: str) -> dict[str, str | None]:
    """``{name: docstring}`` of a module's ``__all__``, read from the source (no framework imported)."""
    if module_name == "adaptlr.conformance":  # re-exports from its submodules; needs only NumPy
        module = importlib.import_module(module_name)
        return {n: inspect.getdoc(getattr(module, n)) for n in module.__all__
                if not isinstance(getattr(module, n), dict)}  # the registries are data, described in the module
    tree = ast.parse((ROOT / "backends" / f"{module_name.rpartition('.')[2]}.py").read_text(encoding="utf-8"))
    defined = {node.name: ast.get_docstring(node) for node in tree.body
               if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    names = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                 and any(isinstance(target, ast.Name) and target.id == "__all__" for target in node.targets))
    return {n: defined.get(n) for n in names if n in defined}  # constants have no docstring of their own


@pytest.mark.parametrize("module_name", list(MODULE_PAGES))
def test_framework_module_has_a_page_and_docstrings(module_name):
    page = MODULE_PAGES[module_name]
    text = (ROOT / "docs" / page).read_text(encoding="utf-8")
    assert re.search(rf"^::: {re.escape(module_name)}$", text, re.M), f"{page} does not document {module_name}"
    assert page in _nav_pages()
    docstrings = _public_docstrings(module_name)
    assert docstrings, f"{module_name}: no public functions or classes found"
    undocumented = [n for n, doc in docstrings.items() if not (doc or "").strip()]
    assert not undocumented, f"{module_name}: no docstring for {undocumented}"


def _examples() -> list[tuple[str, doctest.DocTest]]:
    finder = doctest.DocTestFinder(recurse=True, exclude_empty=True)
    found = []
    for name in adaptlr.__all__:
        for test in finder.find(getattr(adaptlr, name), f"adaptlr.{name}", globs={}):
            if test.examples:
                found.append((test.name, test))
    return found


@pytest.mark.parametrize("test", [t for _, t in _examples()], ids=[n for n, _ in _examples()])
def test_docstring_examples_run(test):
    """The ``>>>`` examples of the public docstrings (shown in the API reference) give what they show."""
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    output: list[str] = []
    runner.run(test, out=output.append)
    assert runner.failures == 0, "".join(output)


def test_every_page_is_in_the_navigation():
    """Each page is in mkdocs.yml's nav, or in a folder whose new pages docs/hooks/nav_sections.py adds."""
    folders = set(_hook("nav_sections").SECTIONS.values())
    docs = ROOT / "docs"
    pages = {p.relative_to(docs).as_posix() for p in docs.rglob("*.md")
             if p.relative_to(docs).parts[0] not in ("hooks", "scripts")}
    orphans = sorted(p for p in pages - _nav_pages() if p.split("/")[0] not in folders)
    assert not orphans, f"pages missing from the nav of mkdocs.yml: {orphans}"


def test_nav_hook_appends_new_pages_to_their_section(tmp_path):
    hook = _hook("nav_sections")
    (tmp_path / "algorithms").mkdir()
    (tmp_path / "algorithms" / "base.md").write_text("# Base optimizers (spec §1)\n")
    (tmp_path / "algorithms" / "new.md").write_text("Intro.\n\n# New rule (spec §9, reconstruction)\n## Update\n")
    nav = [{"Home": "index.md"}, {"Algorithms": [{"Base": "algorithms/base.md"}]}, {"Reproductions": "r.md"}]
    config = hook.on_config({"nav": nav, "docs_dir": str(tmp_path)})
    assert config["nav"][1] == {"Algorithms": [{"Base": "algorithms/base.md"}, {"New rule": "algorithms/new.md"}]}
    assert config["nav"][2] == {"Reproductions": "r.md"}  # no folder, nothing to add
