"""GPTQ (Frantar, Ashkboos, Hoefler & Alistarh 2022) on the grid that RTN and GPFQ share.

Per layer, with the partially quantised network's input ``X~ [m, d]``, minimise
``||X~ w - X~ q||^2`` column by column: ``H = 2 X~^T X~ / m`` plus damping
``damp * mean(diag H)``, the upper Cholesky factor ``U`` of ``H^{-1}``, and for column ``t``

    q_t = Q(w_t),    w_{>t} -= (w_t - q_t) / U_tt * U_{t,>t}

with the updates to later blocks of ``block_size`` columns applied lazily (one matrix product
per block). ``act_order`` visits columns by decreasing ``diag H``. A column that is zero on
the calibration set gets ``H_tt = 1`` and no coupling, i.e. it is rounded to nearest.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qlib.ptq.capture import CovStats, LayerInputs
from qlib.ptq.loop import Bits, Calib, quantize_layers
from qlib.ptq.results import QuantizedModel
from qlib.quant import UniformQuantizer

__all__ = ["quantize", "solve"]


def solve(
    w: Tensor,
    qz: UniformQuantizer,
    H: Tensor,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
) -> Tensor:
    """GPTQ codes ``[R, d]`` of ``w [R, d]`` (float64) given ``H = X~^T X~ [d, d]``; ``qz.scale [R, 1]``."""
    d = w.shape[1]
    step = qz.scale
    H = H.clone()
    diag = torch.diagonal(H)
    dead = diag <= 0
    H[dead, dead] = 1.0
    w = w.clone()
    perm = torch.argsort(diag, descending=True) if act_order else torch.arange(d, device=w.device)
    w, H = w[:, perm], H[perm][:, perm]
    # H's scale (2/m) cancels in the algorithm; damping is relative to its mean diagonal.
    H += damp * torch.diagonal(H).mean() * torch.eye(d, dtype=H.dtype, device=H.device)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    codes = torch.empty_like(w)
    for b0 in range(0, d, block_size):
        b1 = min(b0 + block_size, d)
        W1 = w[:, b0:b1]
        err = torch.empty_like(W1)
        for i in range(b1 - b0):
            c = qz.to_int(W1[:, i : i + 1])[:, 0]
            codes[:, b0 + i] = c
            e = (W1[:, i] - c * step[:, 0]) / U[b0 + i, b0 + i]
            W1[:, i:] -= torch.outer(e, U[b0 + i, b0 + i : b1])
            err[:, i] = e
        w[:, b1:] -= err @ U[b0:b1, b1:]
    return codes[:, torch.argsort(perm)]


def quantize(
    model: nn.Module,
    calib: Calib,
    bits: Bits,
    *,
    damp: float = 0.01,
    act_order: bool = False,
    block_size: int = 128,
    scalar: float | str = "auto",
    levels: str = "2^b",
    per_channel: bool = False,
    bias_correction: bool = False,
    float_layers: Sequence[str | int] = (),
    layers: Sequence[str] | None = None,
    seed: int = 0,
    batch_size: int = 256,
    eval_data: tuple[Tensor, Tensor] | None = None,
    log_path: str | os.PathLike | None = None,
) -> QuantizedModel:
    """GPTQ-quantise every Linear/Conv2d layer of a copy of ``model``, in order.

    Grid arguments (``bits``, ``scalar``, ``levels``, ``per_channel``, ``float_layers``,
    ``layers``) mean what they mean in ``qlib.gpfq.quantize``; ``scalar="auto"`` picks C by the
    same relative layer error ``||XW^T - X~Q^T||^2 / ||XW^T||^2``.
    """
    if not damp >= 0:
        raise ValueError(f"damp must be >= 0, got {damp!r}")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")

    def solver(
        w: Tensor, qz: UniformQuantizer, inputs: LayerInputs | None, gen: torch.Generator
    ) -> Tensor:
        assert isinstance(inputs, CovStats)
        return solve(w, qz, inputs.H, damp=damp, act_order=act_order, block_size=block_size)

    return quantize_layers(
        model,
        calib,
        bits,
        solver,
        method="gptq",
        scalar=scalar,
        levels=levels,
        per_channel=per_channel,
        form="covariance",
        bias_correction=bias_correction,
        float_layers=float_layers,
        layers=layers,
        seed=seed,
        batch_size=batch_size,
        eval_data=eval_data,
        log_path=log_path,
        extra_config={"damp": damp, "act_order": act_order, "block_size": block_size},
    )
