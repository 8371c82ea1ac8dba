"""Time and tightness of the logit bounds of ``qlib.bounds`` on an MNIST-sized MLP.

Usage (from the repository root, with qlib installed or ``PYTHONPATH=.``):
``python benchmarks/bench_bounds.py --out bench_bounds.json [--n 10000] [--data mnist]``

Bounds the logits of the 784-256-256-256-10 MLP (``qlib.zoo`` model ``mnist-mlp-4x256``, trained
on first use) for ``N`` inputs under ``Perturbation.uniform(eps)`` (all four kinds), with IBP and
the linear methods, and reports wall time (best of ``--repeat`` rounds, the methods interleaved in
each round so that they see the same machine load), time relative to IBP and the tightness ratio
``mean(IBP width) / mean(method width)`` (over the same inputs). Every bound is rounded outward
(``qlib.bounds.rounding``), so it holds for the numbers computed.

The limit is measured too: ``qlib.attack`` drives each logit up and down on the first
``--attack-n`` inputs (PGD from the nominal network and from the vertex that the
``--attack-guided`` method's relaxation names), and each method's mean width on those inputs is
divided by the attack's (no sound bound can go below 1). The attack only finds widths that
some perturbed network reaches, so it is a lower end of the limit; the exact MILP (``qlib.milp``,
HiGHS) gives the upper end: on the first ``--milp-n`` inputs it minimises and maximises the first
``--milp-logits`` logits within ``--milp-limit`` seconds per solve, and its proven bounds (within
the solver's tolerances) and its best points (networks replayed, so reached) bracket the true
width, and with it each method's distance from the limit. Methods marked ``f32`` compute in float32
with float32 margins. Targets: IBP < 2 s; a method within 1.3x of the attack's width at <= 20x
IBP's time; float32 >= 1.8x faster than float64 and <= 1e-4 (relative) looser. The slow ``crown
(...)`` variants run on fewer inputs and are scaled to N. With ``--data mnist`` the test images are
repeated up to ``N`` if the split is smaller (timing does not depend on which images are bounded).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from qlib import attack, bounds, data, milp, models, zoo
from qlib.quant import Perturbation

Crown, Fast = bounds.CrownOptions, bounds.FastOptions
METHODS = {
    "ibp": {"method": "ibp"},
    "crown-ibp": {"method": "crown-ibp"},
    "crown-fast (64)": {"method": "crown-fast", "options": Fast(64)},
    "crown-fast (128)": {"method": "crown-fast", "options": Fast(128)},
    "crown-fast (192)": {"method": "crown-fast", "options": Fast(192)},
    # Only the last hidden layer back-substituted, down to the input of affine layer 1.
    "crown (last, stop=1)": {"method": "crown", "options": Crown(1, intermediate_layers=1)},
    "crown (stop=1)": {"method": "crown", "options": Crown(1)},
    "crown (stop=1, all rows)": {"method": "crown", "options": Crown(1, unstable_only=False)},
    "crown (full)": {"method": "crown"},
    "crown (full, all rows)": {"method": "crown", "options": Crown(unstable_only=False)},
}
F32 = {"dtype": torch.float32}
METHODS |= {
    "ibp f32": {"method": "ibp", **F32},
    "crown-ibp f32": {"method": "crown-ibp", **F32},
    "crown-fast (128) f32": {"method": "crown-fast", "options": Fast(128), **F32},
    "crown-fast (192) f32": {"method": "crown-fast", "options": Fast(192), **F32},
    "crown (stop=1) f32": {"method": "crown", "options": Crown(1), **F32},
}
DEFAULT = ["ibp", "crown-ibp", "crown-fast (64)", "crown-fast (128)", "crown-fast (192)"]
DEFAULT += ["crown (stop=1)", "crown (full)", "ibp f32", "crown-ibp f32", "crown-fast (128) f32"]
DEFAULT += ["crown-fast (192) f32", "crown (stop=1) f32"]


def inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs [n, 1, 28, 28] in [0, 1]: MNIST test images (repeated) or uniform noise."""
    if kind == "mnist":
        X, _ = data.load("mnist", "test")
        reps = -(-n // len(X))
        return X.repeat(reps, 1, 1, 1)[:n]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen)


