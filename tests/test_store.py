"""The SQLite results store: records committed at once, experiments kept apart, clear errors.
Budget: about 1 s."""

from __future__ import annotations

import math
import sqlite3

import pytest

from qlib.store import ResultStore, StoreError, StoreMismatch, task_key


def test_put_get_and_commit_at_once(tmp_path):
    path = tmp_path / "r.sqlite"
    with ResultStore(path, "exp A", meta={"eps": 0.001}) as store:
        assert store.put(task_key(image=1, objective="logits"), {"bound": 1.5}, seconds=2.0)
        # another connection sees it without any close or flush: it is committed
        other = sqlite3.connect(path)
        assert other.execute("SELECT COUNT(*) FROM results").fetchone()[0] == 1
        other.close()
        assert store.get(task_key(objective="logits", image=1)) == {"bound": 1.5}
        assert task_key(image=1, objective="logits") in store and len(store) == 1
        assert store.get("missing") is None
        assert store.meta()["eps"] == 0.001 and store.meta()["experiment"] == "exp A"
    with ResultStore(path, "exp A") as again:
        rec = next(again.items())
        assert rec.record == {"bound": 1.5} and rec.seconds == 2.0


def test_first_record_wins_and_order_is_kept(tmp_path):
    with ResultStore(tmp_path / "r.sqlite", "exp") as store:
        assert store.put("a", 1) and store.put("b", {"v": [1, 2]})
        assert not store.put("a", 99)
        assert store.get("a") == 1 and [r.key for r in store.items()] == ["a", "b"]
        assert store.put("c", {"bound": math.inf, "primal": math.nan})
        assert store.get("c")["bound"] == math.inf and math.isnan(store.get("c")["primal"])
        df = store.dataframe()
        assert list(df["key"]) == ["a", "b", "c"]
        with pytest.raises(TypeError, match="task keys are strings"):
            store.put(3, 1)
        with pytest.raises(ValueError, match="reserved"):
            store.set_meta("experiment", "other")


def test_other_experiment_is_refused(tmp_path):
    path = tmp_path / "r.sqlite"
    ResultStore(path, "exp A").close()
    with pytest.raises(StoreMismatch, match="holds results of experiment 'exp A'"):
        ResultStore(path, "exp B")


def test_not_a_database_names_the_file(tmp_path):
    bad = tmp_path / "notes.sqlite"
    bad.write_text("this is not a database\n" * 100)
    with pytest.raises(StoreError, match="notes.sqlite is not a readable SQLite results file"):
        ResultStore(bad, "exp")
    with pytest.raises(StoreError, match="is a directory"):
        ResultStore(tmp_path, "exp")
    with pytest.raises(ValueError, match="experiment"):
        ResultStore(tmp_path / "x.sqlite", "")


def test_locked_store_is_reported_and_nothing_lost(tmp_path):
    path = tmp_path / "r.sqlite"
    store = ResultStore(path, "exp", timeout=0.1)
    store.put("kept", 1)
    locker = sqlite3.connect(path)
    locker.execute("BEGIN EXCLUSIVE")
    with pytest.raises(StoreError, match="locked by another process"):
        store.put("new", 2)
    locker.rollback()
    locker.close()
    assert store.get("kept") == 1 and store.put("new", 2)
    store.close()


def test_task_key_is_canonical():
    assert task_key(a=1, b="x") == task_key(b="x", a=1)
    assert task_key(a=1) != task_key(a=2)
