"""Certified mixed precision: the cost of the certified objective, and the start-up of a run.

    python benchmarks/bench_certified.py [--workload workloads/fashion_mlp_certified.yaml]
                                         [--genomes 20] [--generations N] [--startup-runs 2]
                                         [--out FILE.json]

1. Per genome: the accuracy evaluation (fake-quantised forward over the exploration images)
   against the certified objective (genome box, then the workload's bound method over its
   certification images), and the same certificate in other dtypes, stops and methods with the
   median certified value of each, and the workload's bound with its rounding margins off (not
   a certificate: what soundness in floating point costs). Issue 14's target: the certificate
   costs at most the accuracy evaluation (an evaluation at most 2x) on the Fashion MLP workload
   with ``crown-ibp`` over 256 images. The accuracy and the certificate are timed back to back
   per genome, as an exploration calls them, and the variants after them. Measured with torch's
   threads, then again with one thread, as each Dask worker of an exploration runs. The tensor
   operations of one more genome's certificate and accuracy evaluation are counted
   (``tensor_operations``).
   Then the same two times per genome of the workload's own NSGA-II search, where genomes share
   bit widths and the certifier reuses repeated layers' intervals.
2. Start-up to the first evaluation of ``workloads/digits_tiny.yaml`` in a fresh interpreter,
   by phase (import torch, import qlib.explore, load the model and data, import ModelOpt,
   calibrate, build the evaluator, first evaluation). Target: under 15 s on 2 cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

_STARTUP = r"""
import json, time
T0 = time.perf_counter()
marks = {}
def mark(name): marks[name] = time.perf_counter() - T0
import torch; mark("import torch")
from qlib.explore import context, workload as wl; mark("import qlib.explore")
w = wl.load(WORKLOAD)
model = context.load_model(w); mark("load model (and its training data)")
import modelopt.torch.quantization; mark("import ModelOpt quantization")
p = context.prepare(w, skip_baseline=True); mark("calibrate and prepare")
p.evaluator([8] * (2 * len(p.evaluator.input_amax))); mark("first evaluation")
print(json.dumps(marks))
"""


def startup(workload: Path, runs: int) -> list[dict]:
    """Cumulative seconds per phase in ``runs`` fresh interpreters (one torch thread)."""
    out = []
    for _ in range(runs):
        code = _STARTUP.replace("WORKLOAD", repr(str(workload)))
        res = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
            check=True,
        )
        out.append(json.loads(res.stdout.strip().splitlines()[-1]))
    return out


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Inside the block torch uses ``threads`` threads (``None``: as many as it uses); yields
    the count."""
    import torch

    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(old)


