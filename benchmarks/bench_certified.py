"""Certified mixed precision: the cost of the certified objective, and the start-up of a run.

    python benchmarks/bench_certified.py [--workload workloads/fashion_mlp_certified.yaml]
                                         [--genomes 20] [--startup-runs 2] [--out FILE.json]

1. Per genome: the accuracy evaluation (fake-quantised forward over the exploration images)
   against the certified objective (genome box, then the workload's bound method over its
   certification images). Issue 14's target: the certificate costs at most the accuracy
   evaluation (an evaluation at most 2x) on the Fashion MLP workload with ``crown-ibp`` over 256
   images.
2. Start-up to the first evaluation of ``workloads/digits_tiny.yaml`` in a fresh interpreter,
   by phase (import torch, import qlib.explore, load the model and data, import ModelOpt,
   calibrate, build the evaluator, first evaluation). Target: under 15 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
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


def certified_cost(workload: Path, n: int) -> dict:
    """Median seconds of the accuracy evaluation and of the certificate over ``n`` genomes: the
    workload's method and dtype, then float32 and IBP for comparison."""
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
    variants = {
        "workload": ev.certifier,
        "float32": dataclasses.replace(ev.certifier, dtype="float32"),
        "ibp": dataclasses.replace(ev.certifier, method="ibp"),
    }
    acc_s, cert_s, statuses = [], [], []
    other_s: dict[str, list[float]] = {k: [] for k in variants if k != "workload"}
    for _ in range(n):
        genome = [int(v) for v in rng.integers(w.bits.lower, w.bits.upper + 1, n_genes)]
        t0 = time.perf_counter()
        ev.accuracy(genome)
        acc_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        statuses.append(ev.certify(genome).status)
        cert_s.append(time.perf_counter() - t0)
        box = ev.box(genome)
        for name, times in other_s.items():
            t0 = time.perf_counter()
            variants[name](ev.float_model, box)
            times.append(time.perf_counter() - t0)
    return {
        "workload": str(workload),
        "method": w.certified.method,
        "certification_images": len(ev.certifier.X),
        "exploration_images": len(ev.X),
        "accuracy_s_median": statistics.median(acc_s),
        "certificate_s_median": statistics.median(cert_s),
        "ratio": statistics.median(cert_s) / statistics.median(acc_s),
        **{
            f"ratio_{name}": statistics.median(t) / statistics.median(acc_s)
            for name, t in other_s.items()
        },
        "uncertifiable": statuses.count("uncertifiable"),
        "genomes": n,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workload", type=Path, default=ROOT / "workloads/fashion_mlp_certified.yaml")
    ap.add_argument("--startup-workload", type=Path, default=ROOT / "workloads/digits_tiny.yaml")
    ap.add_argument("--genomes", type=int, default=20)
    ap.add_argument("--startup-runs", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    result = {
        "startup": startup(a.startup_workload, a.startup_runs),
        "certified_cost": certified_cost(a.workload, a.genomes),
    }
    print(json.dumps(result, indent=2))
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
