"""Benchmark qlib's GPFQ: time, accuracy, peak memory of its two forms, and Brevitas's GPFQ.

Models: an MNIST MLP 784-512-256-10 and the book's small CNN (``qlib.models.cnn``), trained here
(seeded) on ``qlib.data.load("mnist", "train")``; 1,024 calibration images from the training
split; accuracy on the test split.

Fair comparison with Brevitas (if installed): both quantise to the same grid, a max-abs
symmetric narrow-range b-bit grid (``scalar="max", levels="2^b-1"`` here; Brevitas
``Int8WeightPer{Tensor,Channel}Float`` with ``weight_bit_width=b`` and the scale frozen from the
float weights, ``PARAMETER_FROM_STATS``), with the same calibration images in the same batches.

Peak memory: each form runs in a fresh subprocess; the number is the growth of its resident set
size (sampled every millisecond from ``/proc/self/statm``, so Linux only) during
``gpfq.quantize`` over the size before. RSS sees torch's allocations; ``tracemalloc`` does not.
It is measured for each calibration size in ``--memory-calib`` to show how it scales.

Timings default to one thread (``--threads``): on a shared machine OpenMP threads fighting
for cores made some torch kernels (``F.unfold``) over 10x slower. Both libraries run under the
same setting.

    python benchmarks/bench_gpfq.py --out gpfq.json
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch import nn

from qlib import data, gpfq, models, ptq

MODELS = ("mlp", "cnn")


def build(kind: str) -> nn.Sequential:
    if kind == "mlp":
        return models.mlp((1, 28, 28), [512, 256], 10, seed=0)
    return models.cnn((1, 28, 28), 10, seed=0)


def load_data(seed: int) -> tuple[tuple, torch.Tensor, tuple]:
    """Train and test splits, and the training images in a seeded order (calibration pool)."""
    train = data.load("mnist", "train")
    test = data.load("mnist", "test")
    order = torch.randperm(len(train[0]), generator=torch.Generator().manual_seed(seed))
    return train, train[0][order], test


def best_time(fn, repeats: int) -> tuple[float, object]:
    """Smallest wall time over ``repeats`` runs, and the last result."""
    times, out = [], None
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


# ----------------------------------------------------------------------------- Brevitas


def brevitas_version() -> str | None:
    try:
        import brevitas
    except ImportError:
        return None
    return brevitas.__version__


def to_brevitas(model: nn.Sequential, bits: int, per_channel: bool) -> nn.Sequential:
    """The same network as Brevitas QuantLinear/QuantConv2d layers with a frozen max-abs grid."""
    import brevitas.nn as qnn
    from brevitas.inject.enum import ScalingImplType
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat

    base = Int8WeightPerChannelFloat if per_channel else Int8WeightPerTensorFloat
    wq = base.let(scaling_impl_type=ScalingImplType.PARAMETER_FROM_STATS)
    layers: list[nn.Module] = []
    for m in model:
        if isinstance(m, nn.Linear):
            q = qnn.QuantLinear(
                m.in_features,
                m.out_features,
                bias=m.bias is not None,
                weight_quant=wq,
                weight_bit_width=bits,
            )
        elif isinstance(m, nn.Conv2d):
            q = qnn.QuantConv2d(
                m.in_channels,
                m.out_channels,
                m.kernel_size,
                stride=m.stride,
                padding=m.padding,
                dilation=m.dilation,
                groups=m.groups,
                bias=m.bias is not None,
                weight_quant=wq,
                weight_bit_width=bits,
            )
        else:
            layers.append(copy.deepcopy(m))
            continue
        with torch.no_grad():
            q.weight.copy_(m.weight)
            if m.bias is not None:
                q.bias.copy_(m.bias)
        layers.append(q)
    return nn.Sequential(*layers).eval()


def brevitas_gpfq(
    model: nn.Sequential, calib: torch.Tensor, bits: int, per_channel: bool, batch_size: int
) -> tuple[nn.Module, float, float]:
    """Brevitas GPFQ; returns (model, seconds for the whole gpfq_mode loop, seconds to set up)."""
    from brevitas.graph.gpfq import gpfq_mode

    t0 = time.perf_counter()
    qmodel = to_brevitas(model, bits, per_channel)
    with torch.no_grad():
        qmodel(calib[:batch_size])  # initialises the frozen scales from the float weights
    setup = time.perf_counter() - t0
    t = time.perf_counter()
    with torch.no_grad(), gpfq_mode(qmodel, use_quant_activations=False) as g:
        for _ in range(g.num_layers):
            for i in range(0, len(calib), batch_size):
                g.model(calib[i : i + batch_size])
            g.update()
    return qmodel, time.perf_counter() - t, setup


# ----------------------------------------------------------------------------- memory


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakRSS(threading.Thread):
    """Samples this process's resident set size every millisecond; ``peak`` is the largest seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = _rss_mib()
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.001):
            self.peak = max(self.peak, _rss_mib())

    def stop(self) -> float:
        self._done.set()
        self.join()
        return max(self.peak, _rss_mib())


