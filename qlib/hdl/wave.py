"""Waveform excerpts from a VCD file (parsed with ``vcdvcd``), drawn with matplotlib."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Waves", "first_time", "read_vcd", "plot_waves"]


@dataclass(frozen=True)
class Waves:
    """Signal values sampled at rising clock edges.

    ``values[name]`` is ``[T]`` int64 (object for buses of 63 bits or more; unknown bits read
    as 0), ``times`` ``[T]`` the edge times
    in the VCD's time unit; ``widths[name]`` the signal width in bits.
    """

    times: np.ndarray
    values: dict[str, np.ndarray]
    widths: dict[str, int]


def _to_int(v: str) -> int:
    v = v.lower().replace("x", "0").replace("z", "0")
    return int(v, 2) if v else 0


def first_time(path: str | os.PathLike, signal: str, value: int = 1) -> int:
    """The first time ``signal`` takes ``value`` in the VCD file (``KeyError`` if never)."""
    from vcdvcd import VCDVCD

    vcd = VCDVCD(str(path), signals=[signal], store_tvs=True)
    if signal not in vcd.references_to_ids:
        raise KeyError(f"{path}: no signal {signal}")
    for t, v in vcd[signal].tv:
        if _to_int(v) == value:
            return int(t)
    raise KeyError(f"{path}: {signal} never equals {value}")


def read_vcd(
    path: str | os.PathLike, signals: list[str], *, clock: str, start: int = 0, cycles: int = 40
) -> Waves:
    """Sample ``signals`` (full hierarchical names, e.g. ``tb_stream.dut.s_up_axis_tvalid``) at
    ``cycles`` rising edges of ``clock`` from time ``start`` on, just before each edge."""
    from vcdvcd import VCDVCD

    vcd = VCDVCD(str(path), signals=[clock, *signals], store_tvs=True)
    missing = [s for s in [clock, *signals] if s not in vcd.references_to_ids]
    if missing:
        known = sorted(vcd.references_to_ids)[:20]
        raise KeyError(f"{path}: no signal(s) {missing}; some of those present: {known}")
    clk = vcd[clock].tv
    edges = [
        t
        for (t, v), (_, prev) in zip(clk[1:], clk[:-1], strict=True)
        if v == "1" and prev == "0" and t >= start
    ][:cycles]
    times = np.array(edges, dtype=np.int64)
    values, widths = {}, {}
    for s in signals:
        sig = vcd[s]
        # the value that a flip-flop samples at the edge: the one just before it
        widths[s] = int(sig.size)
        dtype = np.int64 if widths[s] < 63 else object  # wide buses stay Python integers
        values[s] = np.array([_to_int(sig[t - 1]) for t in edges], dtype=dtype)
    return Waves(times, values, widths)


def plot_waves(w: Waves, *, labels: dict[str, str] | None = None, ax=None, max_bits: int = 16):
    """Draw a timing diagram: 1-bit signals as square waves, buses as hex-labelled segments
    (only their low ``max_bits`` bits: lane 0 of a multi-lane bus)."""
    import matplotlib.pyplot as plt

    names = list(w.values)
    if ax is None:
        _, ax = plt.subplots(figsize=(12, 0.55 * len(names) + 0.6))
    t = np.arange(len(w.times))
    for row, name in enumerate(names):
        y0 = len(names) - 1 - row
        v = w.values[name]
        if w.widths[name] == 1:
            ax.step(
                np.append(t, t[-1] + 1),
                np.append(v, v[-1]) * 0.7 + y0,
                where="post",
                color="C0",
                lw=1.2,
            )
        else:
            ax.plot([t[0], t[-1] + 1], [y0 + 0.35] * 2, color="C1", lw=0.6)
            bits = min(w.widths[name], max_bits)
            digits = -(-bits // 4)
            shown = v & ((1 << bits) - 1)
            for i in range(len(v)):
                if i == 0 or shown[i] != shown[i - 1]:
                    ax.plot([i, i], [y0, y0 + 0.7], color="C1", lw=0.8)
                    ax.text(
                        i + 0.1,
                        y0 + 0.35,
                        f"{shown[i]:0{digits}x}",
                        fontsize=6,
                        va="center",
                        family="monospace",
                    )
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(
        [(labels or {}).get(n, n.split(".")[-1]) for n in reversed(names)], fontsize=8
    )
    ax.set_xlabel("clock cycle")
    ax.set_xlim(0, len(t))
    ax.set_ylim(-0.3, len(names))
    return ax
