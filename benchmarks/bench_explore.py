"""Exploration performance: evaluation overhead, Dask speed-up, NSGA-II vs random search.

    python benchmarks/bench_explore.py [--workload workloads/fashion_cnn_quant.yaml]

1. Wall time per evaluated individual (set bits + fake-quantised forward over the exploration
   subset + cost) against one bare float forward pass over the same subset (target < 20 %),
   and, in one serial NSGA-II run, its wall time against the sum of its evaluation times: what
   pymoo, the genome cache and the SQLite store add to the evaluations.
2. Speed-up of evaluating the same genomes with a 2-worker Dask LocalCluster (one torch thread
   per worker) over serial evaluation with one torch thread and with all of them.
3. NSGA-II against random search with the same number of evaluations: hypervolume of the
   feasible points as the book defines it (``qlib.explore.run.hypervolume``: reference point the
   accuracy floor and the all-upper-bits cost, costs normalised by the latter).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from qlib.explore import context, run
from qlib.explore import workload as wl
from qlib.explore.store import Store


def _genomes(n: int, n_genes: int, lo: int, hi: int, seed: int = 0) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return list(
        dict.fromkeys(tuple(int(v) for v in rng.integers(lo, hi + 1, n_genes)) for _ in range(n))
    )


def overhead(p: context.Prepared, repeats: int = 40) -> dict:
    """Per individual: float forward, fake-quantised forward, evaluation, and inside a search."""
    ev = p.evaluator
    X, y = ev.X, ev.y
    ev([8] * (2 * len(ev.input_amax)))  # build the network once
    genomes = _genomes(repeats, 2 * len(ev.input_amax), 2, 16)

    def float_forward() -> None:  # the same batches as the evaluator, without quantisers
        with torch.no_grad():
            for i in range(0, len(X), ev.batch_size):
                (
                    p.model(X[i : i + ev.batch_size]).argmax(1) == y[i : i + ev.batch_size]
                ).sum().item()

    bare, forward, individual = [], [], []
    for g in genomes:  # interleaved, so load from other processes hits all alike
        t = time.perf_counter()
        float_forward()
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        ev.accuracy(g)
        forward.append(time.perf_counter() - t)
        individual.append(ev(g)[2])
    b, f, q = (statistics.median(v) for v in (bare, forward, individual))
    # Inside NSGA-II (serial): what pymoo, the genome cache and the SQLite store add to the
    # evaluations, both from the same run (evaluation times as recorded in the store).
    w = p.workload
    ws = w.model_copy(
        update={
            "nsga2": w.nsga2.model_copy(
                update={"population": 12, "offspring": 12, "generations": 4}
            )
        }
    )
    ps = context.Prepared(ws, p.model, ev, p.min_accuracy, p.baseline)
    run.nsga2(ps)  # pymoo's algorithm modules take seconds to import: not part of the run
    with Store(":memory:", "bench") as store:
        t = time.perf_counter()
        n = run.explore(ps, store).evaluated
        wall = time.perf_counter() - t
        evaluating = sum(r.seconds for r in store.records())
    search = wall / n
    print(
        f"[overhead] {len(X)} images, medians of {repeats}: float forward {b * 1e3:.1f} ms, "
        f"fake-quantised forward {f * 1e3:.1f} ms, evaluated individual {q * 1e3:.1f} ms "
        f"(+{100 * (q / b - 1):.0f} % over the float forward); NSGA-II run of {n} individuals: "
        f"{search * 1e3:.1f} ms each, {100 * (wall / evaluating - 1):+.1f} % over its evaluations"
    )
    return {
        "images": len(X),
        "bare_forward_ms": b * 1e3,
        "quantised_forward_ms": f * 1e3,
        "individual_ms": q * 1e3,
        "overhead_percent": 100 * (q / b - 1),
        "search_individual_ms": search * 1e3,
        "search_evaluations": n,
        "harness_overhead_percent": 100 * (wall / evaluating - 1),
    }


def dask_speedup(p: context.Prepared, n: int = 32) -> dict:
    """Same genomes: serial with all torch threads, serial with one, 2 one-thread Dask workers."""
    genomes = _genomes(n, 2 * len(p.evaluator.input_amax), 2, 16, seed=1)
    threads = torch.get_num_threads()
    serial = {}
    for t_count in (threads, 1):
        torch.set_num_threads(t_count)
        with Store(":memory:", "bench") as store:
            t = time.perf_counter()
            run.CachedEvaluation(p.evaluator, store, p.min_accuracy)(genomes)
            serial[t_count] = time.perf_counter() - t
    torch.set_num_threads(threads)
    spec = p.workload.parallel.model_copy(update={"mode": "local", "workers": 2})
    p.evaluator.threads = 1
    t0 = time.perf_counter()
    with run.dask_client(spec) as client, Store(":memory:", "bench") as store:
        started = time.perf_counter() - t0
        evaluation = run.CachedEvaluation(p.evaluator, store, p.min_accuracy, client=client)
        # Warm-up: the evaluator is scattered once; workers import ModelOpt and rebuild the net.
        evaluation(_genomes(4, len(genomes[0]), 2, 16, seed=99))
        t = time.perf_counter()
        evaluation(genomes)
        parallel = time.perf_counter() - t
    p.evaluator.threads = None
    print(
        f"[dask] {len(genomes)} genomes: serial {serial[threads]:.2f} s with {threads} torch "
        f"threads, {serial[1]:.2f} s with 1; 2 Dask workers (1 thread each) {parallel:.2f} s "
        f"after warm-up -> speed-up {serial[1] / parallel:.2f}x over one thread, "
        f"{serial[threads] / parallel:.2f}x over {threads}; cluster start {started:.1f} s"
    )
    return {
        "genomes": len(genomes),
        "serial_s": serial[threads],
        "serial_threads": threads,
        "serial_1_thread_s": serial[1],
        "dask_2_workers_s": parallel,
        "speedup": serial[threads] / parallel,
        "speedup_over_1_thread": serial[1] / parallel,
        "cluster_start_s": started,
    }


def search_quality(p: context.Prepared, seeds=(1, 2, 3)) -> dict:
    w = p.workload
    budget = w.nsga2.population + w.nsga2.offspring * (w.nsga2.generations - 1)
    res_n, res_r = [], []
    for seed in seeds:
        ws = w.model_copy(update={"nsga2": w.nsga2.model_copy(update={"seed": seed})})
        ps = context.Prepared(ws, p.model, p.evaluator, p.min_accuracy, p.baseline)
        with Store(":memory:", "bench") as store:
            run.explore(ps, store)
            res_n.append(run.hypervolume(np.array([r.objectives for r in store.records()]), ps))
            n_evals = len(store)
        with Store(":memory:", "bench") as store:
            res_r.append(run.hypervolume(run.random_search(ps, store, n_evals, seed=seed), ps))
    print(
        f"[search] budget ~{budget} (NSGA-II evaluated {n_evals} distinct genomes, random the "
        f"same number); hypervolume NSGA-II {np.mean(res_n):.3f} +- {np.std(res_n):.3f}, "
        f"random {np.mean(res_r):.3f} +- {np.std(res_r):.3f} over seeds {list(seeds)}"
    )
    return {"evaluations": n_evals, "seeds": list(seeds), "hv_nsga2": res_n, "hv_random": res_r}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", default="workloads/fashion_cnn_quant.yaml")
    ap.add_argument("--population", type=int, default=12)
    ap.add_argument("--generations", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--out", help="write the results here as JSON")
    a = ap.parse_args()
    w = wl.load(a.workload)
    w = w.model_copy(
        update={
            "nsga2": w.nsga2.model_copy(
                update={
                    "population": a.population,
                    "offspring": a.population,
                    "generations": a.generations,
                }
            )
        }
    )
    p = context.prepare(w)
    print(
        f"workload {w.name}: {len(p.evaluator.X)} exploration images, "
        f"{len(p.evaluator.input_amax)} quantised layers, baseline {p.baseline}, "
        f"minimum accuracy {p.min_accuracy:.4f}"
    )
    results = {
        "workload": w.name,
        "baseline": p.baseline,
        "overhead": overhead(p),
        "dask": dask_speedup(p),
        "search": search_quality(p, tuple(a.seeds)),
    }
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