def tensor_operations(call: Callable[[], object]) -> int:
    """How many tensor operations ``call()`` issues: each operator call that reaches torch's
    dispatcher from Python-level code, as a dispatch mode sees it (views and conversions
    included; the kernels an operator runs inside itself are not counted again)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    with Count() as count:
        call()
    return count.calls


def batch_share(evaluator, genomes: list[list[int]], copies: int = 10) -> dict:
    """What certifying ``copies`` genomes in one batch would cost per genome, at best: each of
    ``genomes[1:]`` certified on the certification images (ms), against one certificate over
    those images repeated ``copies`` times under the same box, divided by ``copies``. A batch of
    genomes does the same work as the repeats, and more (each sample its own radii), so the
    saving is an upper bound. ``genomes`` share their first layer's bits, and both certifiers
    meet ``genomes[0]`` first, so that both reuse its interval as a search does; each certifier
    is a fresh copy, so nothing else is remembered. Timed alternately, medians."""
    import dataclasses

    import torch

    cert = evaluator.certifier
    X, y = cert.X, cert.y
    one = dataclasses.replace(cert)
    many = dataclasses.replace(cert, X=X.repeat(copies, *([1] * (X.ndim - 1))), y=y.repeat(copies))
    model = evaluator.float_model
    for c in (one, many):
        c(model, evaluator.box(genomes[0]))
    single, batched = [], []
    for k, genome in enumerate(genomes[1:]):
        box = evaluator.box(genome)
        for which in (one, many) if k % 2 else (many, one):
            t0 = time.perf_counter()
            which(model, box)
            seconds = time.perf_counter() - t0
            (single if which is one else batched).append(seconds)
    return {
        "single_ms": 1e3 * statistics.median(single),
        "batched_ms_per_genome": 1e3 * statistics.median(batched) / copies,
        "copies": copies,
        "threads": torch.get_num_threads(),
    }


def certified_cost(workload: Path, n: int, threads: int | None = None) -> dict:
    """Median seconds of the accuracy evaluation and of the certificate over ``n`` genomes: the
    workload's method, dtype and stop, then the alternatives, each with its median certified
    value over the genomes that some variant certifies (lower is tighter). ``threads``: torch
    threads for the measurement (default: as many as torch uses)."""
    with torch_threads(threads) as count:
        return {**_certified_cost(workload, n), "threads": count}


def _certified_cost(workload: Path, n: int) -> dict:
    import dataclasses

    from qlib.explore import context
    from qlib.explore import workload as wl

    w = wl.load(workload)
    p = context.prepare(w, skip_baseline=True)
    ev = p.evaluator
    n_genes = 2 * len(ev.input_amax)
    rng = np.random.default_rng(0)
    ev.accuracy([8] * n_genes)
    ev.certify([8] * n_genes)  # build the network and the float model once
    cert = ev.certifier
    variants = {
        "workload": cert,
        "float64, to the input": dataclasses.replace(cert, dtype="float64", stop=0),
        "float32, to the input": dataclasses.replace(cert, dtype="float32", stop=0),
        "float64, stop 1": dataclasses.replace(cert, dtype="float64", stop=1),
        "float32, stop 2": dataclasses.replace(cert, dtype="float32", stop=2),
        "ibp float64": dataclasses.replace(cert, method="ibp", dtype="float64", stop=0),
        UNSOUND: _without_margins(cert),
    }
    acc_s: list[float] = []
    seconds: dict[str, list[float]] = {k: [] for k in variants}
    values: dict[str, list[float]] = {k: [] for k in variants}
    statuses = []
    # The upper part of the range, where certificates are useful (a random genome over the whole
    # range has some layer too coarse and is uncertifiable): the variants' values can then be
    # compared; the time of a bound does not depend on the radii.
    low = max(w.bits.lower, w.bits.upper - 6)
    genomes = [[int(v) for v in rng.integers(low, w.bits.upper + 1, n_genes)] for _ in range(n)]
    # First the accuracy and the certificate one after the other, as an exploration calls them;
    # then the variants. Timed in one loop with the variants between, the workload's certificate
    # paid for the caches that the variants (float64 ones among them) had filled, which an
    # exploration never does.
    for genome in genomes:
        t0 = time.perf_counter()
        ev.accuracy(genome)
        acc_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        statuses.append(ev.certify(genome).status)
        seconds["workload"].append(time.perf_counter() - t0)
    for genome in genomes:
        box = ev.box(genome)
        for name, certifier in variants.items():
            t0 = time.perf_counter()
            c = certifier(ev.float_model, box)
            if name != "workload":
                seconds[name].append(time.perf_counter() - t0)
            values[name].append(c.value)
    # One more random genome, counted rather than timed: a certificate is many small tensor
    # operations, the accuracy evaluation fewer and larger ones.
    probe = [int(v) for v in rng.integers(low, w.bits.upper + 1, n_genes)]
    operations = {
        "accuracy": tensor_operations(lambda: ev.accuracy(probe)),
        "certificate": tensor_operations(lambda: ev.certify(probe)),
    }
    acc = statistics.median(acc_s)
    sound = [v for name, v in values.items() if name != UNSOUND]
    useful = [i for i in range(n) if min(v[i] for v in sound) < 1.0]
    return {
        "workload": str(workload),
        "method": cert.method,
        "dtype": cert.dtype,
        "stop": cert.stop,
        "certification_images": len(cert.X),
        "exploration_images": len(ev.X),
        "accuracy_s_median": acc,
        "certificate_s_median": statistics.median(seconds["workload"]),
        "ratio": statistics.median(seconds["workload"]) / acc,
        "variants": {
            name: {
                "ratio": statistics.median(seconds[name]) / acc,
                "value_median": statistics.median([values[name][i] for i in useful])
                if useful
                else None,
            }
            for name in variants
        },
        "without_margins": UNSOUND,  # the name of the variant that is not a certificate
        "operations": operations,
        "uncertifiable": statuses.count("uncertifiable"),
        "genomes": n,
    }


# Not a certificate: the workload's bound with every rounding margin off, timed to show what the
# margins cost and what the time is without them.
UNSOUND = "workload without rounding margins (not sound: for the time only)"


def _without_margins(certifier):
    from qlib.bounds import rounding

    def run(model, box):
        with rounding.outward(False):
            return certifier(model, box)

    return run


def search_cost(workload: Path, generations: int | None, threads: int | None = None) -> dict:
    """Per genome of the workload's own NSGA-II search (``generations`` generations, ``None``: the
    workload's; run serially in this process): the accuracy evaluation against the certificate,
    each timed where the evaluator calls it. Unlike ``certified_cost``'s random genomes, a
    search's genomes share bit widths, so the certifier reuses the IBP intervals of repeated
    leading layers (``qlib.bounds.memo.remember_intervals``); its hits and misses are
    reported."""
    from qlib.explore import context, run
    from qlib.explore import workload as wl
    from qlib.explore.store import Store

    with torch_threads(threads) as count:
        w = wl.load(workload)
        p = context.prepare(w, skip_baseline=True)
        ev = p.evaluator
        seconds: dict[str, list[float]] = {"accuracy": [], "certify": []}
        for name in seconds:
            method = getattr(ev, name)

            def timed(genome, method=method, name=name):
                t0 = time.perf_counter()
                out = method(genome)
                seconds[name].append(time.perf_counter() - t0)
                return out

            setattr(ev, name, timed)  # this instance only: the search calls it as it would
        store = Store(":memory:", w.digest(), w.name)
        run.explore(p, store, generations=generations)  # no Dask client: in this process
        memo = ev.certifier._memo
        acc, cert = seconds["accuracy"], seconds["certify"]
        return {
            "genomes": len(cert),
            "accuracy_s_median": statistics.median(acc),
            "certificate_s_median": statistics.median(cert),
            "ratio": statistics.median(cert) / statistics.median(acc),
            "ratio_of_totals": sum(cert) / sum(acc),
            "memo_hits": memo.hits,
            "memo_misses": memo.misses,
            "threads": count,
        }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", type=Path, default=ROOT / "workloads/fashion_mlp_certified.yaml")
    ap.add_argument("--startup-workload", type=Path, default=ROOT / "workloads/digits_tiny.yaml")
    ap.add_argument("--genomes", type=int, default=20)
    ap.add_argument("--startup-runs", type=int, default=2)
    ap.add_argument(
        "--generations", type=int, help="generations of the timed search (default: the workload's)"
    )
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    result = {
        "startup": startup(a.startup_workload, a.startup_runs),
        "certified_cost": certified_cost(a.workload, a.genomes),
        # The exploration's own setting: Dask workers of one thread each.
        "certified_cost_one_thread": certified_cost(a.workload, a.genomes, threads=1),
        "search_cost": search_cost(a.workload, a.generations),
        "search_cost_one_thread": search_cost(a.workload, a.generations, threads=1),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
