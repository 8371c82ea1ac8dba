"""Command line: ``python -m qlib.explore {run,calibrate,retrain,reevaluate,energy} WORKLOAD ...``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from qlib.explore import workload as wl

__all__ = [
    "main",
    "parser",
]


def _results_path(w: wl.Workload, given: str | None) -> Path:
    return Path(given) if given else Path("results") / f"{w.name}.sqlite"


def cmd_run(a: argparse.Namespace) -> int:
    from qlib.explore import context, run
    from qlib.explore.store import Store

    w = wl.load(a.workload)
    if a.serial:
        w = w.model_copy(update={"parallel": w.parallel.model_copy(update={"mode": "serial"})})
    prepared = context.prepare(
        w,
        skip_baseline=a.skip_baseline,
        progress=a.progress,
        threads=1 if w.parallel.mode != "serial" else None,
    )
    path = _results_path(w, a.results)
    with Store(path, w.digest(), w.name) as store, run.dask_client(w.parallel) as client:
        before = len(store)
        try:
            ex = run.explore(
                prepared,
                store,
                client=client,
                progress=a.progress,
                verbose=a.verbose,
                generations=a.generations,
            )
        except KeyboardInterrupt:
            print(
                f"interrupted: {len(store)} evaluations kept in {path}; rerun to resume",
                file=sys.stderr,
            )
            return 130
        print(f"{ex.evaluated} new evaluations ({before} reused) in {ex.seconds:.1f} s -> {path}")
        print(
            f"minimum accuracy {ex.min_accuracy:.4f}"
            + (f", baseline {ex.baseline:.4f}" if ex.baseline is not None else "")
        )
        for r in run.pareto_front(store):
            cert = f"  certified {r.objectives[2]:.4g} ({r.status})" if r.status else ""
            print(
                f"  accuracy {r.accuracy:.4f}  cost {r.objectives[1]:.4g}{cert}  "
                f"bits {list(r.genome)}"
            )
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    from qlib.explore import context

    w = wl.load(a.workload)
    qnet = context.calibrate(w, context.load_model(w, a.progress))
    ranges = qnet.input_amax()
    out = Path(a.output) if a.output else Path("results") / f"{w.name}.calibration.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"method": w.calibration.method, "input_amax": ranges}, indent=2))
    for name, amax in ranges.items():
        print(f"  layer {name}: input range {amax:.4f}")
    print(f"-> {out}")
    return 0


def _post(a: argparse.Namespace, retrain: bool) -> int:
    from qlib.explore import context, finetune
    from qlib.explore.store import Store

    w = wl.load(a.workload)
    # The stored constraint values decide feasibility; the baseline is not needed if avoidable.
    prepared = context.prepare(w, skip_baseline=w.constraint.minimum_accuracy is not None)
    with Store(a.results, w.digest(), w.name) as store:
        rows = (
            finetune.retrain(prepared, store, a.n, progress=a.progress)
            if retrain
            else finetune.reevaluate(prepared, store, a.n)
        )
    import pandas as pd

    df = pd.DataFrame([r.__dict__ for r in rows])
    print(df.to_string(index=False))
    if a.output:
        df.to_csv(a.output, index=False)
    return 0


def cmd_energy(a: argparse.Namespace) -> int:
    from qlib.explore import context, traffic

    w = wl.load(a.workload)
    model = context.load_model(w, a.progress)
    X, _ = context.load_data(w.datasets.exploration, limit=1)
    shapes = traffic.layer_shapes(model, X.shape[1:], w.layers == "conv")
    genome = a.bits or [16] * (2 * len(shapes))
    models_ = ("linear", "zigzag") if a.model == "both" else (a.model,)
    df = traffic.traffic_table(
        shapes, genome, models_=models_, accelerator=w.energy.accelerator, mapping=w.energy.mapping
    )
    print(df.to_string(index=False))
    for m, part in df.groupby("model"):
        print(
            f"{m}: {part.dram_MB.sum():.4f} MB, {part.dram_energy_pJ.sum() / 1e6:.3f} uJ per inference"
        )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qlib.explore", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the NSGA-II exploration (resumes from the results file)")
    r.add_argument("workload")
    r.add_argument(
        "--skip-baseline",
        action="store_true",
        help="use constraint.minimum_accuracy instead of baseline - allowed_drop",
    )
    r.add_argument("--results", help="SQLite results file (default results/NAME.sqlite)")
    r.add_argument("--serial", action="store_true", help="evaluate in this process, no Dask")
    r.add_argument("--generations", type=int, help="override nsga2.generations (e.g. to extend)")
    r.add_argument("--verbose", action="store_true", help="print pymoo's per-generation table")
    r.add_argument("--progress", action="store_true", help="progress bars")
    r.set_defaults(func=cmd_run)

    c = sub.add_parser("calibrate", help="calibrate input ranges and write them as JSON")
    c.add_argument("workload")
    c.add_argument("--output", help="JSON file (default results/NAME.calibration.json)")
    c.add_argument("--progress", action="store_true")
    c.set_defaults(func=cmd_calibrate)

    for name, retrain, text in (
        ("retrain", True, "fine-tune (QAT, straight-through) the N best"),
        ("reevaluate", False, "re-evaluate the N best on more data"),
    ):
        s = sub.add_parser(name, help=text)
        s.add_argument("workload")
        s.add_argument("results", help="SQLite results file of a run of this workload")
        s.add_argument("-n", type=int, default=5, help="how many of the most accurate individuals")
        s.add_argument("--output", help="CSV file for the table")
        s.add_argument("--progress", action="store_true")
        s.set_defaults(func=lambda a, rt=retrain: _post(a, rt))

    e = sub.add_parser("energy", help="per-layer DRAM traffic and energy table")
    e.add_argument("workload")
    e.add_argument("--bits", type=int, nargs="+", help="genome in0 w0 in1 w1 ... (default all 16)")
    e.add_argument("--model", choices=("linear", "zigzag", "both"), default="both")
    e.add_argument("--progress", action="store_true")
    e.set_defaults(func=cmd_energy)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if getattr(a, "verbose", False) else logging.WARNING)
    try:
        return a.func(a)
    except wl.WorkloadError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
