"""Compile the converter with Icarus Verilog and run streams through it from Python.

``run_stream`` drives ``hdl/tb/tb_stream.v`` (an upstream job, then a downstream job on
``nc_top``) from hex files and reads back every output beat, the status register and the
performance counters. It is what the notebook and ``benchmarks/bench_hdl.py`` use; the cocotb
tests in ``tests/`` drive the same top level through cocotbext-axi instead.

Shapes: ``L`` lanes, ``W`` packed words per lane, ``V`` values per lane; multi-lane arrays are
``[W, L]`` or ``[V, L]`` (row = one AXI-Stream beat, column = one lane).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import model

__all__ = [
    "HDL_DIR",
    "ToolMissing",
    "require",
    "sources",
    "compile_verilog",
    "build_stream_tb",
    "StreamRun",
    "run_stream",
    "check_against_model",
]

HDL_DIR = Path(__file__).resolve().parents[2] / "hdl"
_DEBIAN = {
    "iverilog": "iverilog",
    "vvp": "iverilog",
    "yosys": "yosys",
    "nextpnr-ice40": "nextpnr-ice40",
}
COUNTERS = ("WORDS_IN", "VALUES_OUT", "CYCLES", "STALLS")
DN_COUNTERS = ("VALUES_IN", "WORDS_OUT", "CYCLES", "STALLS")


class ToolMissing(RuntimeError):
    """An external program the hardware chapter needs is not installed."""


def require(tool: str) -> str:
    """Path of ``tool`` on PATH, or ``ToolMissing`` naming the Debian package to install."""
    path = shutil.which(tool)
    if path is None:
        pkg = _DEBIAN.get(tool, tool)
        raise ToolMissing(
            f"{tool} not found on PATH: install the Debian package {pkg} "
            f"(`sudo apt-get install {pkg}`; `make setup` runs tools/sysdeps.sh, which does)"
        )
    return path


def sources(hdl_dir: Path | None = None) -> list[Path]:
    """The synthesisable Verilog files of ``hdl/src``, sorted."""
    src = Path(hdl_dir or HDL_DIR) / "src"
    files = sorted(src.glob("*.v"))
    if not files:
        raise FileNotFoundError(f"no Verilog sources in {src}")
    return files


def compile_verilog(
    top: str,
    out: str | os.PathLike,
    files: list[Path],
    *,
    params: dict[str, int] | None = None,
    include: list[Path] | None = None,
) -> Path:
    """``iverilog -g2005`` ``files`` with top module ``top`` into the vvp file ``out``."""
    cmd = [require("iverilog"), "-g2005", "-s", top, "-o", str(out)]
    for k, v in (params or {}).items():
        cmd += ["-P", f"{top}.{k}={int(v)}"]
    for d in include or []:
        cmd += ["-I", str(d)]
    cmd += [str(f) for f in files]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"iverilog failed for {top} ({res.returncode}):\n{res.stderr.strip()}")
    return Path(out)


def build_stream_tb(lanes: int, build_dir: str | os.PathLike) -> Path:
    """Compile ``tb_stream`` with ``lanes`` lanes into ``build_dir`` (one directory per lanes)."""
    if not 1 <= lanes <= 64:
        raise ValueError(f"lanes must be in 1..64, got {lanes}")
    build = Path(build_dir)
    build.mkdir(parents=True, exist_ok=True)
    tb = HDL_DIR / "tb"
    return compile_verilog(
        "tb_stream",
        build / f"tb_stream_l{lanes}.vvp",
        [*sources(), tb / "tb_stream.v"],
        params={"LANES": lanes},
        include=[tb],
    )


@dataclass(frozen=True)
class StreamRun:
    """Outputs of one ``run_stream``: beats, status and counters of both jobs."""

    lanes: int
    up_values: np.ndarray  # [V, L] bfloat16 patterns (uint16)
    up_last: np.ndarray  # [V] tlast of each beat
    up_status: int
    up_counters: dict[str, int]
    dn_words: np.ndarray  # [W, L] packed words (uint16)
    dn_last: np.ndarray  # [W]
    dn_status: int
    dn_counters: dict[str, int]
    wall_s: float
    timed_out: bool = False
    vcd: Path | None = field(default=None)


def _write_beats(path: Path, beats: np.ndarray) -> None:
    lanes = beats.shape[1]
    with open(path, "w") as f:
        for row in beats:
            f.write("".join(f"{int(row[i]) & 0xFFFF:04x}" for i in reversed(range(lanes))) + "\n")


def _split_beat(hexstr: str, lanes: int) -> list[int]:
    v = int(hexstr, 16)
    return [(v >> (16 * i)) & 0xFFFF for i in range(lanes)]


def _as_beats(a, lanes: int, name: str) -> np.ndarray:
    arr = np.asarray(a if a is not None else np.zeros((0, lanes)), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != lanes:
        raise ValueError(f"{name}: expected shape [beats, {lanes}], got {arr.shape}")
    return arr


def run_stream(
    vvp: str | os.PathLike,
    lanes: int,
    *,
    n: int,
    up_words=None,
    count: int = 0,
    scale_bits: int = 0x3F80,
    dn_values=None,
    inv_scale_bits: int = 0x3F800000,
    narrow: bool = False,
    ready_pct: int = 100,
    valid_pct: int = 100,
    seed: int = 1,
    vcd: str | os.PathLike | None = None,
    timeout_cycles: int = 10_000_000,
) -> StreamRun:
    """Run one upstream job (``count`` values per lane from ``up_words`` [W, L]) and, when
    ``dn_values`` [V, L] is given, one downstream job, on the compiled ``tb_stream``.

    ``n`` is written to the BITS register as given (out-of-range widths are the hardware's to
    flag). ``ready_pct`` is the percentage of cycles the output sinks accept a beat,
    ``valid_pct`` the percentage of cycles the input sources offer a new one.
    """
    up = _as_beats(up_words, lanes, "up_words")
    dn = _as_beats(dn_values, lanes, "dn_values")
    for name, pct in (("ready_pct", ready_pct), ("valid_pct", valid_pct)):
        if not 0 < pct <= 100:
            raise ValueError(f"{name} must be in 1..100, got {pct}")
    require("vvp")
    with tempfile.TemporaryDirectory(prefix="qlib-hdl-") as tmp:
        tmp = Path(tmp)
        _write_beats(tmp / "up.hex", up)
        _write_beats(tmp / "dn.hex", dn)
        args = [
            f"+n={n}",
            f"+scale={scale_bits & 0xFFFF:x}",
            f"+inv={inv_scale_bits & 0xFFFFFFFF:x}",
            f"+narrow={int(narrow)}",
            f"+count={count}",
            f"+up_beats={len(up)}",
            f"+up_file={tmp / 'up.hex'}",
            f"+dn_beats={len(dn)}",
            f"+dn_file={tmp / 'dn.hex'}",
            f"+out={tmp / 'out.txt'}",
            f"+ready_pct={ready_pct}",
            f"+valid_pct={valid_pct}",
            f"+seed={seed}",
            f"+timeout={timeout_cycles}",
        ]
        if vcd is not None:
            args.append(f"+vcd={Path(vcd).resolve()}")
        t0 = time.perf_counter()
        res = subprocess.run(
            [require("vvp"), "-n", str(vvp), *args], capture_output=True, text=True
        )
        wall = time.perf_counter() - t0
        if res.returncode != 0 or not (tmp / "out.txt").exists():
            raise RuntimeError(f"vvp {vvp} failed ({res.returncode}):\n{res.stdout}\n{res.stderr}")
        lines = (tmp / "out.txt").read_text().splitlines()
    if not lines or lines[-1] != "E":
        raise RuntimeError(f"tb_stream stopped early; output ends with {lines[-3:]}")
    upv, upl, dnw, dnl = [], [], [], []
    status = {"UP": 0, "DN": 0}
    counters: dict[str, dict[str, int]] = {"UP": {}, "DN": {}}
    timed_out = False
    for line in lines:
        tag, *rest = line.split()
        if tag == "U":
            upv.append(_split_beat(rest[0], lanes))
            upl.append(int(rest[1]))
        elif tag == "D":
            dnw.append(_split_beat(rest[0], lanes))
            dnl.append(int(rest[1]))
        elif tag == "S":
            status[rest[0]] = int(rest[1])
        elif tag == "C":
            names = COUNTERS if rest[0] == "UP" else DN_COUNTERS
            counters[rest[0]][names[int(rest[1])]] = int(rest[2])
        elif tag == "T":
            timed_out = True
        elif tag == "L" and int(rest[0]) != lanes:
            raise RuntimeError(f"{vvp} was built with {rest[0]} lanes, not {lanes}")
    return StreamRun(
        lanes=lanes,
        up_values=np.array(upv, dtype=np.uint16).reshape(-1, lanes),
        up_last=np.array(upl, dtype=bool),
        up_status=status["UP"],
        up_counters=counters["UP"],
        dn_words=np.array(dnw, dtype=np.uint16).reshape(-1, lanes),
        dn_last=np.array(dnl, dtype=bool),
        dn_status=status["DN"],
        dn_counters=counters["DN"],
        wall_s=wall,
        timed_out=timed_out,
        vcd=Path(vcd) if vcd is not None else None,
    )


def check_against_model(
    run: StreamRun,
    *,
    n: int,
    up_words,
    count: int,
    scale_bits: int,
    dn_values=None,
    inv_scale_bits: int = 0x3F800000,
    narrow: bool = False,
) -> list[str]:
    """Compare a ``StreamRun`` with ``qlib.hdl.model`` lane by lane; returns the mismatches
    (empty when every value, word, tlast and status bit agrees)."""
    errs: list[str] = []
    up = np.asarray(up_words)
    want_status = 0
    for lane in range(run.lanes):
        ref = model.upstream(up[:, lane] if up.size else up, n, scale_bits, count)
        want_status |= ref.status
        got = run.up_values[:, lane] if run.up_values.size else np.zeros(0, np.uint16)
        if not np.array_equal(got, ref.values):
            bad = np.flatnonzero(got[: len(ref.values)] != ref.values[: len(got)])
            errs.append(
                f"upstream lane {lane}: {len(got)} values vs {len(ref.values)} expected; "
                f"first mismatches at {bad[:5].tolist()}"
            )
    if count and (len(run.up_last) == 0 or not run.up_last[-1] or run.up_last[:-1].any()):
        errs.append("upstream: tlast is not on the last beat only")
    if run.up_status & 0x0F03 != want_status & 0x0F03:
        errs.append(
            f"upstream status {model.status_names(run.up_status)} vs "
            f"{model.status_names(want_status)}"
        )
    if dn_values is not None:
        dv = np.asarray(dn_values)
        want_status = 0
        for lane in range(run.lanes):
            ref = model.downstream(dv[:, lane], n, inv_scale_bits, narrow)
            want_status |= ref.status
            got = run.dn_words[:, lane] if run.dn_words.size else np.zeros(0, np.uint16)
            if not np.array_equal(got, ref.words):
                errs.append(
                    f"downstream lane {lane}: words {got[:6].tolist()}... vs "
                    f"{ref.words[:6].tolist()}..."
                )
        if len(run.dn_last) and (not run.dn_last[-1] or run.dn_last[:-1].any()):
            errs.append("downstream: tlast is not on the last word only")
        if run.dn_status & 0x1F000C != want_status & 0x1F000C:
            errs.append(
                f"downstream status {model.status_names(run.dn_status)} vs "
                f"{model.status_names(want_status)}"
            )
    return errs
