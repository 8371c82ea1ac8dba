import contextlib
import fcntl
import json
import os
from pathlib import Path
from unittest import mock

import pytest
import torch

from qlib import book

# make test hands whole files to two pytest-xdist workers, in this order: the two files of
# notebook runs first, the longest work, so each starts at once on its own worker and the short
# files fill in around them (the notebooks in one file kept one worker busy for 500 of the run's
# 504 s while the other idled half of it).
LONGEST_FIRST = ("test_notebooks.py", "test_notebooks_exploration.py")


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def pytest_generate_tests(metafunc):
    """A test taking ``chapter`` runs for each notebook of its file's half of the book: the
    exploration part's chapters (30-34, which share the Fashion CNN) in the second file of
    ``LONGEST_FIRST``, every other chapter in the first."""
    if "chapter" in metafunc.fixturenames:
        exploration = metafunc.definition.path.name == LONGEST_FIRST[1]
        stems = [s for s in book.toc_notebooks() if s.startswith("3") == exploration]
        metafunc.parametrize("chapter", stems)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test trains into its own cache so tests never read a stale or foreign checkpoint."""
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path / "qlib-cache"))


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws its unseeded random tensors from the same seeded global generator, so a
    failure reproduces; the caller's state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        yield


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: for tiny models thread start-up costs more than
    it saves, more so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def executed_dir(tmp_path_factory):
    """One folder for the run's executed notebooks, shared by the xdist workers (their base
    folders sit in one folder per run): the notebook tests fill it, the book tests build the book
    from it instead of executing the notebooks again."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    path = shared / "executed-notebooks"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def book_cache(tmp_path_factory):
    """One ``QLIB_CACHE`` per worker for its notebooks, as ``make book`` gives them: a model that
    several chapters train (the Fashion CNN of chapters 30-33, one file) is trained once. Not
    shared between workers: two of them training one model would write one checkpoint at once.
    It starts empty, so no checkpoint from another version of the code is read; checkpoints and
    result stores are keyed by everything that determines them, and each chapter still runs
    alone from cold."""
    return tmp_path_factory.mktemp("book-cache")


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes
        yield


@pytest.fixture(scope="session")
def quick_run(executed_dir, book_cache):
    """``quick_run(stem)``: ``notebooks/<stem>.ipynb`` executed under the quick profile into
    ``executed_dir`` once per test run, whichever worker asks first; a worker that asks while
    another executes it waits for that run (a lock per notebook). Returns the outcome."""

    def run(stem: str) -> book.Outcome:
        cache = {"QLIB_CACHE": str(book_cache)}  # the kernel inherits it
        with _locked(executed_dir / f"{stem}.lock"), mock.patch.dict(os.environ, cache):
            # Not forced: a notebook executed in this run is up to date (its key matches).
            return book.execute(stem, "quick", out_dir=executed_dir)

    return run


@pytest.fixture
def quick_notebook(quick_run, executed_dir):
    """Executes a notebook under the quick profile and checks what the book needs of it: it ran
    to the end, shows outputs, and its injected parameters are hidden in the rendered book."""

    def check(stem: str) -> None:
        outcome = quick_run(stem)
        assert outcome.status in ("executed", "up to date"), outcome.error
        executed = json.loads((executed_dir / f"{stem}.ipynb").read_text())
        assert executed["metadata"]["qlib"]["ok"]
        assert any(c.get("outputs") for c in executed["cells"] if c["cell_type"] == "code")
        tags = [c["metadata"].get("tags", []) for c in executed["cells"]]
        injected = [t for t in tags if "injected-parameters" in t]
        assert injected and all("remove-cell" in t for t in injected)

    return check
