"""Time and tightness of the logit bounds of ``qlib.bounds`` on an MNIST-sized MLP.

Usage (from the repository root, with qlib installed or ``PYTHONPATH=.``):
``python benchmarks/bench_bounds.py --out bench_bounds.json [--n 10000] [--data mnist]``

Bounds the logits of the 784-256-256-256-10 MLP (``qlib.zoo`` model ``mnist-mlp-4x256``, trained
on first use) for ``N`` inputs under ``Perturbation.uniform(eps)`` (all four kinds), with IBP and
the linear methods, and reports wall time, time relative to IBP and the tightness ratio
``mean(IBP width) / mean(method width)``. Targets: IBP < 2 s, linear < 20x IBP, ratio >= 3.
With ``--data mnist`` the test images are repeated up to ``N`` if the split is smaller (timing
does not depend on which images are bounded).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from qlib import bounds, data, models, zoo
from qlib.quant import Perturbation

METHODS = {
    "ibp": {"method": "ibp"},
    "crown-ibp": {"method": "crown-ibp"},
    "crown (stop=1)": {"method": "crown", "intermediate_stop": 1},
    "crown (full)": {"method": "crown"},
}


def inputs(kind: str, n: int, seed: int) -> torch.Tensor:
    """``n`` inputs [n, 1, 28, 28] in [0, 1]: MNIST test images (repeated) or uniform noise."""
    if kind == "mnist":
        X, _ = data.load("mnist", "test")
        reps = -(-n // len(X))
        return X.repeat(reps, 1, 1, 1)[:n]
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=gen)


def model(name: str, progress: bool) -> torch.nn.Sequential:
    try:
        return zoo.get(name, progress=progress)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        print(f"zoo model {name} unavailable ({e}); using an untrained 784-256-256-256-10 MLP")
        return models.mlp([1, 28, 28], [256, 256, 256], 10)


def timed(fn, repeat: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where to write the JSON results")
    p.add_argument("--n", type=int, default=10_000, help="number of inputs (default 10000)")
    p.add_argument("--data", choices=("mnist", "random"), default="mnist")
    p.add_argument("--model", default="mnist-mlp-4x256", help="qlib.zoo model name")
    p.add_argument("--eps", type=float, default=1 / 1023, help="eps for all four kinds")
    p.add_argument(
        "--methods",
        nargs="+",
        default=["ibp", "crown-ibp", "crown (stop=1)"],
        choices=list(METHODS),
        help="'crown (full)' back-substitutes every hidden layer to the input (slow on a CPU)",
    )
    p.add_argument(
        "--full-n", type=int, default=200, help="inputs for 'crown (full)' (extrapolated)"
    )
    p.add_argument("--repeat", type=int, default=1, help="timing runs per method (best is kept)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    args = p.parse_args()

    net = model(args.model, args.progress)
    X = inputs(args.data, args.n, args.seed)
    pert = Perturbation.uniform(args.eps)
    rows = []
    ibp_time, ibp_widths = 1.0, None
    for name in ["ibp", *[m for m in args.methods if m != "ibp"]]:
        n = min(args.n, args.full_n) if name == "crown (full)" else args.n
        seconds, (lower, upper) = timed(
            lambda n=n, name=name: bounds.logit_bounds(net, X[:n], pert, **METHODS[name]),
            args.repeat,
        )
        seconds *= args.n / n  # extrapolated to N when run on fewer inputs
        width = (upper - lower).mean().item()
        if name == "ibp":
            ibp_time, ibp_widths = seconds, upper - lower
        ref = ibp_widths[:n].mean().item()  # IBP on the same inputs
        rows.append(
            {
                "method": name,
                "n": n,
                "seconds": seconds,
                "x_ibp_time": seconds / ibp_time,
                "mean_width": width,
                "tightness_vs_ibp": ref / width,
                "extrapolated": n < args.n,
            }
        )
    print(f"{args.model}, N={args.n} ({args.data}), eps={args.eps:.6g} (all four kinds)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor()}")
    print(f"{'method':<16}{'seconds':>10}{'x IBP':>8}{'mean width':>12}{'IBP/width':>11}")
    for r in rows:
        star = "*" if r["extrapolated"] else ""
        print(
            f"{r['method']:<16}{r['seconds']:>9.2f}{star:1}{r['x_ibp_time']:>8.1f}"
            f"{r['mean_width']:>12.4f}{r['tightness_vs_ibp']:>11.2f}"
        )
    if any(r["extrapolated"] for r in rows):
        print(f"* timed on {args.full_n} inputs and scaled to N")
    result = {
        "model": args.model,
        "n": args.n,
        "data": args.data,
        "eps": args.eps,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "ibp_mean_width": ibp_widths.mean().item(),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
