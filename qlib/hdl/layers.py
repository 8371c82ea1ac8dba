"""Layers of a network through the converter: memory words per layer, and one layer's weights
quantised and packed by the simulated RTL (downstream), then unpacked and dequantised
(upstream), checked against the model and, optionally, against codes from elsewhere.

Weights are dealt to the lanes round robin (``model.lane_split``) after zero padding to a
multiple of the lane count; each lane packs its share densely.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from . import model, sim

__all__ = [
    "LayerWords",
    "layer_words",
    "FrontMember",
    "front_member",
    "fakequant_inverse_scale",
    "LayerRun",
    "convert_layer",
]


@dataclass(frozen=True)
class LayerWords:
    """Memory words of one layer's weights: packed at ``bits`` against one 16-bit word each."""

    layer: str
    kind: str
    weights: int
    bits: int
    packed_words: int
    words_16bit: int


def layer_words(net: nn.Module, weight_bits: list[int]) -> list[LayerWords]:
    """One row per Conv2d/Linear layer of ``net`` (forward order), ``weight_bits[i]`` bits."""
    layers = [(n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    if len(weight_bits) != len(layers):
        raise ValueError(
            f"weight_bits has {len(weight_bits)} entries, the network has "
            f"{len(layers)} Conv2d/Linear layers"
        )
    return [
        LayerWords(
            name,
            type(m).__name__,
            m.weight.numel(),
            int(b),
            model.words_needed(m.weight.numel(), int(b)),
            m.weight.numel(),
        )
        for (name, m), b in zip(layers, weight_bits, strict=True)
    ]


@dataclass(frozen=True)
class FrontMember:
    """The cheapest feasible member of an exploration's Pareto front."""

    path: Path
    genome: tuple[int, ...]
    accuracy: float
    objectives: tuple[float, ...]
    evaluated: int

    @property
    def weight_bits(self) -> list[int]:
        return list(self.genome[1::2])  # genome: [in_0, w_0, in_1, w_1, ...]


def front_member(workload_name: str, folder: str | os.PathLike | None = None) -> FrontMember | None:
    """The newest results file of ``workload_name`` in ``folder`` (default: the exploration's
    results folder) and its cheapest feasible front member (lowest cost objective); None when
    no such file or no feasible point exists."""
    from qlib.explore import run
    from qlib.explore.store import Store, StoreMismatch, default_dir

    folder = Path(folder) if folder is not None else default_dir()
    files = sorted(folder.glob(f"{workload_name}-*.sqlite"), key=lambda p: p.stat().st_mtime)
    # the search itself first (<name>-<digest>-<settings>), then tagged variants (random search)
    files.sort(key=lambda p: len(p.stem[len(workload_name) + 1 :].split("-")) == 2)
    for path in reversed(files):
        # results_file names a file <workload>-<digest>-<search settings>[tag].sqlite
        digest = path.stem[len(workload_name) + 1 :].split("-")[0]
        try:
            with Store(path, digest, workload_name) as store:
                front = run.pareto_front(store)
                n = len(store)
        except StoreMismatch:
            continue
        if front:
            best = min(front, key=lambda r: r.objectives[-1])
            return FrontMember(path, tuple(best.genome), best.accuracy, tuple(best.objectives), n)
    return None


def fakequant_inverse_scale(w: Tensor, n: int) -> int:
    """float32 bits of ``qlib.explore.fakequant``'s per-tensor scale ``(2^(n-1)-1) / max|w|``
    (the converter's INV_SCALE register), computed in float32 as it does."""
    amax = w.detach().abs().amax().float()
    return int(model.f32_bits((torch.tensor(2.0 ** (n - 1) - 1.0) / amax).numpy()))


@dataclass(frozen=True)
class LayerRun:
    """One layer through the RTL: codes and dequantised weights, words, cycles and checks."""

    n: int
    weights: int
    codes: np.ndarray  # [V] integers from the RTL's packed words
    dequantised: np.ndarray  # [V] float32 (bfloat16 values from the RTL)
    packed_words: int  # all lanes
    dn_cycles: int
    up_cycles: int
    wall_s: float
    errors: list[str]


def convert_layer(vvp: str | os.PathLike, lanes: int, w: Tensor, n: int) -> LayerRun:
    """Quantise the weights ``w`` (any shape, cast to bfloat16) to ``n`` bits with the scale
    that fakequant uses, on the simulated converter, then dequantise them back."""
    x = model.bf16_bits(w.detach().float().numpy().ravel())
    V = len(x)
    pad = -V % lanes
    xs = np.concatenate([x, np.zeros(pad, np.uint16)]).reshape(-1, lanes)  # round robin
    inv_bits = fakequant_inverse_scale(torch.from_numpy(model.bits_bf16(x)), n)
    inv = np.array([inv_bits], np.uint32).view(np.float32)[0]
    scale_bits = int(model.bf16_bits(np.float32(1.0) / inv))
    down = sim.run_stream(
        vvp,
        lanes,
        n=n,
        up_words=np.zeros((1, lanes)),
        count=0,
        dn_values=xs,
        inv_scale_bits=inv_bits,
    )
    words = down.dn_words
    count = xs.shape[0]
    up = sim.run_stream(vvp, lanes, n=n, up_words=words, count=count, scale_bits=scale_bits)
    errors = sim.check_against_model(
        down,
        n=n,
        up_words=np.zeros((1, lanes)),
        count=0,
        scale_bits=scale_bits,
        dn_values=xs,
        inv_scale_bits=inv_bits,
    )
    errors += sim.check_against_model(up, n=n, up_words=words, count=count, scale_bits=scale_bits)
    codes = np.stack([model.unpack(words[:, i], n, count) for i in range(lanes)], axis=1)
    return LayerRun(
        n=n,
        weights=V,
        codes=codes.ravel()[:V],
        dequantised=model.bits_bf16(up.up_values).ravel()[:V],
        packed_words=int(words.size),
        dn_cycles=down.dn_counters.get("CYCLES", 0),
        up_cycles=up.up_counters.get("CYCLES", 0),
        wall_s=down.wall_s + up.wall_s,
        errors=errors,
    )
