import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test trains into its own cache so tests never read a stale or foreign checkpoint."""
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path / "qlib-cache"))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one torch thread: for tiny models thread start-up costs more than
    it saves, more so on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
