"""Throughput of the simulated converter, read from its performance counters.

Used by the hardware chapter and ``benchmarks/bench_hdl.py``. Every run is also checked value
by value against ``qlib.hdl.model``; a mismatch raises.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from . import model, sim

__all__ = ["Rate", "random_job", "rate", "sim_speed"]


@dataclass(frozen=True)
class Rate:
    """One bit width: values per lane per cycle in both directions, from the counters.

    ``*_rate``: values / busy cycles of the longer run (pipeline fill included);
    ``*_steady``: extra values / extra cycles between the two runs (fill cancels out).
    """

    n: int
    lanes: int
    ready_pct: int
    values: int  # per lane, longer run
    up_rate: float
    up_steady: float
    up_stall_frac: float
    dn_rate: float
    dn_steady: float
    dn_stall_frac: float
    sim_values_per_s: float  # values of all lanes, both directions, per second of wall time

    def as_dict(self) -> dict:
        return asdict(self)


def random_job(n: int, count: int, lanes: int, rng: np.random.Generator):
    """Random n-bit values ``[count, lanes]`` (the extremes first) and their packed words."""
    v = rng.integers(-(1 << (n - 1)), 1 << (n - 1), (count, lanes))
    v[: min(2, count)] = np.array([[-(1 << (n - 1))], [(1 << (n - 1)) - 1]])[: min(2, count)]
    words = np.stack([model.pack(v[:, i], n) for i in range(lanes)], axis=1)
    return v, words


def _one(vvp, lanes, n, count, ready_pct, rng, seed):
    _, words = random_job(n, count, lanes, rng)
    scale = float(rng.uniform(0.01, 1.0))
    scale_bits = int(model.bf16_bits(scale))
    inv_bits = int(model.f32_bits(1.0 / model.bits_bf16(scale_bits)))
    first = sim.run_stream(
        vvp,
        lanes,
        n=n,
        up_words=words,
        count=count,
        scale_bits=scale_bits,
        ready_pct=ready_pct,
        seed=seed,
    )
    # downstream: the accelerator sends the dequantised values back
    back = first.up_values
    run = sim.run_stream(
        vvp,
        lanes,
        n=n,
        up_words=words,
        count=count,
        scale_bits=scale_bits,
        dn_values=back,
        inv_scale_bits=inv_bits,
        ready_pct=ready_pct,
        seed=seed,
    )
    errs = sim.check_against_model(
        run,
        n=n,
        up_words=words,
        count=count,
        scale_bits=scale_bits,
        dn_values=back,
        inv_scale_bits=inv_bits,
    )
    if errs or run.timed_out:
        raise AssertionError(f"n={n} lanes={lanes} ready={ready_pct}%: {errs or 'timed out'}")
    return run


def rate(
    vvp: str | os.PathLike,
    lanes: int,
    n: int,
    *,
    counts=(256, 1024),
    ready_pct: int = 100,
    seed: int = 0,
) -> Rate:
    """Measure one bit width with ``counts`` values per lane (two runs, short and long)."""
    rng = np.random.default_rng([seed, n, ready_pct])
    short, long_ = (_one(vvp, lanes, n, c, ready_pct, rng, seed + i) for i, c in enumerate(counts))
    u0, u1 = short.up_counters, long_.up_counters
    d0, d1 = short.dn_counters, long_.dn_counters
    return Rate(
        n=n,
        lanes=lanes,
        ready_pct=ready_pct,
        values=counts[1],
        up_rate=u1["VALUES_OUT"] / u1["CYCLES"],
        up_steady=(u1["VALUES_OUT"] - u0["VALUES_OUT"]) / (u1["CYCLES"] - u0["CYCLES"]),
        up_stall_frac=u1["STALLS"] / u1["CYCLES"],
        dn_rate=d1["VALUES_IN"] / d1["CYCLES"],
        dn_steady=(d1["VALUES_IN"] - d0["VALUES_IN"]) / (d1["CYCLES"] - d0["CYCLES"]),
        dn_stall_frac=d1["STALLS"] / d1["CYCLES"],
        sim_values_per_s=2 * lanes * counts[1] / long_.wall_s,
    )


def sim_speed(
    vvp: str | os.PathLike,
    lanes: int,
    *,
    n: int = 8,
    values: int = 8192,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Icarus speed on one long job each way: values of all lanes (both directions) per second
    of wall time, best of ``repeats`` runs (other load on the machine only slows a run down)."""
    rng = np.random.default_rng(seed)
    _, words = random_job(n, values, lanes, rng)
    x = model.bf16_bits(rng.normal(0, 4, (values, lanes)))
    walls = []
    for r in range(repeats):
        run = sim.run_stream(vvp, lanes, n=n, up_words=words, count=values, dn_values=x, seed=r)
        if run.up_counters.get("VALUES_OUT") != values:
            raise AssertionError(f"sim_speed: {run.up_counters} for {values} values")
        walls.append(run.wall_s)
    return {
        "lanes": lanes,
        "n": n,
        "values_per_lane": values,
        "wall_s": walls,
        "values_per_s": 2 * lanes * values / min(walls),
        "cycles": run.up_counters["CYCLES"] + run.dn_counters["CYCLES"],
        "cycles_per_s": (run.up_counters["CYCLES"] + run.dn_counters["CYCLES"]) / min(walls),
    }
