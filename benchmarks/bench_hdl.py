"""Number-converter hardware: throughput per bit width, back-pressure, simulation speed, cells.

    python benchmarks/bench_hdl.py [--lanes 16] [--values 1024] [--synth] [--out bench_hdl.json]

1. For every n in 2..16, values per lane per cycle from the converter's counters, upstream and
   downstream, with the sinks' ready held high (target 1.0) and under 50 % random
   back-pressure; "steady" is the extra values over the extra cycles of a short and a long run,
   so the pipeline fill cancels out. Every run is checked value by value against the model.
2. Simulation speed: values (all lanes, both directions) per second of wall time in Icarus
   (``vvp``, including its start-up and the AXI-Lite configuration), best of three runs of one
   long job each way (8192 values per lane at n = 8).
3. With ``--synth``: yosys cells (LUT, FF, DSP, carry) of one lane and of the LANES-lane top
   for synth_xilinx (minutes for 16 lanes).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from qlib.hdl import measure, sim, synth


def main() -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lanes", type=int, default=16)
    ap.add_argument("--values", type=int, default=1024, help="values per lane, long run")
    ap.add_argument("--bits", type=int, nargs="+", default=list(range(2, 17)))
    ap.add_argument("--ready-pct", type=int, default=50, help="back-pressure run: ready %%")
    ap.add_argument("--synth", action="store_true", help="also synthesise with yosys")
    ap.add_argument("--out", help="write the results here as JSON")
    a = ap.parse_args()
    counts = (a.values // 4, a.values)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-hdl-") as tmp:
        vvp = sim.build_stream_tb(a.lanes, tmp)
        per_n = []
        for n in a.bits:
            full = measure.rate(vvp, a.lanes, n, counts=counts, ready_pct=100)
            bp = measure.rate(vvp, a.lanes, n, counts=counts, ready_pct=a.ready_pct)
            per_n.append({"full": full.as_dict(), "back_pressure": bp.as_dict()})
            print(
                f"n={n:2d}  ready 100%: up {full.up_steady:.3f} dn {full.dn_steady:.3f} "
                f"values/lane/cycle  |  ready {a.ready_pct}%: up {bp.up_steady:.3f} "
                f"dn {bp.dn_steady:.3f}  |  sim {full.sim_values_per_s:,.0f} values/s"
            )
        speed = measure.sim_speed(vvp, a.lanes)
        print(
            f"simulation: {speed['values_per_s']:,.0f} values/s, "
            f"{speed['cycles_per_s']:,.0f} cycles/s ({a.lanes} lanes, best of 3)"
        )
    speeds = [r["full"]["sim_values_per_s"] for r in per_n]
    results = {
        "lanes": a.lanes,
        "values_per_lane": a.values,
        "ready_pct_back_pressure": a.ready_pct,
        "per_n": per_n,
        "min_up_steady": min(r["full"]["up_steady"] for r in per_n),
        "min_dn_steady": min(r["full"]["dn_steady"] for r in per_n),
        "sim_values_per_s_median": sorted(speeds)[len(speeds) // 2],
        "sim_speed": speed,
        "wall_s": None,
    }
    if a.synth:
        cells = {}
        for top, params in (("nc_lane", {}), ("nc_top", {"LANES": a.lanes})):
            r = synth.synthesize(top, target="xilinx", params=params)
            cells[top] = {
                "luts": r.luts,
                "ffs": r.ffs,
                "dsps": r.dsps,
                "carries": r.carries,
                "cells": r.cells,
                "wall_s": r.wall_s,
                "params": params,
            }
            print(f"{top} {params}: {r.luts} LUT, {r.ffs} FF, {r.dsps} DSP48E1 ({r.wall_s:.0f} s)")
        results["synthesis_xilinx"] = cells
    results["wall_s"] = time.perf_counter() - t0
    print(
        f"min steady rate: up {results['min_up_steady']:.3f}, dn {results['min_dn_steady']:.3f} "
        f"values/lane/cycle; total {results['wall_s']:.0f} s"
    )
    if a.out:
        Path(a.out).write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
