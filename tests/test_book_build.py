"""The book's build plumbing (qlib.book, qlib.bookpdf): the injected-parameters cell, the
status and total, staging a book from executed notebooks, tables and chapters on their way to
the PDF. Budget: about 10 s."""

import json

import nbformat
import pytest

from qlib import book, bookpdf


def _notebook(cells, qlib_meta=None):
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata["kernelspec"] = {
        "name": "python3",
        "language": "python",
        "display_name": "Python 3",
    }
    if qlib_meta is not None:
        nb.metadata["qlib"] = qlib_meta
    return nb


def test_papermills_injected_cell_is_kept_but_removed_from_the_rendered_book(tmp_path):
    params = nbformat.v4.new_code_cell('profile = "full"\nx = 1')
    params.metadata["tags"] = ["parameters"]
    (tmp_path / "tiny.ipynb").write_text(
        nbformat.writes(_notebook([params, nbformat.v4.new_code_cell("print(x * 2)")]))
    )
    (tmp_path / "profiles.yml").write_text("tiny:\n  quick: {x: 21}\n  full: {x: 1}\n")
    outcome = book.execute(
        "tiny",
        "quick",
        out_dir=tmp_path / "out",
        notebooks_dir=tmp_path,
        profiles=tmp_path / "profiles.yml",
    )
    assert outcome.status == "executed", outcome.error
    assert outcome.finished.endswith("UTC")
    cells = json.loads((tmp_path / "out" / "tiny.ipynb").read_text())["cells"]
    tags = [c["metadata"].get("tags", []) for c in cells]
    assert tags[0] == ["parameters"]  # the notebook's own parameters stay visible
    assert "injected-parameters" in tags[1] and "remove-cell" in tags[1]
    assert "x = 21" in "".join(cells[1]["source"])  # kept in the executed notebook
    assert "".join(cells[2]["outputs"][0]["text"]) == "42\n"


def test_hiding_the_injected_cell_is_idempotent():
    cell = nbformat.v4.new_code_cell("x = 2")
    cell.metadata["tags"] = ["injected-parameters"]
    nb = json.loads(nbformat.writes(_notebook([nbformat.v4.new_code_cell("y = 1"), cell])))
    assert book.hide_injected_parameters(nb) == 1
    assert book.hide_injected_parameters(nb) == 1
    assert nb["cells"][1]["metadata"]["tags"] == ["injected-parameters", "remove-cell"]
    assert nb["cells"][0]["metadata"]["tags"] == []


def _executed(nb_dir, stem, ok=True, seconds=12.0, error=""):
    meta = {"ok": ok, "seconds": seconds, "finished": "2026-11-30 01:00 UTC", "error": error}
    nb_dir.mkdir(parents=True, exist_ok=True)
    (nb_dir / f"{stem}.ipynb").write_text(nbformat.writes(_notebook([], meta)))


def test_status_page_and_intro_total_come_from_the_run(tmp_path):
    nb_dir = tmp_path / "nb"
    _executed(nb_dir, "b", seconds=90.0)
    _executed(nb_dir, "c", ok=False, seconds=30.0, error="cell 3: ValueError: bad")
    now = [book.Outcome("a", "executed", 150.0, "", "2026-11-30 02:00 UTC")]
    outcomes = book.status_outcomes(now, ["a", "b", "c", "d"], nb_dir)
    assert [o.status for o in outcomes] == [
        "executed",
        "executed (earlier run)",
        "failed (earlier run)",
        "not executed",
    ]
    total = book.write_status(outcomes, "full", tmp_path / "gen" / "status.md", wall_seconds=160)
    status = (tmp_path / "gen" / "status.md").read_text()
    assert "| a | executed | 150.0 | 2026-11-30 02:00 UTC |" in status
    assert "- c: failed (earlier run): cell 3: ValueError: bad" in status
    assert "- d: not executed" in status
    text = total.read_text()
    assert total.name == "build_total.md"
    assert "**4.5 min**" in text  # 150 + 90 + 30 s of notebooks
    assert "**2.7 min** of wall time and executed 1 of the 4 chapters" in text
    assert "Failed or not executed in this build: c, d" in text
    assert "{doc}`build status </book/status>`" in text


def test_recorded_reads_back_a_notebook_or_says_it_was_not_executed(tmp_path):
    _executed(tmp_path, "b", seconds=5.0)
    assert book.recorded("b", tmp_path) == book.Outcome(
        "b", "executed", 5.0, "", "2026-11-30 01:00 UTC"
    )
    assert book.recorded("nope", tmp_path).status == "not executed"


