"""DRAM traffic and energy of one inference at per-layer operand precisions.

Two models, both per quantised layer (Conv2d, and Linear as a 1x1 convolution):

* ``zigzag``: ZigZag (``zigzag-dse``) maps the layer onto an accelerator (Eyeriss-like by
  default) at the actual input, weight and output precisions and reports the DRAM word
  accesses and energy. About 5-10 s per layer and precision triple, so results are cached on
  disk under ``$QLIB_CACHE/zigzag``.
* ``linear``: the SOCC'23 paper's model. The layer is mapped once at 16 bits; DRAM traffic of
  each operand scales linearly with its bit width (n-bit values packed densely in memory).

Output precision of layer i is the input precision of layer i + 1 (the next layer reads what
this one wrote); the last quantised layer writes 16 bits.
Bits moved are DRAM word accesses times the DRAM word width; energy is in pJ.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from qlib import models

__all__ = [
    "LayerShape",
    "LayerTraffic",
    "OPERANDS",
    "REFERENCE_BITS",
    "layer_shapes",
    "network_traffic",
    "traffic_table",
    "zigzag_layer",
]


REFERENCE_BITS = 16
OPERANDS = ("I", "W", "O")


@dataclass(frozen=True)
class LayerShape:
    """Loop sizes of one layer as a convolution (Linear: C = in, K = out, 1x1 everything)."""

    name: str
    kind: str  # "conv" or "linear"
    C: int
    K: int
    OY: int
    OX: int
    FY: int = 1
    FX: int = 1
    stride: int = 1
    padding: int = 0


@dataclass(frozen=True)
class LayerTraffic:
    """DRAM traffic (bits) per operand and DRAM energy (pJ) of one layer at one precision."""

    input_bits: float
    weight_bits: float
    output_bits: float
    energy_pj: float

    @property
    def total_bits(self) -> float:
        return self.input_bits + self.weight_bits + self.output_bits

    def scaled(self, b_in: int, b_w: int, b_out: int, ref: int = REFERENCE_BITS) -> LayerTraffic:
        """The linear model: each operand's traffic and energy scaled by bits / ``ref``."""
        f_i, f_w, f_o = b_in / ref, b_w / ref, b_out / ref
        tot = self.total_bits or 1.0
        # Energy per DRAM access is constant, so energy splits like the traffic does.
        e = (
            self.energy_pj
            * (self.input_bits * f_i + self.weight_bits * f_w + self.output_bits * f_o)
            / tot
        )
        return LayerTraffic(
            self.input_bits * f_i, self.weight_bits * f_w, self.output_bits * f_o, e
        )


def layer_shapes(
    model: nn.Module, in_shape: Sequence[int], conv_only: bool = False
) -> list[LayerShape]:
    """Shapes of the Conv2d (and Linear) layers of ``model`` for one input of ``in_shape`` [C, H, W]."""
    shapes: list[LayerShape] = []
    hooks = []

    def hook(name: str):
        def fn(mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
            if isinstance(mod, nn.Conv2d):
                if mod.groups != 1 or mod.dilation != (1, 1) or mod.stride[0] != mod.stride[1]:
                    raise ValueError(
                        f"layer {name}: only dense, undilated square-stride convolutions"
                    )
                shapes.append(
                    LayerShape(
                        name,
                        "conv",
                        mod.in_channels,
                        mod.out_channels,
                        out.shape[2],
                        out.shape[3],
                        mod.kernel_size[0],
                        mod.kernel_size[1],
                        mod.stride[0],
                        int(mod.padding[0]),
                    )
                )
            else:
                shapes.append(LayerShape(name, "linear", mod.in_features, mod.out_features, 1, 1))

        return fn

    kinds = (nn.Conv2d,) if conv_only else (nn.Conv2d, nn.Linear)
    for name, mod in model.named_modules():
        if isinstance(mod, kinds):
            hooks.append(mod.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, *in_shape))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def zigzag_layer(
    layer: LayerShape,
    b_in: int,
    b_w: int,
    b_out: int,
    *,
    accelerator: str = "eyeriss_like",
    mapping: str = "default",
    cache: bool = True,
) -> LayerTraffic:
    """DRAM traffic of ``layer`` at the given precisions, from ZigZag (cached on disk)."""
    geo = asdict(layer)
    geo.pop("name")  # identical shapes share a cache entry
    key = json.dumps(
        {"layer": geo, "bits": [b_in, b_w, b_out], "acc": accelerator, "map": mapping},
        sort_keys=True,
    )
    path = models.cache_dir() / "zigzag" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    if cache and path.is_file():
        return LayerTraffic(**json.loads(path.read_text())["traffic"])
    result = _run_zigzag(layer, b_in, b_w, b_out, accelerator, mapping)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"key": json.loads(key), "traffic": asdict(result)}))
        tmp.replace(path)  # atomic, so parallel workers never read half a file
    return result


def _zigzag_inputs(accelerator: str, mapping: str) -> tuple[str, str]:
    import zigzag

    base = resources.files(zigzag) / "inputs"
    acc = (
        Path(accelerator)
        if accelerator.endswith(".yaml")
        else base / "hardware" / f"{accelerator}.yaml"
    )
    mp = Path(mapping) if mapping.endswith(".yaml") else base / "mapping" / f"{mapping}.yaml"
    for p in (acc, mp):
        if not Path(str(p)).is_file():
            raise FileNotFoundError(f"ZigZag input {p} does not exist")
    return str(acc), str(mp)


