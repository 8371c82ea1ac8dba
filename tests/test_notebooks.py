"""Every notebook of the book, executed by papermill under the quick profile."""

import json

import pytest

from qlib import book

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
@pytest.mark.parametrize("stem", STEMS)
def test_notebook_runs_under_quick_profile(stem, tmp_path):
    outcome = book.execute(stem, "quick", out_dir=tmp_path, force=True)
    assert outcome.status == "executed", outcome.error
    executed = json.loads((tmp_path / f"{stem}.ipynb").read_text())
    assert executed["metadata"]["qlib"]["ok"]
    assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")


@pytest.mark.notebook
def test_failing_notebook_is_reported_with_its_cell_and_rerun(tmp_path):
    import nbformat

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell("x = 1")
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("y = x + 1"),
                nbformat.v4.new_code_cell("raise RuntimeError(f'broken {x}')")]
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    (tmp_path / "fail.ipynb").write_text(nbformat.writes(nb))
    (tmp_path / "profiles.yml").write_text("fail:\n  quick: {x: 7}\n  full: {x: 8}\n")
    kwargs = dict(out_dir=tmp_path / "out", notebooks_dir=tmp_path, profiles=tmp_path / "profiles.yml")
    outcome = book.execute("fail", "quick", **kwargs)
    assert outcome.status == "failed"
    assert "RuntimeError" in outcome.error and "broken 7" in outcome.error and "cell" in outcome.error
    assert (tmp_path / "out" / "fail.ipynb").is_file()  # the partial output stays for inspection
    assert book.execute("fail", "quick", **kwargs).status == "failed"  # never cached as done
