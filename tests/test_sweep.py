"""Resumable Dask sweeps: a killed sweep resumes without losing or repeating stored work.
Budget: about 30 s on 2 cores (three short LocalCluster runs)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from qlib.store import ResultStore, task_key
from qlib.sweep import dask_client, run

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    from qlib.store import ResultStore, task_key
    from qlib.sweep import run

    def work(ctx, i):
        time.sleep(ctx["sleep"])
        with open(ctx["log"], "a") as f:  # every computation, from any process
            f.write(f"{i}\\n")
        return {"i": i, "square": i * i}

    if __name__ == "__main__":
        # A job started in the background of a non-interactive shell (as CI may start the
        # tests) inherits SIGINT ignored; a user's Ctrl-C reaches a foreground process.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        path, log, workers, n, sleep = sys.argv[1:]
        with ResultStore(path, "kill test") as store:
            tasks = {task_key(i=i): i for i in range(int(n))}
            ctx = {"log": log, "sleep": float(sleep)}
            r = run(work, tasks, store, context=ctx, workers=int(workers), progress=False)
            print("solved", r.solved, "skipped", r.skipped, flush=True)
    """
)


def square(ctx, i):
    return {"i": i, "square": i * i + (ctx or 0)}


def _start(tmp_path: Path, workers: int, n: int, sleep: float, log: str) -> subprocess.Popen:
    script = tmp_path / "sweep_script.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("QLIB_DASK_SCHEDULER", None)
    return subprocess.Popen(
        [
            sys.executable,
            str(script),
            str(tmp_path / "s.sqlite"),
            str(tmp_path / log),
            str(workers),
            str(n),
            str(sleep),
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: the kill reaches its Dask workers too
    )


def _stored(tmp_path: Path) -> dict:
    if not (tmp_path / "s.sqlite").exists():
        return {}
    with ResultStore(tmp_path / "s.sqlite", "kill test") as store:
        return {r.key: (r.record, r.created) for r in store.items()}


def _logged(path: Path) -> list[int]:
    return [int(v) for v in path.read_text().split()] if path.exists() else []


@pytest.mark.slow
def test_killed_sweep_resumes_without_repeating_stored_work(tmp_path):
    n = 16
    proc = _start(tmp_path, workers=2, n=n, sleep=0.4, log="run1.log")
    deadline = time.monotonic() + 60
    try:
        while len(_stored(tmp_path)) < 4:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sweep stored nothing within 60 s"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # a hard kill of the sweep and its workers
        proc.wait()
    before = _stored(tmp_path)
    assert 4 <= len(before) < n, "killed mid-run: some tasks stored, not all"
    proc = _start(tmp_path, workers=2, n=n, sleep=0.05, log="run2.log")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    after = _stored(tmp_path)
    assert len(after) == n
    assert all(after[k] == v for k, v in before.items()), "an earlier record changed"
    rerun = set(_logged(tmp_path / "run2.log"))
    stored_first = {after[k][0]["i"] for k in before}
    assert not rerun & stored_first, "a stored task was solved again"
    assert rerun | stored_first == set(range(n))
    assert f"skipped {len(before)}" in out


def test_serial_and_scheduler_address_runs(tmp_path):
    from distributed import LocalCluster

    tasks = {task_key(i=i): i for i in range(6)}
    with ResultStore(tmp_path / "a.sqlite", "squares") as store:
        r = run(square, tasks, store, context=10, workers=0, progress=False)
        assert (r.solved, r.skipped, r.workers) == (6, 0, 0)
        assert store.get(task_key(i=3)) == {"i": 3, "square": 19}
        again = run(square, tasks, store, context=10, workers=0, progress=False)
        assert (again.solved, again.skipped) == (0, 6)
    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None
        ) as cluster,
        ResultStore(tmp_path / "b.sqlite", "squares") as store,
    ):
        r = run(
            square, tasks, store, context=1, scheduler=cluster.scheduler_address, progress=False
        )
        assert r.solved == 6 and r.workers == 1
        assert sorted(rec["square"] for rec in store.records()) == [i * i + 1 for i in range(6)]


def test_errors_are_clear(tmp_path, monkeypatch):
    with ResultStore(tmp_path / "c.sqlite", "e") as store:
        with pytest.raises(ValueError, match="unique"):
            run(square, [("a", 1), ("a", 2)], store, workers=0, progress=False)

        def boom(ctx, i):
            if i == 2:
                raise RuntimeError("task 2 failed")
            return i

        with pytest.raises(RuntimeError, match="task 2 failed"):
            run(boom, [(str(i), i) for i in range(4)], store, workers=0, progress=False)
        assert store.keys() == {"0", "1"}  # finished work is kept
    monkeypatch.setenv("QLIB_DASK_SCHEDULER", "tcp://127.0.0.1:9")
    with pytest.raises(ConnectionError, match="QLIB_DASK_SCHEDULER"), dask_client(timeout=1):
        pass


@pytest.mark.slow
def test_ctrl_c_cancels_and_keeps_what_is_stored(tmp_path):
    proc = _start(tmp_path, workers=1, n=40, sleep=0.3, log="run.log")
    deadline = time.monotonic() + 60
    try:
        while len(_stored(tmp_path)) < 2:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the sweep stored nothing within 60 s"
            time.sleep(0.1)
        before = _stored(tmp_path)
        proc.send_signal(signal.SIGINT)  # Ctrl-C to the sweep's own process
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err
    after = _stored(tmp_path)
    assert all(after[k] == v for k, v in before.items()) and len(after) < 40
    time.sleep(1.0)  # cancelled: nothing keeps computing after the sweep has gone
    done = len(_logged(tmp_path / "run.log"))
    time.sleep(1.0)
    assert len(_logged(tmp_path / "run.log")) == done
