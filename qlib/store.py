"""One embedded SQLite results store for every long run of the library.

A store file belongs to one experiment (an identifier such as a workload digest or a sweep's
settings hash): a task key (a string, e.g. from ``task_key(model=..., image=3, ...)``) maps to one
JSON record. Every record is committed the moment it is added, so an interrupted run loses
nothing and a rerun finds every finished task here. Opening a file of another experiment raises
``StoreMismatch``; a file that is not an SQLite database, or is locked or corrupt, raises
``StoreError`` naming the file. Records are never overwritten: the first result of a task wins.

```python
with ResultStore("results/certify.sqlite", experiment="mnist-4x64 eps=1/1023") as store:
    if task_key(image=3) not in store:
        store.put(task_key(image=3), {"bound": 1.5}, seconds=2.0)
    store.get(task_key(image=3))          # {"bound": 1.5}
```
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["ResultStore", "StoredRecord", "StoreError", "StoreMismatch", "task_key"]

SCHEMA_VERSION = "1"


class StoreError(RuntimeError):
    """The results file cannot be used: not a database, corrupt, locked or unwritable."""


class StoreMismatch(ValueError):
    """The results file belongs to another experiment."""


@dataclass(frozen=True)
class StoredRecord:
    """One finished task: its key, JSON record, seconds it took and when it was stored."""

    key: str
    record: Any
    seconds: float
    created: float


def task_key(**fields: Any) -> str:
    """A canonical key from named fields (sorted, JSON): the same fields give the same key."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)


class ResultStore:
    """Records of one ``experiment`` in the SQLite file ``path`` (``":memory:"``: throw-away).

    ``meta`` (JSON-able values) is written when the file is created, e.g. the settings a rerun
    must match; ``timeout`` is how long to wait for another process's lock, in seconds.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        experiment: str,
        *,
        meta: dict[str, Any] | None = None,
        timeout: float = 30.0,
    ) -> None:
        if not isinstance(experiment, str) or not experiment:
            raise ValueError(f"experiment must be a non-empty string, got {experiment!r}")
        self.path = str(path)
        self.experiment = experiment
        if self.path != ":memory:":
            p = Path(self.path)
            if p.is_dir():
                raise StoreError(f"{self.path} is a directory, not a results file")
            p.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path, timeout=timeout)
            self._setup(meta or {})
        except sqlite3.DatabaseError as e:
            self._fail(e, "open")

    def _fail(self, e: sqlite3.Error, doing: str):
        text = str(e)
        if "locked" in text or "busy" in text:
            raise StoreError(
                f"{self.path} is locked by another process ({doing}): wait for it to finish, or "
                "use another results file"
            ) from e
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            raise StoreError(
                f"{self.path} is not a readable SQLite results file ({text}); move it away or "
                "name another file"
            ) from e
        raise StoreError(f"{self.path}: cannot {doing} the results file: {text}") from e

    def _setup(self, meta: dict[str, Any]) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        db.execute(
            "CREATE TABLE IF NOT EXISTS results (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "key TEXT UNIQUE NOT NULL, record TEXT NOT NULL, seconds REAL, created REAL)"
        )
        row = db.execute("SELECT value FROM meta WHERE key = 'experiment'").fetchone()
        if row is None:
            entries = {"experiment": json.dumps(self.experiment), "schema": SCHEMA_VERSION}
            entries |= {k: json.dumps(v, default=str) for k, v in meta.items()}
            entries["created"] = json.dumps(time.time())
            db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(entries.items()))
            db.commit()
        elif json.loads(row[0]) != self.experiment:
            raise StoreMismatch(
                f"{self.path} holds results of experiment {json.loads(row[0])!r}, not of "
                f"{self.experiment!r}; use another results file"
            )

    # ------------------------------------------------------------------ reading

    def meta(self) -> dict[str, Any]:
        """Every meta entry, JSON-decoded."""
        rows = self._query("SELECT key, value FROM meta")
        return {k: json.loads(v) for k, v in rows}

    def get(self, key: str) -> Any | None:
        """The record of ``key``, or None."""
        row = self._query("SELECT record FROM results WHERE key = ?", (key,))
        return json.loads(row[0][0]) if row else None

    def __contains__(self, key: object) -> bool:
        return bool(self._query("SELECT 1 FROM results WHERE key = ?", (key,)))

    def __len__(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM results")[0][0])

    def keys(self) -> set[str]:
        return {k for (k,) in self._query("SELECT key FROM results")}

    def items(self) -> Iterator[StoredRecord]:
        """Every record, in the order they were stored."""
        rows = self._query("SELECT key, record, seconds, created FROM results ORDER BY id")
        for k, r, s, c in rows:
            yield StoredRecord(k, json.loads(r), s, c)

    def records(self) -> list[Any]:
        return [r.record for r in self.items()]

    def dataframe(self):
        """One row per record: ``key``, ``seconds`` and the record's fields (dict records)."""
        import pandas as pd

        rows = []
        for r in self.items():
            row = {"key": r.key, "seconds": r.seconds}
            row |= r.record if isinstance(r.record, dict) else {"record": r.record}
            rows.append(row)
        return pd.DataFrame(rows)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.DatabaseError as e:
            self._fail(e, "read")

    # ------------------------------------------------------------------ writing

    def put(self, key: str, record: Any, *, seconds: float = 0.0) -> bool:
        """Add ``record`` (JSON-able) for ``key`` and commit at once. Returns False (and keeps
        the stored record) if ``key`` was already there."""
        if not isinstance(key, str):
            raise TypeError(f"task keys are strings (see task_key), got {type(key).__name__}")
        text = json.dumps(record, allow_nan=True)
        try:
            cur = self._db.execute(
                "INSERT OR IGNORE INTO results (key, record, seconds, created) VALUES (?,?,?,?)",
                (key, text, float(seconds), time.time()),
            )
            self._db.commit()
        except sqlite3.DatabaseError as e:
            self._fail(e, "write to")
        return cur.rowcount == 1

    def set_meta(self, key: str, value: Any) -> None:
        if key in ("experiment", "schema"):
            raise ValueError(f"meta key {key!r} is reserved")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value, default=str))
            )
            self._db.commit()
        except sqlite3.DatabaseError as e:
            self._fail(e, "write to")

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({self.path!r}, experiment={self.experiment!r})"