def model(
    name: str, progress: bool, epochs: int | None = None, train_limit: int | None = None
) -> torch.nn.Sequential:
    try:
        return zoo.get(name, epochs=epochs, train_limit=train_limit, progress=progress)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        print(f"zoo model {name} unavailable ({e}); using an untrained 784-256-256-256-10 MLP")
        return models.mlp([1, 28, 28], [256, 256, 256], 10)


def limit_bracket(net, X, pert, lo_a, hi_a, widths: dict, args) -> dict | None:
    """The true width of the first logits of the first inputs between what a network reaches
    (the attack's and the MILP's best points) and what the MILP proves, and each method's width
    on the same logits."""
    # Only inputs that every method bounded (the slow ones run on fewer) and the attack reached.
    n_img = min(args.milp_n, len(lo_a), *(len(w) for w in widths.values()))
    n_log = min(args.milp_logits, lo_a.shape[1])
    if n_img <= 0 or n_log <= 0:
        return None
    t0 = time.perf_counter()
    cells = []
    for i in range(n_img):
        _, solves = milp.image_logits(
            net, X[i], pert, time_limit=args.milp_limit, classes=range(n_log)
        )
        for j in range(n_log):
            low, high = solves[2 * j], solves[2 * j + 1]
            # A replayed MILP point is a network too (nan: the solver found none in time).
            top = np.nanmax([hi_a[i, j].item(), high.primal])
            bottom = np.nanmin([lo_a[i, j].item(), low.primal])
            cells.append(
                {
                    "image": i,
                    "logit": j,
                    "attack_width": (hi_a[i, j] - lo_a[i, j]).item(),
                    "reached_width": float(top - bottom),
                    "proven_width": high.bound - low.bound,
                    "optimal": low.status == high.status == "optimal",
                    "solve_seconds": low.seconds + high.seconds,
                }
            )
    reached = float(np.mean([c["reached_width"] for c in cells]))
    proven = float(np.mean([c["proven_width"] for c in cells]))
    methods = {}
    for name, w in widths.items():
        mean = float(np.mean([w[c["image"], c["logit"]].item() for c in cells]))
        # The method's width over the true one lies between these two.
        methods[name] = {"x_proven": mean / proven, "x_reached": mean / reached}
    print(
        f"MILP ({args.milp_limit:g} s per solve, {len(cells)} logits, "
        f"{time.perf_counter() - t0:.0f} s): the true mean width lies in [{reached:.4f}, "
        f"{proven:.4f}]"
    )
    return {
        "limit_s": args.milp_limit,
        "cells": cells,
        "reached_mean_width": reached,
        "proven_mean_width": proven,
        "methods": methods,
    }


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    p.add_argument("--n", type=int, default=10_000, help="number of inputs (default 10000)")
    p.add_argument("--data", choices=("mnist", "random"), default="mnist")
    p.add_argument("--model", default="mnist-mlp-4x256", help="qlib.zoo model name")
    p.add_argument(
        "--epochs", type=int, help="train the model this many epochs if not cached (quick runs)"
    )
    p.add_argument("--train-limit", type=int, help="training images, likewise")
    p.add_argument("--eps", type=float, default=1 / 1023, help="eps for all four kinds")
    p.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT,
        choices=list(METHODS),
        help="'crown (full...)' back-substitute every hidden layer to the input (slow on a CPU); "
        "'all rows': every hidden neuron, not only the unstable ones (same bounds, slower)",
    )
    p.add_argument(
        "--full-n", type=int, default=200, help="inputs for 'crown (full...)' (extrapolated)"
    )
    p.add_argument(
        "--slow-n",
        type=int,
        default=2000,
        help="inputs for the other 'crown (...)' methods (extrapolated)",
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="timing rounds, methods interleaved in each (the best time per method is kept)",
    )
    p.add_argument("--attack-n", type=int, default=100, help="inputs attacked for the limit")
    p.add_argument("--attack-steps", type=int, default=20)
    p.add_argument(
        "--attack-guided",
        default="crown",
        choices=["crown", "crown-ibp", "none"],
        help="linear method whose relaxation seeds one more PGD run per objective",
    )
    p.add_argument(
        "--milp-n", type=int, default=1, help="inputs whose limit the exact MILP brackets (0: none)"
    )
    p.add_argument("--milp-logits", type=int, default=2, help="logits per input, from logit 0")
    p.add_argument("--milp-limit", type=float, default=60.0, help="seconds per MILP solve")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    net = model(args.model, args.progress, args.epochs, args.train_limit)
    X = inputs(args.data, args.n, args.seed)
    pert = Perturbation.uniform(args.eps)
    names = ["ibp", *[m for m in args.methods if m != "ibp"]]

    def size(name: str) -> int:
        if name.startswith("crown (full"):
            return min(args.n, args.full_n)
        return min(args.n, args.slow_n) if name.startswith("crown (") else args.n

    bounds.logit_bounds(net, X[:10], pert, "crown-fast")  # warm-up
    best: dict[str, float] = {}
    widths: dict[str, torch.Tensor] = {}
    for _ in range(args.repeat):
        for name in names:
            n = size(name)
            seconds, (lower, upper) = timed(
                lambda n=n, name=name: bounds.logit_bounds(net, X[:n], pert, **METHODS[name])
            )
            best[name] = min(best.get(name, float("inf")), seconds * args.n / n)
            widths[name] = upper - lower
    m = min(args.attack_n, args.n, args.full_n)
    t0 = time.perf_counter()
    guided = None if args.attack_guided == "none" else args.attack_guided
    lo_a, hi_a = attack.attack_logits(
        net, X[:m], pert, steps=args.attack_steps, seed=args.seed, guided=guided
    )
    attack_width = (hi_a - lo_a).mean().item()
    print(
        f"attack: mean logit width {attack_width:.4f} on {m} inputs ({time.perf_counter() - t0:.0f} s)"
    )
    bracket = limit_bracket(net, X, pert, lo_a, hi_a, widths, args)
    rows = []
    for name in names:
        n = size(name)
        width = widths[name].mean().item()
        rows.append(
            {
                "method": name,
                "n": n,
                "seconds": best[name],
                "x_ibp_time": best[name] / best["ibp"],
                "mean_width": width,
                "tightness_vs_ibp": widths["ibp"][:n].mean().item() / width,  # same inputs
                "x_attack_width": widths[name][:m].mean().item() / attack_width,
                "dtype": str(METHODS[name].get("dtype", torch.float64)).removeprefix("torch."),
                "extrapolated": n < args.n,
            }
        )
    ibp_widths = widths["ibp"]
    print(f"{args.model}, N={args.n} ({args.data}), eps={args.eps:.6g} (all four kinds)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print(
        f"{'method':<26}{'seconds':>10}{'x IBP':>8}{'mean width':>12}{'IBP/width':>11}"
        f"{'/attack':>9}"
    )
    for r in rows:
        star = "*" if r["extrapolated"] else ""
        print(
            f"{r['method']:<26}{r['seconds']:>9.2f}{star:1}{r['x_ibp_time']:>8.1f}"
            f"{r['mean_width']:>12.4f}{r['tightness_vs_ibp']:>11.2f}{r['x_attack_width']:>9.3f}"
        )
    if any(r["extrapolated"] for r in rows):
        print(
            f"* timed on the first {args.slow_n} ('crown (full...)': {args.full_n}) inputs, scaled to N"
        )
    result = {
        "model": args.model,
        "n": args.n,
        "data": args.data,
        "eps": args.eps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ibp_mean_width": ibp_widths.mean().item(),
        "attack_n": m,
        "attack_mean_width": attack_width,
        "rows": rows,
        "milp": bracket,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
