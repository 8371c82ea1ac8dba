"""SQLite results store of an exploration, which is also the evaluation cache.

Every evaluated individual is appended (and committed) as soon as its evaluation finishes:
generation, genome, objectives, accuracy, constraint value, seconds. An interrupted run
therefore loses nothing, and a rerun finds every finished genome here instead of evaluating
it again. A file belongs to one workload (its ``Workload.digest()``); opening it for another
raises ``StoreMismatch``.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

__all__ = [
    "Record",
    "Store",
    "StoreMismatch",
    "default_dir",
    "results_file",
]


if TYPE_CHECKING:
    from qlib.explore.workload import Workload

Genome = tuple[int, ...]


def default_dir() -> Path:
    """Where the book's exploration results live: ``$QLIB_CACHE/explore``."""
    return Path(os.environ.get("QLIB_CACHE", ".qlib-cache")) / "explore"


def results_file(w: Workload, tag: str = "", folder: str | os.PathLike | None = None) -> Path:
    """One SQLite file per workload digest and NSGA-II settings, so a rerun with the same
    settings finds its results; ``tag`` names a variant (e.g. a random search of the same
    workload)."""
    search = hashlib.sha256(json.dumps(w.nsga2.model_dump(), sort_keys=True).encode()).hexdigest()
    folder = default_dir() if folder is None else Path(folder)
    return folder / f"{w.name}-{w.digest()}-{search[:8]}{tag}.sqlite"


class StoreMismatch(ValueError):
    """The results file was written for a different workload."""


@dataclass(frozen=True)
class Record:
    """One evaluated individual; ``status`` is the certificate's (``"certified"`` or
    ``"uncertifiable"``) when the workload has a certified objective, else empty."""

    generation: int
    genome: Genome
    objectives: tuple[float, ...]
    accuracy: float
    constraint: float
    seconds: float
    status: str = ""


class Store:
    """Results of one workload in an SQLite file (``":memory:"`` for a throw-away store)."""

    def __init__(
        self, path: str | os.PathLike, workload_digest: str, workload_name: str = ""
    ) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path)
        self._db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT)")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS evaluations (id INTEGER PRIMARY KEY AUTOINCREMENT, "
            "generation INTEGER, genome TEXT UNIQUE, objectives TEXT, accuracy REAL, "
            "constraint_value REAL, seconds REAL, created REAL, status TEXT DEFAULT '')"
        )
        columns = [r[1] for r in self._db.execute("PRAGMA table_info(evaluations)").fetchall()]
        if "status" not in columns:  # a file from before certified objectives
            self._db.execute("ALTER TABLE evaluations ADD COLUMN status TEXT DEFAULT ''")
            self._db.commit()
        row = self._db.execute("SELECT value FROM meta WHERE key = 'workload_digest'").fetchone()
        if row is None:
            self._db.executemany(
                "INSERT INTO meta VALUES (?, ?)",
                [
                    ("workload_digest", workload_digest),
                    ("workload_name", workload_name),
                    ("created", str(time.time())),
                ],
            )
            self._db.commit()
        elif row[0] != workload_digest:
            name = self.meta().get("workload_name", "?")
            raise StoreMismatch(
                f"{self.path} holds results of workload {name!r} (digest {row[0]}), not of this "
                f"workload (digest {workload_digest}); use another results file"
            )
        self._cache = {r.genome: r for r in self.records()}

    def meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    def set_meta(self, key: str, value: object) -> None:
        self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))
        self._db.commit()

    def get(self, genome: Sequence[int]) -> Record | None:
        """The stored evaluation of ``genome``, or None."""
        return self._cache.get(tuple(int(g) for g in genome))

    def add(self, rec: Record) -> None:
        """Append one evaluation and commit at once (so an interruption keeps it)."""
        self._db.execute(
            "INSERT OR IGNORE INTO evaluations (generation, genome, objectives, accuracy, "
            "constraint_value, seconds, created, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.generation,
                json.dumps(list(rec.genome)),
                json.dumps(list(rec.objectives)),
                rec.accuracy,
                rec.constraint,
                rec.seconds,
                time.time(),
                rec.status,
            ),
        )
        self._db.commit()
        self._cache.setdefault(rec.genome, rec)

    def records(self) -> list[Record]:
        """Every evaluation in the order it finished."""
        rows = self._db.execute(
            "SELECT generation, genome, objectives, accuracy, constraint_value, seconds, status "
            "FROM evaluations ORDER BY id"
        ).fetchall()
        return [
            Record(g, tuple(json.loads(x)), tuple(json.loads(f)), a, c, s, st or "")
            for g, x, f, a, c, s, st in rows
        ]

    def __len__(self) -> int:
        return len(self._cache)

    def dataframe(self):
        """All records as a ``pandas.DataFrame`` (one column per gene and objective)."""
        import pandas as pd

        recs = self.records()
        rows = []
        for r in recs:
            row = {
                "generation": r.generation,
                "accuracy": r.accuracy,
                "constraint": r.constraint,
                "seconds": r.seconds,
                "status": r.status,
            }
            row |= {f"F{i}": f for i, f in enumerate(r.objectives)}
            row |= {f"g{i}": g for i, g in enumerate(r.genome)}
            rows.append(row)
        return pd.DataFrame(rows)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
