"""Helpers of the GPFQ chapters' experiments, above every solver: calibration draws and
single-layer error comparisons."""

from __future__ import annotations

import torch
from torch import Tensor

from qlib import models
from qlib.ptq import gpfq, gptq
from qlib.ptq.rtn import rtn

__all__ = ["calibration_indices", "single_layer_errors"]


def calibration_indices(n: int, size: int, *, seed: int = 0) -> Tensor:
    """A fixed, seeded draw of ``size`` distinct indices out of ``range(n)`` (a calibration set)."""
    if not 1 <= size <= n:
        raise ValueError(f"calibration size must be in [1, {n}] (the data size), got {size}")
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]


def single_layer_errors(
    W: Tensor, X: Tensor, bits: int, *, scalar: float | str = "auto"
) -> dict[str, float]:
    """Relative errors ``||Xw - Xq||^2 / ||Xw||^2`` of RTN, GPFQ and GPTQ on one linear layer.

    ``W`` [R, d] the weights, ``X`` [m, d] the layer inputs (nothing before the layer is
    quantised, so ``X~ = X``); every method uses the same grid search for the scale.
    """
    R, d = W.shape
    if X.ndim != 2 or X.shape[1] != d:
        raise ValueError(f"X must be [m, {d}] to match W [{R}, {d}], got {list(X.shape)}")
    net = models.mlp([1, 1, d], [], R)
    with torch.no_grad():
        net[1].weight.copy_(W)
        net[1].bias.zero_()
    calib = X.float().reshape(-1, 1, 1, d)
    runs = {
        "RTN": lambda: rtn(net, bits, calib=calib, scalar=scalar),
        "GPFQ": lambda: gpfq.quantize(net, calib, bits, scalar=scalar),
        "GPTQ": lambda: gptq.quantize(net, calib, bits, scalar=scalar),
    }
    return {name: run().layers[0].rel_error for name, run in runs.items()}
