"""The per-layer objects of the perturbation model, each with its three rules.

A network (``nn.Sequential`` of Linear, Conv2d, ReLU and Flatten, a ReLU after every affine layer
but the last) becomes a list of ``Layer`` objects (``layers``). Each knows its shapes and

- ``ibp``: the interval of its output from the interval of its input,
- ``backward``: a linear lower bound in terms of its input from one in terms of its output
  (back-substitution),
- ``perturbed``: its output for one concrete perturbed network (float64), the concrete
  counterpart that attacks and solver witnesses replay.

Every affine layer's input is non-negative (pixels in [0, 1], ReLU outputs), which is what makes
the weight-perturbation rules below exact per neuron.

The rules live in ``base`` (``Layer``, ``Flatten``), ``affine`` (``Affine``), ``linear``
(``Linear``), ``conv`` (``Conv2d``) and ``relu`` (``ReLU``); this module turns a model into
their list.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from qlib.bounds.affine import Affine
from qlib.bounds.base import Clipped, Flatten, Layer, RowDelta, clip_of, floor
from qlib.bounds.conv import Conv2d
from qlib.bounds.linear import Linear
from qlib.bounds.relu import ReLU, clip_relaxation

__all__ = [
    "Affine",
    "Clipped",
    "Conv2d",
    "Flatten",
    "Layer",
    "Linear",
    "ReLU",
    "RowDelta",
    "clip_of",
    "clip_relaxation",
    "floor",
    "layers",
]


def layers(model: nn.Module, in_shape: Sequence[int]) -> list[Layer]:
    """The per-layer objects of ``model`` for inputs of shape ``in_shape`` (no batch dim).

    Raises ``ValueError`` naming the layer for unsupported modules, a missing ReLU after a hidden
    affine layer, or a shape that does not fit.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    shape = tuple(int(s) for s in in_shape)
    out: list[Layer] = []
    last_kind = "input"
    for i, module in enumerate(model):
        name = f"layer {i} ({type(module).__name__})"
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError(f"{name}: only Flatten(start_dim=1, end_dim=-1) is supported")
            cls: type[Layer] = Flatten
        elif isinstance(module, nn.Linear):
            if len(shape) != 1 or shape[0] != module.in_features:
                raise ValueError(
                    f"{name}: expects inputs of shape ({module.in_features},), gets {shape}"
                )
            cls = Linear
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"{name}: only explicit zero padding is supported")
            if len(shape) != 3 or shape[0] != module.in_channels:
                raise ValueError(
                    f"{name}: expects inputs of shape ({module.in_channels}, H, W), gets {shape}"
                )
            cls = Conv2d
        elif isinstance(module, nn.ReLU):
            if last_kind != "affine":
                raise ValueError(f"{name}: a ReLU must directly follow a Linear or Conv2d layer")
            cls = ReLU
        else:
            raise ValueError(
                f"{name}: unsupported layer; bounds support Linear, Conv2d, ReLU and Flatten"
            )
        if cls is not Flatten:
            if cls is not ReLU and last_kind == "affine":
                raise ValueError(
                    f"{name}: the hidden affine layer before it must be followed by a ReLU"
                )
            last_kind = "relu" if cls is ReLU else "affine"
        try:
            layer = cls(i, module, shape)
        except RuntimeError as e:
            raise ValueError(f"{name}: input shape {shape} does not fit: {e}") from e
        if isinstance(layer, Affine) and not any(isinstance(o, Affine) for o in out):
            layer.reads_input = True  # only Flattens before it
        out.append(layer)
        shape = layer.out_shape
    if last_kind != "affine":
        raise ValueError("the network must end with a Linear or Conv2d layer giving the logits")
    return out
