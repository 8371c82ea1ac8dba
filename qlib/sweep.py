"""Resumable sweeps: many independent tasks on Dask, each result committed to a ``ResultStore``.

``run(fn, tasks, store)`` calls ``fn(context, payload)`` for every task whose key the store does
not hold yet, on a Dask cluster, and stores each result the moment it arrives, so a killed sweep
resumes where it stopped and no stored task runs twice. ``context`` (a model, data: anything
picklable) is sent to every worker once. The cluster is a ``LocalCluster`` by default, or the
scheduler at ``scheduler=`` / ``$QLIB_DASK_SCHEDULER``; ``workers=0`` runs in this process (no
Dask). A progress bar counts the tasks; Ctrl-C cancels the work left on the cluster.

```python
def solve(model, image):                       # module-level, so workers can import it
    return {"bound": ...}

with ResultStore("out.sqlite", experiment="certify 4x64") as store:
    report = run(solve, {task_key(image=i): i for i in range(50)}, store, context=model)
```
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from qlib.store import ResultStore

__all__ = ["SCHEDULER_ENV", "SweepReport", "dask_client", "run", "stream"]

SCHEDULER_ENV = "QLIB_DASK_SCHEDULER"


@dataclass(frozen=True)
class SweepReport:
    """What one call did: ``solved`` tasks now, ``skipped`` (already stored), ``seconds`` of
    wall time, ``workers`` used (0: in process), ``task_seconds`` summed over solved tasks."""

    solved: int
    skipped: int
    seconds: float
    workers: int
    task_seconds: float


@contextlib.contextmanager
def dask_client(
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int = 1,
    timeout: float = 20.0,
) -> Iterator[Any]:
    """A Dask client: the scheduler at ``scheduler`` (or ``$QLIB_DASK_SCHEDULER``; ``timeout``
    seconds to connect), else a new ``LocalCluster`` of ``workers`` processes (default: the CPU
    count); None for ``workers=0``."""
    address = scheduler or os.environ.get(SCHEDULER_ENV) or None
    if workers == 0 and address is None:
        yield None
        return
    import dask
    from distributed import Client, LocalCluster

    if address is not None:
        try:
            client = Client(address, timeout=f"{timeout}s")
        except (OSError, TimeoutError) as e:
            raise ConnectionError(
                f"cannot reach the Dask scheduler at {address!r} (from "
                f"{'the scheduler argument' if scheduler else '$' + SCHEDULER_ENV}): {e}"
            ) from e
        with client:
            yield client
        return
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    # Dask's nannies set MALLOC_TRIM_THRESHOLD_=65536, which made torch forward passes in workers
    # 3-4x slower (qlib.explore measured it): unset it.
    no_trim = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}
    with (
        dask.config.set(no_trim),
        LocalCluster(
            n_workers=workers or os.cpu_count() or 1,
            threads_per_worker=threads_per_worker,
            processes=True,
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


def _timed(fn: Callable[[Any, Any], Any], context: Any, payload: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn(context, payload)
    return out, time.perf_counter() - t0


def run(
    fn: Callable[[Any, Any], Any],
    tasks: Mapping[str, Any] | Iterable[tuple[str, Any]],
    store: ResultStore,
    *,
    context: Any = None,
    client: Any = None,
    scheduler: str | None = None,
    workers: int | None = None,
    progress: bool = True,
    desc: str = "sweep",
) -> SweepReport:
    """Run ``fn(context, payload) -> JSON-able record`` for every ``(key, payload)`` of ``tasks``
    not yet in ``store``; each record is committed as soon as it arrives.

    ``client``: an existing Dask client to use; otherwise one is made as ``dask_client``
    describes (``scheduler``, ``workers``). Results arrive in completion order. An exception in a
    task, or Ctrl-C, cancels the remaining work and propagates; everything stored stays.
    """
    items = list(tasks.items()) if isinstance(tasks, Mapping) else list(tasks)
    keys = [k for k, _ in items]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"task keys must be unique; {dup!r} appears more than once")
    done = store.keys()
    todo = [(k, p) for k, p in items if k not in done]
    t0 = time.perf_counter()
    if not todo:
        return SweepReport(0, len(items), 0.0, 0, 0.0)
    with contextlib.ExitStack() as stack:
        if client is None:
            client = stack.enter_context(dask_client(scheduler, workers))
        n_workers = 0 if client is None else len(client.scheduler_info()["workers"])
        bar = stack.enter_context(
            tqdm(total=len(items), initial=len(items) - len(todo), desc=desc, disable=not progress)
        )
        solved, busy = 0, 0.0
        for key, record, seconds in stream(fn, todo, context, client):
            store.put(key, record, seconds=seconds)  # committed now: a kill keeps it
            solved += 1
            busy += seconds
            bar.update()
    return SweepReport(solved, len(items) - len(todo), time.perf_counter() - t0, n_workers, busy)


def stream(
    fn: Callable[[Any, Any], Any],
    todo: Iterable[tuple[Any, Any]],
    context: Any,
    client: Any,
    *,
    warm: Callable[[Any], None] | None = None,
) -> Iterator[tuple[Any, Any, float]]:
    """``(key, fn(context, payload), seconds)`` for every ``(key, payload)`` of ``todo``, in
    completion order: in this process (``client`` None) or on the cluster, with ``context``
    shipped to every worker once. ``context`` may be a future that ``client.scatter`` returned
    (shipped once for several calls); ``warm(context)`` then runs on every worker before the
    first task (e.g. to build a network there). Ctrl-C or a failing task cancels the rest."""
    todo = list(todo)
    if client is None:
        for key, payload in todo:
            record, seconds = _timed(fn, context, payload)
            yield key, record, seconds
        return
    from distributed import Future, as_completed

    remote = context
    if context is not None and not isinstance(context, Future):
        remote = client.scatter(context, broadcast=True)
    if warm is not None:
        workers = list(client.scheduler_info()["workers"])
        client.gather([client.submit(warm, remote, workers=[w], pure=False) for w in workers])
    futures = {
        client.submit(
            _timed, fn, remote, payload, pure=False, key=f"qlib-sweep-{i}-{time.time_ns()}"
        ): key
        for i, (key, payload) in enumerate(todo)
    }
    try:
        for fut in as_completed(futures):
            record, seconds = fut.result()
            yield futures[fut], record, seconds
    finally:
        for fut in futures:  # Ctrl-C or a failed task: leave nothing running on the cluster
            fut.cancel()
