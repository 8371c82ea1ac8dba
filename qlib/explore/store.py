"""The results store of an exploration, which is also the evaluation cache.

Every evaluated individual is appended (and committed) as soon as its evaluation finishes:
generation, genome, objectives, accuracy, constraint value, seconds, certificate status. An
interrupted run therefore loses nothing, and a rerun finds every finished genome here instead
of evaluating it again. It is the library's one results store (``qlib.store.ResultStore``) with
the genome as task key and the workload digest as experiment: opening a file of another
workload raises ``StoreMismatch``, a file that is not a results database ``StoreError``.
Files written before the common store (a table ``evaluations``) are read and carried over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qlib import store as common
from qlib.store import StoreError

__all__ = [
    "Record",
    "Store",
    "StoreError",
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


class StoreMismatch(common.StoreMismatch):
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


def _key(genome: Sequence[int]) -> str:
    return common.task_key(genome=[int(g) for g in genome])


def _record(raw: dict) -> Record:
    raw = dict(raw)
    raw["genome"] = tuple(raw["genome"])
    raw["objectives"] = tuple(raw["objectives"])
    return Record(**raw)


class Store:
    """Results of one workload in an SQLite file (``":memory:"`` for a throw-away store)."""

    def __init__(
        self, path: str | os.PathLike, workload_digest: str, workload_name: str = ""
    ) -> None:
        self.path = str(path)
        try:
            self.results = common.ResultStore(
                self.path, workload_digest, meta={"workload_name": workload_name}
            )
        except common.StoreMismatch:
            name = _stored_name(self.path)
            raise StoreMismatch(
                f"{self.path} holds results of workload {name!r}, not of this workload (digest "
                f"{workload_digest}); use another results file"
            ) from None
        self._cache = {r.genome: r for r in self.records()}
        if self.path != ":memory:" and not self._cache:
            self._carry_over(workload_digest)

    def _carry_over(self, digest: str) -> None:
        """Copy the rows of a file written before the common store, if this is one."""
        db = sqlite3.connect(self.path)
        try:
            tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if "evaluations" not in tables:
                return
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            if meta.get("workload_digest", digest) != digest:
                raise StoreMismatch(
                    f"{self.path} holds results of workload {meta.get('workload_name', '?')!r} "
                    f"(digest {meta.get('workload_digest')}), not of this workload (digest "
                    f"{digest}); use another results file"
                )
            cols = [c[1] for c in db.execute("PRAGMA table_info(evaluations)").fetchall()]
            status = "status" if "status" in cols else "''"
            rows = db.execute(
                "SELECT generation, genome, objectives, accuracy, constraint_value, seconds, "
                f"{status} FROM evaluations ORDER BY id"
            ).fetchall()
        finally:
            db.close()
        for g, x, f, a, c, s, st in rows:
            self.add(Record(g, tuple(json.loads(x)), tuple(json.loads(f)), a, c, s, st or ""))

    def meta(self) -> dict:
        return self.results.meta()

    def set_meta(self, key: str, value: object) -> None:
        self.results.set_meta(key, value)

    def get(self, genome: Sequence[int]) -> Record | None:
        """The stored evaluation of ``genome``, or None."""
        return self._cache.get(tuple(int(g) for g in genome))

    def add(self, rec: Record) -> None:
        """Append one evaluation and commit at once (so an interruption keeps it)."""
        genome = tuple(int(g) for g in rec.genome)
        self.results.put(_key(genome), dataclasses.asdict(rec), seconds=rec.seconds)
        self._cache.setdefault(genome, rec)

    def records(self) -> list[Record]:
        """Every evaluation in the order it finished."""
        return [_record(r) for r in self.results.records()]

    def __len__(self) -> int:
        return len(self._cache)

    def dataframe(self):
        """All records as a ``pandas.DataFrame`` (one column per gene and objective)."""
        import pandas as pd

        rows = []
        for r in self.records():
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
        self.results.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _stored_name(path: str) -> str:
    """The workload name in the meta of the results file at ``path`` (``"?"`` if none)."""
    db = sqlite3.connect(path)
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'workload_name'").fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else "?"
