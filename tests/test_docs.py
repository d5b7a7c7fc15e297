"""Every Python code block of README.md and docs/**/*.md runs.

The blocks of one file run in order in one fresh interpreter (a later block may use names an earlier
one defined), in a temporary directory (blocks may write checkpoints). A block that is deliberately
a fragment (an API signature, a loop body needing the reader's data) is preceded by
``<!-- fragment: reason -->`` and skipped with that reason; a block that imports a library that is
not installed skips the rest of its file, naming the library.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
_BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.S | re.M)
_FRAGMENT = re.compile(r"<!--\s*fragment:\s*(.*?)\s*-->\s*$")

# Runs the blocks given as JSON on stdin; reports the first failure as JSON on stdout.
_RUNNER = r"""
import json, sys, traceback
blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for line, code in blocks:
    try:
        exec(compile(code, f"block at line {line}", "exec"), namespace)
    except ModuleNotFoundError as error:
        print(json.dumps({"missing": error.name, "line": line}))
        sys.exit(0)
    except BaseException:
        print(json.dumps({"failed": line, "traceback": traceback.format_exc()}))
        sys.exit(0)
print(json.dumps({"ok": True}))
"""


def blocks_of(path: Path) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
    """``(runnable, fragments)``: (line, code) of each Python block, (line, reason) of each fragment."""
    text = path.read_text(encoding="utf-8")
    runnable, fragments = [], []
    for match in _BLOCK.finditer(text):
        line = text.count("\n", 0, match.start()) + 1
        before = [x for x in text[: match.start()].splitlines() if x.strip()]
        marker = _FRAGMENT.search(before[-1]) if before else None
        if marker:
            fragments.append((line, marker.group(1)))
        else:
            runnable.append((line, match.group(1)))
    return runnable, fragments


def _with_python_blocks() -> list[Path]:
    return [f for f in FILES if _BLOCK.search(f.read_text(encoding="utf-8"))]


@pytest.mark.parametrize("path", _with_python_blocks(), ids=lambda p: str(p.relative_to(ROOT)))
def test_code_blocks_run(path, tmp_path):
    runnable, fragments = blocks_of(path)
    for line, reason in fragments:
        assert reason, f"{path.name}:{line}: a fragment marker needs a reason"
    if not runnable:
        pytest.skip("only fragments: " + "; ".join(f"line {line}: {reason}" for line, reason in fragments))
    result = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(runnable), capture_output=True,
                            text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    if "missing" in report:
        pytest.skip(f"{path.name}:{report['line']} needs {report['missing']}, which is not installed")
    assert "failed" not in report, f"{path.name}: the block at line {report['failed']} failed:\n{report['traceback']}"


def test_fragment_marker_is_recognised(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("Text.\n\n<!-- fragment: an API signature -->\n```python\nf(x, y=1)\n```\n\n"
                    "```python\nx = 1\n```\n")
    runnable, fragments = blocks_of(page)
    assert fragments == [(4, "an API signature")]
    assert runnable == [(8, "x = 1\n")]


def test_every_page_with_code_is_collected():
    names = {str(p.relative_to(ROOT)) for p in _with_python_blocks()}
    assert {"README.md", "docs/frameworks/torch.md", "docs/frameworks/jax.md", "docs/frameworks/numpy.md"} <= names
