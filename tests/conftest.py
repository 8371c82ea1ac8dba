import pytest
import torch


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
