"""The report a newcomer reads: the terminal matrix (width), Markdown, the HTML page and its render."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from adaptlr.conformance import cli, views
from adaptlr.conformance.runner import Row

BACKENDS = ["numpy", "array_api_strict", "array_api_strict-device1", "torch", "jax", "torch-cuda", "jax-gpu", "cupy"]


def _rows() -> list[Row]:
    rows = []
    for algorithm in ("adamw", "autodrop(active(adamw(a-very-long-name)))", "hd-mult-element(adam)"):
        for backend in BACKENDS:
            for dtype in ("float64", "float32"):
                err = 1e-15 if dtype == "float64" else 3e-6
                rows.append(Row("agreement", algorithm, "noisy_quadratic", backend, "cpu", dtype, 150,
                                max_rel_err_params=err, tolerance=2.7e-13 if dtype == "float64" else 1.5e-4,
                                status="pass"))
    rows.append(Row("agreement", "adamw", "logistic", "torch", "cpu", "float32", 150, max_rel_err_params=3e-4,
                    tolerance=1.5e-4, status="fail", reason="params beyond tolerance"))
    rows.append(Row("backend", "*", "*", "cupy-extra", "*", "float64", 150, status="skipped",
                    reason="cupy is not installed"))
    rows.append(Row("analytic", "autodrop(sgd)", "noisy-quadratic angle", "numpy", "cpu", "float64", 450,
                    max_rel_err_params=2.3e-3, tolerance=9.9e-3, status="pass",
                    extra={"plot": {"title": "AutoDrop ω",
                                    "series": {"ω": [100.0, 101.0, 101.5], "exact": [101.4] * 3}}}))
    return rows


def test_terminal_summary_fits_100_columns_and_names_what_failed():
    text = views.terminal_summary(_rows(), width=100)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert any(line.startswith("adamw") and "✘ 2.0" in line for line in lines)  # worst of two problems
    assert "torch/32" in text and "cupy/64" in text
    assert "skipped: cupy-extra (cupy is not installed)" in text
    assert "Rows that failed or are ill-conditioned:" in text and "params beyond tolerance" in text
    assert "✔ ana autodrop(sgd) — noisy-quadratic angle: 2.3e-03 ≤ 9.9e-03" in text
    assert lines[-1] == "1 fail, 49 pass, 1 skipped"


def test_cell_text_says_the_fraction_of_the_tolerance():
    rows = _rows()
    _, _, cells = views.matrix(rows)
    assert views._cell_text(cells[("adamw", "np/32")]) == "✔ .02"
    assert views._cell_text(cells[("adamw", "np/64")]) == "✔ 4e-3"


def test_markdown_starts_with_the_matrix():
    text = views.markdown_matrix(_rows())
    assert text.startswith("## At a glance")
    assert "| adamw | ✔ 4e-3 | ✔ .02 |" in text


def test_html_is_self_contained_with_heatmap_and_plots():
    page = views.html_report(_rows(), {"command": "adaptlr conformance", "machine": "test"})
    assert page.count('class="cell"') == 3 * len(BACKENDS) * 2
    assert "<svg" in page and "AutoDrop ω" in page and "polyline" in page
    assert "#d73027" in page  # the failing cell is red
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")  # nothing fetched from a network
    assert "adaptlr conformance" in page


def test_cli_writes_html_and_prints_the_matrix(tmp_path, capsys):
    path = tmp_path / "report.html"
    status = cli.main(["--backends", "numpy", "--dtypes", "float64", "--algorithms", "sgd", "adamw",
                       "--checks", "closed-form", "--html", str(path)])
    out = capsys.readouterr().out
    assert status == 0
    assert "Cross-backend agreement (algorithm × backend/dtype):" in out and "np/64" in out
    assert path.read_text(encoding="utf-8").count('class="cell"') == 2


def _browser() -> str | None:
    return next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


@pytest.mark.skipif(_browser() is None, reason="no headless browser installed (Debian: apt-get install chromium)")
def test_html_renders_in_a_headless_browser(tmp_path):
    path = tmp_path / "report.html"
    path.write_text(views.html_report(_rows(), {"command": "test"}), encoding="utf-8")
    result = subprocess.run([_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom",
                             path.as_uri()], capture_output=True, text=True, timeout=120)
    dom = result.stdout
    assert 'id="matrix"' in dom, result.stderr[-2000:]
    assert dom.count('class="cell"') == 3 * len(BACKENDS) * 2
    assert "<svg" in dom