def _run_zigzag(
    layer: LayerShape, b_in: int, b_w: int, b_out: int, accelerator: str, mapping: str
) -> LayerTraffic:
    import matplotlib

    # Importing ZigZag calls plt.rc(...) (its plotting module), which would restyle every later
    # figure of the caller; keep matplotlib's settings as they were.
    with matplotlib.rc_context():
        from zigzag.api import get_hardware_performance_zigzag

    acc, mp = _zigzag_inputs(accelerator, mapping)
    s, p = layer.stride, layer.padding
    spec = [
        {
            "id": 0,
            "name": layer.name,
            "operator_type": "Conv",
            "equation": "O[b][k][oy][ox]+=W[k][c][fy][fx]*I[b][c][iy][ix]",
            "dimension_relations": [f"ix={s}*ox+1*fx", f"iy={s}*oy+1*fy"],
            "loop_dims": ["B", "K", "C", "OY", "OX", "FY", "FX"],
            "loop_sizes": [1, layer.K, layer.C, layer.OY, layer.OX, layer.FY, layer.FX],
            # O is the partial-sum precision inside the accelerator; O_final what goes to DRAM.
            "operand_precision": {"I": b_in, "W": b_w, "O": 32, "O_final": b_out},
            "operand_source": {"I": 0, "W": 0},
            "pr_loop_dims": ["IX", "IY"],
            "padding": [[p, p], [p, p]],
        }
    ]
    dump = tempfile.mkdtemp(prefix="qlib-zigzag-")
    try:
        with _quiet():
            _, _, cmes = get_hardware_performance_zigzag(
                spec, acc, mp, opt="energy", dump_folder=dump, loma_show_progress_bar=False
            )
    finally:
        shutil.rmtree(dump, ignore_errors=True)
    cme = cmes[0][1][0][0]
    bits: dict[str, float] = {}
    energy = 0.0
    for op, levels in cme.memory_word_access.items():
        dram = cme.mem_hierarchy_dict[cme.layer.memory_operand_links.layer_to_mem_op(op)][-1]
        width = dram.memory_instance.ports[0].bw_max  # bits per DRAM word access
        words = sum(levels[-1].data.values())  # the four directions at the top level (DRAM)
        bits[str(op)] = float(words * width)
        energy += float(cme.mem_energy_breakdown[op][-1])
    return LayerTraffic(bits["I"], bits["W"], bits["O"], energy)


@contextlib.contextmanager
def _quiet():
    # ZigZag calls logging.basicConfig(level=INFO) and logs every stage; a handler on the root
    # logger makes basicConfig a no-op, and raising zigzag's level hides its warnings.
    root, zz = logging.getLogger(), logging.getLogger("zigzag")
    handler, old = logging.NullHandler(), zz.level
    root.addHandler(handler)
    zz.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.removeHandler(handler)
        zz.setLevel(old)


def _precisions(genome: Sequence[int], n_layers: int) -> list[tuple[int, int, int]]:
    if len(genome) != 2 * n_layers:
        raise ValueError(f"genome has {len(genome)} genes, expected {2 * n_layers}")
    ins, ws = list(genome[0::2]), list(genome[1::2])
    outs = ins[1:] + [REFERENCE_BITS]
    return list(zip(ins, ws, outs, strict=True))


def network_traffic(
    shapes: Sequence[LayerShape],
    genome: Sequence[int],
    *,
    model: str = "linear",
    accelerator: str = "eyeriss_like",
    mapping: str = "default",
) -> list[LayerTraffic]:
    """Per-layer DRAM traffic of one inference for genome ``[in_0, w_0, in_1, w_1, ...]``."""
    out = []
    for shape, (b_in, b_w, b_out) in zip(shapes, _precisions(genome, len(shapes)), strict=True):
        if model == "zigzag":
            out.append(
                zigzag_layer(shape, b_in, b_w, b_out, accelerator=accelerator, mapping=mapping)
            )
        elif model == "linear":
            ref = zigzag_layer(
                shape,
                REFERENCE_BITS,
                REFERENCE_BITS,
                REFERENCE_BITS,
                accelerator=accelerator,
                mapping=mapping,
            )
            out.append(ref.scaled(b_in, b_w, b_out))
        else:
            raise ValueError(f"unknown traffic model {model!r}; expected 'zigzag' or 'linear'")
    return out


def traffic_table(
    shapes: Sequence[LayerShape],
    genome: Sequence[int],
    *,
    models_: Sequence[str] = ("linear", "zigzag"),
    accelerator: str = "eyeriss_like",
    mapping: str = "default",
):
    """A ``pandas.DataFrame``: one row per layer and traffic model (bits per operand, MB, pJ)."""
    import pandas as pd

    rows = []
    prec = _precisions(genome, len(shapes))
    for m in models_:
        per_layer = network_traffic(
            shapes, genome, model=m, accelerator=accelerator, mapping=mapping
        )
        for shape, (b_in, b_w, b_out), t in zip(shapes, prec, per_layer, strict=True):
            rows.append(
                {
                    "model": m,
                    "layer": shape.name,
                    "kind": shape.kind,
                    "input_bits": b_in,
                    "weight_bits": b_w,
                    "output_bits": b_out,
                    "dram_input_bits": t.input_bits,
                    "dram_weight_bits": t.weight_bits,
                    "dram_output_bits": t.output_bits,
                    "dram_MB": t.total_bits / 8e6,
                    "dram_energy_pJ": t.energy_pj,
                }
            )
    return pd.DataFrame(rows)
