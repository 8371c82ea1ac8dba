"""The exploration chapters (30-34), executed by papermill under the quick profile: a file of
their own, so that ``make test``'s second worker runs them beside the other chapters
(tests/test_notebooks.py, which builds the book from both)."""

import pytest

from qlib import book


@pytest.mark.notebook
@pytest.mark.parametrize("stem", [s for s in book.toc_notebooks() if s.startswith("3")])
def test_exploration_notebook_runs_under_quick_profile(stem, quick_notebook):
    quick_notebook(stem)