def test_stage_book_lays_out_the_book_from_executed_notebooks(tmp_path):
    stems = book.toc_notebooks()
    _executed(tmp_path / "nb", stems[0])
    dest = book.stage_book(tmp_path / "nb", tmp_path / "stage")
    assert (dest / "_config.yml").is_file() and (dest / "_toc.yml").is_file()
    assert (dest / "book" / "intro.md").is_file() and (dest / "book" / "references.bib").is_file()
    assert sorted(p.stem for p in (dest / "book" / "nb").iterdir()) == [stems[0]]
    status = (dest / "book" / "_generated" / "status.md").read_text()
    assert f"| {stems[0]} | executed |" in status and f"- {stems[1]}: not executed" in status
    assert (dest / "book" / "_generated" / "build_total.md").is_file()


def test_pdf_problems_name_each_chapter_and_why(tmp_path):
    _executed(tmp_path, "ok")
    _executed(tmp_path, "broken", ok=False, error="cell 2: RuntimeError: x")
    html_only = nbformat.v4.new_code_cell("w")
    html_only.outputs = [
        nbformat.v4.new_output("display_data", data={"text/html": "<b>w</b>"}),
        nbformat.v4.new_output("display_data", data={"image/png": "iVBO", "text/plain": "f"}),
    ]
    (tmp_path / "widget.ipynb").write_text(
        nbformat.writes(_notebook([html_only], {"ok": True, "seconds": 1.0}))
    )
    problems = bookpdf.pdf_problems(["ok", "broken", "missing", "widget"], tmp_path)
    assert "ok" not in problems
    assert problems["broken"] == "its execution failed (cell 2: RuntimeError: x)"
    assert problems["missing"].startswith("not executed")
    assert problems["widget"] == "outputs only a browser can show, left out: cell 0 (text/html)"


def test_latex_errors_are_reported_by_chapter(tmp_path):
    tex = tmp_path / "b.tex"
    tex.write_text("\\begin{document}\n\\chapter{Data}\ntext\n\\chapter{GPFQ}\n\\bad\n")
    tex.with_suffix(".log").write_text(
        "(./b.tex\n! Undefined control sequence.\nl.5 \\bad\n\n! Missing $ inserted.\nl.1 x\n"
    )
    assert bookpdf.latex_errors(tex) == {
        "GPFQ": ["Undefined control sequence."],
        "preamble": ["Missing $ inserted."],
    }
    assert bookpdf.latex_errors(tmp_path / "none.tex") == {}


@pytest.mark.parametrize("command", [["pdf", "--bogus"], ["check", "a", "b"]])
def test_cli_rejects_bad_arguments(command):
    with pytest.raises(SystemExit) as e:
        book.main(command)
    assert e.value.code == 2


def test_html_tables_get_a_markdown_form_for_the_pdf():
    import pandas as pd

    df = pd.DataFrame(
        {"model": ["a", "a", "b"], "bits": [3, 4, 3], "RTN": [0.5, 0.75, 0.25], "GPFQ": [1, 1, 1]}
    ).set_index(["model", "bits"])
    df.columns.name = "method"
    styled = df.style.format("{:.0%}")
    plain = pd.DataFrame({"x|y": ["$a_b", "c"]})
    empty = pd.DataFrame(columns=["LUTs", "cells"])
    outputs = [
        nbformat.v4.new_output(
            "execute_result", data={"text/html": styled.to_html(), "text/plain": "<Styler>"}
        ),
        nbformat.v4.new_output(
            "execute_result", data={"text/html": plain.to_html(), "text/plain": "t"}
        ),
        nbformat.v4.new_output("display_data", data={"text/html": "<b>no table</b>"}),
        nbformat.v4.new_output("display_data", data={"text/html": empty.to_html()}),
    ]
    cell = nbformat.v4.new_code_cell("t")
    cell.outputs = outputs
    nb = json.loads(nbformat.writes(_notebook([cell])))
    assert bookpdf.tables_to_markdown(nb) == 2
    assert bookpdf.tables_to_markdown(nb) == 0  # already has its Markdown form
    got = [o["data"].get("text/markdown") for o in nb["cells"][0]["outputs"]]
    assert got[0].splitlines() == [
        "| model | bits | RTN | GPFQ |",
        "|:---|:---|---:|---:|",
        "| a | 3 | 50% | 100% |",
        "|  | 4 | 75% | 100% |",  # the row span of "a" leaves its continuation blank
        "| b | 3 | 25% | 100% |",
    ]
    assert got[1].splitlines()[0] == "|  | x\\|y |"
    assert got[1].splitlines()[2] == "| 0 | \\$a\\_b |"
    assert got[2] is None
    assert got[3] is None  # no rows: LaTeX shows the text form (a table without rows breaks it)
