"""Workload schema: every error names its key path and the file."""

from pathlib import Path

import pytest
import yaml

from qlib.explore import workload as wl

TINY = Path(__file__).resolve().parents[1] / "workloads" / "digits_tiny.yaml"


def _raw() -> dict:
    return yaml.safe_load(TINY.read_text())


def _error(tmp_path: Path, raw: dict) -> str:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(wl.WorkloadError) as e:
        wl.load(path)
    assert str(path) in str(e.value)
    return str(e.value)


def test_shipped_workloads_validate():
    for path in sorted(TINY.parent.glob("*.yaml")):
        w = wl.load(path)
        assert w.name == path.stem


def test_missing_key(tmp_path):
    raw = _raw()
    del raw["nsga2"]["population"]
    assert "nsga2.population: required key is missing" in _error(tmp_path, raw)


def test_wrong_type(tmp_path):
    raw = _raw()
    raw["nsga2"]["generations"] = "many"
    assert "nsga2.generations:" in _error(tmp_path, raw)


def test_population_lower_bound(tmp_path):
    raw = _raw()
    raw["nsga2"]["population"] = 1
    assert "nsga2.population: Input should be greater than or equal to 2" in _error(tmp_path, raw)


def test_one_bit_rejected(tmp_path):
    raw = _raw()
    raw["bits"]["lower"] = 1
    assert "bits.lower: Input should be greater than or equal to 2" in _error(tmp_path, raw)


def test_unknown_model(tmp_path):
    raw = _raw()
    raw["model"]["name"] = "resnet-9000"
    assert "model.name: unknown model 'resnet-9000'" in _error(tmp_path, raw)


def test_unknown_dataset(tmp_path):
    raw = _raw()
    raw["datasets"]["exploration"]["dataset"] = "imagenet"
    assert "datasets.exploration.dataset: unknown data set 'imagenet'" in _error(tmp_path, raw)


def test_unknown_key_and_several_errors(tmp_path):
    raw = _raw()
    raw["nsga2"]["popsize"] = 4
    raw["bits"]["upper"] = 17
    msg = _error(tmp_path, raw)
    assert "nsga2.popsize: unknown key" in msg and "bits.upper:" in msg


def test_digest_ignores_search_settings():
    a = wl.load(TINY)
    b = a.model_copy(update={"nsga2": a.nsga2.model_copy(update={"generations": 9})})
    c = a.model_copy(update={"bit_weighting": "published"})
    assert a.digest() == b.digest() != c.digest()


def test_override_replaces_nested_keys_and_validates_again():
    w = wl.load(TINY)
    o = wl.override(w, {"nsga2": {"population": 8}, "datasets": {"exploration": {"limit": 50}}})
    assert o.nsga2.population == 8 and o.datasets.exploration.limit == 50
    assert o.nsga2.generations == w.nsga2.generations  # untouched siblings stay
    assert o.datasets.exploration.dataset == w.datasets.exploration.dataset
    with pytest.raises(wl.WorkloadError, match=r"\(overridden\):\n  nsga2.population"):
        wl.override(w, {"nsga2": {"population": 1}})


def test_results_file_follows_digest_and_search_settings(tmp_path, monkeypatch):
    from qlib.explore.store import default_dir, results_file

    monkeypatch.setenv("QLIB_CACHE", str(tmp_path))
    w = wl.load(TINY)
    path = results_file(w)
    assert path.parent == default_dir() == tmp_path / "explore"
    assert path.name.startswith(f"{w.name}-{w.digest()}-") and path.suffix == ".sqlite"
    assert results_file(w, "-random") != path
    assert results_file(wl.override(w, {"nsga2": {"population": 8}})) != path  # search differs
    assert results_file(w, folder=tmp_path / "x").parent == tmp_path / "x"
