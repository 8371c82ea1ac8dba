"""The book's notebooks, executed by papermill under the quick profile (the exploration chapters
in tests/test_notebooks_exploration.py), and the book built from them as HTML and PDF."""

import json
import os
import shutil
import time

import pytest

from qlib import book, bookcheck, bookpdf

STEMS = book.toc_notebooks()


def test_every_toc_notebook_has_a_source_and_both_profiles():
    assert STEMS, "_toc.yml lists no executed notebook"
    for stem in STEMS:
        src = book.ROOT / "notebooks" / f"{stem}.ipynb"
        nb = json.loads(src.read_text())
        tagged = [c for c in nb["cells"] if "parameters" in c["metadata"].get("tags", [])]
        assert len(tagged) == 1, f"{src}: expected one cell tagged 'parameters'"
        assert not any(c.get("outputs") for c in nb["cells"] if c["cell_type"] == "code"), (
            f"{src} is committed with outputs"
        )
        for profile in book.PROFILES:
            assert book.profile_parameters(stem, profile)["profile"] == profile


def test_unknown_profile_or_notebook_is_an_error():
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        book.profile_parameters(STEMS[0], "fast")
    with pytest.raises(KeyError, match="no entry for notebook 'nope'"):
        book.profile_parameters("nope", "quick")


@pytest.mark.notebook
def test_notebook_runs_under_quick_profile(chapter, quick_notebook):
    """The chapters but the exploration's (tests/test_notebooks_exploration.py: another file,
    so that another worker runs them; ``chapter`` comes from tests/conftest.py)."""
    quick_notebook(chapter)


@pytest.mark.notebook
def test_failing_notebook_is_reported_with_its_cell_and_rerun(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [
        params,
        nbformat.v4.new_code_cell("y = x + 1"),
        nbformat.v4.new_code_cell("raise RuntimeError(f'broken {x}')"),
    ]
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "language": "python",
        "display_name": "Python 3",
    }
    (tmp_path / "fail.ipynb").write_text(nbformat.writes(nb))
    (tmp_path / "profiles.yml").write_text("fail:\n  quick: {x: 7}\n  full: {x: 8}\n")
    kwargs = dict(
        out_dir=tmp_path / "out", notebooks_dir=tmp_path, profiles=tmp_path / "profiles.yml"
    )
    outcome = book.execute("fail", "quick", **kwargs)
    assert outcome.status == "failed"
    assert (
        "RuntimeError" in outcome.error and "broken 7" in outcome.error and "cell" in outcome.error
    )
    assert (tmp_path / "out" / "fail.ipynb").is_file()  # the partial output stays for inspection
    assert book.execute("fail", "quick", **kwargs).status == "failed"  # never cached as done


def _needs(tool: str, found: bool, install: str):
    """Skip without ``tool`` on a developer's machine; fail in CI, whose set-up installs it."""
    if found:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{tool} is missing in CI: tools/sysdeps.sh installs {install}")
    pytest.skip(f"{tool} is not installed (apt-get install {install}, or make setup)")


@pytest.fixture(scope="module")
def staged_book(quick_run, executed_dir, tmp_path_factory):
    """The quick-profile book laid out from the notebooks executed in this run, by this worker
    or another (``quick_run`` waits for one another worker is executing, and executes one that
    nobody has yet: when run without the notebook tests)."""
    for stem in book.toc_notebooks():  # the toc read now, as stage_book reads it
        outcome = quick_run(stem)
        assert outcome.status in ("executed", "up to date"), f"{stem}: {outcome.error}"
    return book.stage_book(executed_dir, tmp_path_factory.mktemp("book"))


@pytest.mark.notebook
def test_book_goes_to_pdf(staged_book, capsys):
    """make pdf on the quick book: a PDF with no LaTeX error in any chapter, copied into the
    HTML book where the intro links to it."""
    latex = all(shutil.which(t) for t in ("latexmk", "xelatex"))
    _needs("LaTeX (latexmk, xelatex)", latex, "latexmk texlive-xetex texlive-latex-extra")
    start = time.perf_counter()
    pdf = bookpdf.build_pdf(staged_book)
    out = capsys.readouterr().out
    print(out, f"PDF build {time.perf_counter() - start:.1f} s")
    assert pdf is not None and pdf.stat().st_size > 10_000, out
    assert "LaTeX errors" not in out, out
    assert (staged_book / "_build" / "html" / bookpdf.PDF_NAME).is_file()


@pytest.mark.notebook
def test_book_reads_offline_in_headless_chromium(staged_book):
    """The quick-profile book, built from the notebooks executed above, read from disk with no
    network: every page loads, its math is typeset, its images load, no output shows a
    traceback and the sidebar lists every chapter. Screenshots land in _build/screenshots/."""
    _needs("headless Chromium", bookcheck.find_chromium() is not None, "chromium chromium-driver")
    start = time.perf_counter()
    html = book.build_html(staged_book)
    built = time.perf_counter()
    toc = staged_book / "_toc.yml"
    checks = bookcheck.check_book(html, toc, book.ROOT / "_build" / "screenshots")
    print(f"HTML build {built - start:.1f} s, browser checks {time.perf_counter() - built:.1f} s")
    assert len(checks) == len(bookcheck.toc_pages(toc))
    problems = [f"{c.page}: {'; '.join(c.problems)}" for c in checks if c.problems]
    assert not problems, "\n".join(problems)
    assert sum(c.math for c in checks) > 0 and sum(c.images for c in checks) > 0
