"""Round to nearest on the shared grid: the baseline every PTQ method is compared with."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qlib.ptq.capture import LayerInputs
from qlib.ptq.loop import Bits, Calib, quantize_layers
from qlib.ptq.results import QuantizedModel
from qlib.quant import UniformQuantizer

__all__ = ["rtn", "rtn_solver"]


def rtn_solver(
    w: Tensor, qz: UniformQuantizer, inputs: LayerInputs | None, gen: torch.Generator
) -> Tensor:
    """Round to nearest: codes ``[R, d]`` of ``w [R, d]``."""
    return qz.to_int(w)


def rtn(
    model: nn.Module,
    bits: Bits,
    *,
    calib: Calib | None = None,
    scalar: float | str = "max",
    levels: str = "2^b",
    per_channel: bool = False,
    float_layers: Sequence[str | int] = (),
    layers: Sequence[str] | None = None,
    batch_size: int = 256,
    eval_data: tuple[Tensor, Tensor] | None = None,
    log_path: str | os.PathLike | None = None,
) -> QuantizedModel:
    """Round-to-nearest on the shared grid. With ``calib`` the layer errors are measured (on the
    partially RTN-quantised network) and ``scalar="auto"`` becomes available."""
    return quantize_layers(
        model,
        calib,
        bits,
        rtn_solver,
        method="rtn",
        scalar=scalar,
        levels=levels,
        per_channel=per_channel,
        form=None if calib is None else "covariance",
        float_layers=float_layers,
        layers=layers,
        batch_size=batch_size,
        eval_data=eval_data,
        log_path=log_path,
    )
