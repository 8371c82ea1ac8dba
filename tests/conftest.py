import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test trains into its own cache so tests never read a stale or foreign checkpoint."""
    monkeypatch.setenv("QLIB_CACHE", str(tmp_path / "qlib-cache"))
