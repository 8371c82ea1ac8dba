"""The exploration chapters (30-34), executed by papermill under the quick profile: a file of
their own, so that ``make test``'s second worker runs them beside the other chapters
(tests/test_notebooks.py, which builds the book from both); ``chapter`` comes from
tests/conftest.py."""

import pytest


@pytest.mark.notebook
def test_exploration_notebook_runs_under_quick_profile(chapter, quick_notebook):
    quick_notebook(chapter)
