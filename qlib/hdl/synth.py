"""Synthesise the converter with yosys for a generic FPGA target and count its cells.

``synthesize`` runs ``synth_xilinx`` (7-series cells: LUT1..LUT6, flip-flops FD*, DSP48E1,
CARRY4) or ``synth_ice40`` (SB_LUT4, SB_DFF*, SB_MAC16 with ``-dsp``, SB_CARRY) and reads
``stat -json``. These are technology-mapped cell counts before placement: no vendor timing
closure, no routing, and yosys's LUT packing differs from a vendor tool's.

``place_and_route_ice40`` gives the one timing figure an open Debian flow offers: nextpnr-ice40
places and routes one lane (``hdl/fpga/nc_lane_fmax.v``: inputs from an on-chip LFSR, outputs
folded into one pin, so it fits the I/O of an iCE40 UP5K) and reports its maximum frequency.
"""

from __future__ import annotations

import json
import re
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from .sim import HDL_DIR, require, sources

__all__ = ["TARGETS", "check", "SynthResult", "synthesize", "PnrResult", "place_and_route_ice40"]

TARGETS = {
    "xilinx": "synth_xilinx -family xc7 -flatten -top {top}",
    "ice40": "synth_ice40 -dsp -top {top}",
}


def check(
    top: str = "nc_top",
    *,
    params: dict[str, int] | None = None,
    hdl_dir: Path | None = None,
    timeout_s: float = 300,
) -> None:
    """Elaborate ``top`` in yosys as plain Verilog (no ``-sv``) and fail, with yosys's message,
    on what synthesis would not accept: inferred latches, multiple drivers, combinational loops
    (``check -assert``). ``hdl_dir``: another folder with a ``src/`` of Verilog files."""
    yosys = require("yosys")
    files = " ".join(str(f) for f in sources(hdl_dir))
    chparam = "".join(f" -set {k} {int(v)}" for k, v in (params or {}).items())
    script = (
        f"read_verilog -defer {files}; "
        + (f"chparam{chparam} {top}; " if params else "")
        + f"hierarchy -check -top {top}; proc; flatten; opt_clean; "
        "select -assert-none t:$dlatch t:$adlatch t:$dlatchsr; check -assert"
    )
    res = subprocess.run(
        [yosys, "-q", "-p", script], capture_output=True, text=True, timeout=timeout_s
    )
    if res.returncode != 0:
        raise RuntimeError(f"yosys check of {top} failed:\n{(res.stdout + res.stderr)[-3000:]}")


@dataclass(frozen=True)
class SynthResult:
    """Cell counts of one synthesised module."""

    top: str
    target: str
    params: dict
    cells: dict[str, int]
    wall_s: float

    def _sum(self, prefixes: tuple[str, ...]) -> int:
        return sum(v for k, v in self.cells.items() if k.startswith(prefixes))

    @property
    def luts(self) -> int:
        return self._sum(("LUT", "SB_LUT"))

    @property
    def ffs(self) -> int:
        return self._sum(("FD", "SB_DFF"))

    @property
    def dsps(self) -> int:
        return self._sum(("DSP48", "SB_MAC16"))

    @property
    def carries(self) -> int:
        return self._sum(("CARRY", "SB_CARRY"))


def synthesize(
    top: str = "nc_lane",
    *,
    target: str = "xilinx",
    params: dict[str, int] | None = None,
    timeout_s: float = 600,
) -> SynthResult:
    """Synthesise module ``top`` of ``hdl/src`` (with ``params`` overrides) for ``target``."""
    if target not in TARGETS:
        raise ValueError(f"target {target!r}; expected one of {sorted(TARGETS)}")
    yosys = require("yosys")
    params = dict(params or {})
    files = " ".join(str(f) for f in sources())
    chparam = "".join(f" -set {k} {int(v)}" for k, v in params.items())
    with tempfile.TemporaryDirectory(prefix="qlib-yosys-") as tmp:
        stat = Path(tmp) / "stat.json"
        script = (
            f"read_verilog -defer {files}; "
            + (f"chparam{chparam} {top}; " if params else "")
            + f"hierarchy -top {top}; "
            + TARGETS[target].format(top=top)
            + f"; tee -q -o {stat} stat -json"
        )
        t0 = time.perf_counter()
        res = subprocess.run(
            [yosys, "-q", "-p", script], capture_output=True, text=True, timeout=timeout_s
        )
        wall = time.perf_counter() - t0
        if res.returncode != 0 or not stat.exists():
            raise RuntimeError(f"yosys failed on {top} ({res.returncode}):\n{res.stderr[-2000:]}")
        data = json.loads(stat.read_text())
    mods = data["modules"]
    design = data.get("design") or mods.get(top) or next(iter(mods.values()))
    cells = {k: int(v) for k, v in design.get("num_cells_by_type", {}).items()}
    return SynthResult(top, target, params, cells, wall)


@dataclass(frozen=True)
class PnrResult:
    """nextpnr-ice40 on one lane: maximum frequency after routing, device use."""

    device: str
    fmax_mhz: float
    utilisation: dict[str, str]
    wall_s: float


def place_and_route_ice40(
    *, device: str = "up5k", package: str = "sg48", seed: int = 1, timeout_s: float = 900
) -> PnrResult:
    """Synthesise ``hdl/fpga/nc_lane_fmax.v`` (one lane) with ``synth_ice40 -dsp`` and place and
    route it with nextpnr-ice40; the maximum frequency is nextpnr's estimate after routing."""
    yosys, pnr = require("yosys"), require("nextpnr-ice40")
    harness = HDL_DIR / "fpga" / "nc_lane_fmax.v"
    files = " ".join(str(f) for f in [*sources(), harness])
    with tempfile.TemporaryDirectory(prefix="qlib-pnr-") as tmp:
        net = Path(tmp) / "lane.json"
        t0 = time.perf_counter()
        res = subprocess.run(
            [
                yosys,
                "-q",
                "-p",
                f"read_verilog {files}; synth_ice40 -dsp -top nc_lane_fmax -json {net}",
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        if res.returncode != 0:
            raise RuntimeError(f"yosys failed on nc_lane_fmax:\n{res.stderr[-2000:]}")
        res = subprocess.run(
            [
                pnr,
                f"--{device}",
                "--package",
                package,
                "--json",
                str(net),
                "--pcf-allow-unconstrained",
                "--freq",
                "12",
                "--seed",
                str(seed),
            ],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
        wall = time.perf_counter() - t0
    log = res.stderr
    fmax = re.findall(r"Max frequency for clock '[^']*clk[^']*': ([0-9.]+) MHz", log)
    if not fmax:
        raise RuntimeError(f"nextpnr-ice40 gave no frequency ({res.returncode}):\n{log[-2000:]}")
    util = dict(re.findall(r"Info:\s+(ICESTORM_\w+|SB_\w+):\s+(\d+/\s*\d+)", log))
    return PnrResult(f"iCE40 {device.upper()} ({package})", float(fmax[-1]), util, wall)