def child_peak_memory(args: argparse.Namespace) -> None:
    """Run in a subprocess: quantise once, print the peak RSS growth in MiB as JSON."""
    torch.set_num_threads(args.threads)
    model = torch.load(args.model_path, weights_only=False)
    calib = torch.load(args.calib_path)
    gc.collect()
    before = _rss_mib()
    sampler = PeakRSS()
    sampler.start()
    gpfq.quantize(model, calib, args.bits, scalar="max", levels="2^b-1", method=args.child_form)
    print(json.dumps({"peak_rss_growth_mib": sampler.stop() - before}))


def peak_memory(
    model: nn.Module, calib: torch.Tensor, form: str, args: argparse.Namespace
) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        mp, cp = Path(tmp) / "model.pt", Path(tmp) / "calib.pt"
        torch.save(model, mp)
        torch.save(calib, cp)
        cmd = [
            sys.executable,
            __file__,
            "--child-form",
            form,
            "--model-path",
            str(mp),
            "--calib-path",
            str(cp),
            "--bits",
            str(args.bits),
            "--threads",
            str(args.threads),
        ]
        # Large blocks go to mmap and back to the OS when freed: otherwise glibc keeps freed
        # heap and RSS would grow with the number of calibration batches, not live memory.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_rss_growth_mib"]


# ----------------------------------------------------------------------------- main


def bench_model(kind: str, train, calib, pool, test, args: argparse.Namespace) -> dict:
    model = build(kind)
    t = time.perf_counter()
    models.train(model, train, epochs=args.epochs, lr=1e-3, batch_size=128, seed=0, progress=False)
    row: dict = {"model": kind, "train_s": time.perf_counter() - t}
    row["float_accuracy"] = models.evaluate(model, test)
    grid = dict(
        scalar="max", levels="2^b-1", per_channel=args.per_channel, batch_size=args.batch_size
    )
    row["rtn_accuracy"] = ptq.rtn(model, args.bits, eval_data=test, **grid).accuracy
    for form in gpfq.METHODS:
        secs, res = best_time(
            lambda form=form: gpfq.quantize(model, calib, args.bits, method=form, **grid),
            args.repeats,
        )
        row[f"qlib_{form}_s"] = secs
        row[f"qlib_{form}_accuracy"] = models.evaluate(res.model, test)
        row[f"qlib_{form}_rel_errors"] = [r.rel_error for r in res.layers]
    secs, res = best_time(
        lambda: gpfq.quantize(
            model,
            calib,
            args.bits,
            scalar="auto",
            per_channel=args.per_channel,
            batch_size=args.batch_size,
        ),
        args.repeats,
    )
    row["qlib_auto_s"], row["qlib_auto_accuracy"] = secs, models.evaluate(res.model, test)
    row["qlib_auto_scalars"] = [r.scalar for r in res.layers]
    if args.brevitas and brevitas_version() is not None:
        times = []
        for _ in range(args.repeats):
            bm, secs, setup = brevitas_gpfq(
                model, calib, args.bits, args.per_channel, args.batch_size
            )
            times.append(secs)
        row["brevitas_s"] = min(times)
        row["brevitas_setup_s"] = setup
        row["brevitas_accuracy"] = models.evaluate(bm, test)
        row["time_ratio_qlib_over_brevitas"] = row["qlib_covariance_s"] / row["brevitas_s"]
        row["accuracy_gap_points"] = 100 * (
            row["qlib_covariance_accuracy"] - row["brevitas_accuracy"]
        )
    if args.memory:
        row["peak_rss_growth_mib"] = {
            form: {n: peak_memory(model, pool[:n], form, args) for n in args.memory_calib}
            for form in gpfq.METHODS
        }
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--calib", type=int, default=1024, help="calibration images")
    ap.add_argument("--batch-size", type=int, default=256, help="calibration batch")
    ap.add_argument("--per-channel", action="store_true")
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--repeats", type=int, default=3, help="timings are the best of this many")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--memory-calib",
        type=int,
        nargs="+",
        default=[1024, 4096],
        help="calibration sizes for the peak-memory runs (capped at the training split)",
    )
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    ap.add_argument("--no-brevitas", dest="brevitas", action="store_false")
    ap.add_argument("--no-memory", dest="memory", action="store_false")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, help="write the results here as JSON")
    # Internal: peak-memory child process.
    ap.add_argument("--child-form", choices=gpfq.METHODS, help=argparse.SUPPRESS)
    ap.add_argument("--model-path", help=argparse.SUPPRESS)
    ap.add_argument("--calib-path", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_form:
        child_peak_memory(args)
        return
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, pool, test = load_data(args.seed)
    calib = pool[: args.calib]
    args.memory_calib = sorted({min(n, len(pool)) for n in args.memory_calib})
    result = {
        "settings": {
            "bits": args.bits,
            "calib": len(calib),
            "batch_size": args.batch_size,
            "per_channel": args.per_channel,
            "grid": "max-abs, 2^b-1 levels",
            "repeats": args.repeats,
            "threads": args.threads,
            "data": data.source("mnist"),
            "train_size": len(train[0]),
            "test_size": len(test[0]),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "brevitas": brevitas_version() or "not installed",
            "cpu": platform.processor() or platform.machine(),
        },
        "rows": [bench_model(kind, train, calib, pool, test, args) for kind in args.models],
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
