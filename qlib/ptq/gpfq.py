"""GPFQ: greedy path-following quantisation (Lybrand & Saab 2021; Zhang, Zhou & Saab 2023).

For each neuron ``w [d]`` of a layer, with float-network input ``X [m, d]`` and
partially-quantised-network input ``X~ [m, d]``, walk the input coordinates in order::

    u_0 = 0
    q_t = Q_A(<X~_t, u_{t-1} + w_t X_t> / ||X~_t||^2)
    u_t = u_{t-1} + w_t X_t - q_t X~_t            (u_d = Xw - X~q, the layer residual)

**im2col form** (``method="im2col"``): exactly that, all neurons at once, ``U [R, m]``.

**Covariance form** (``method="covariance"``, default). Unroll ``u_{t-1} = sum_{j<t} (w_j X_j
- q_j X~_j)``; then ``<X~_t, u_{t-1} + w_t X_t> = sum_{j<=t} G_tj w_j - sum_{j<t} H_tj q_j``
with ``H = X~^T X~`` and ``G = X~^T X`` (``[d, d]``). So

    q_t = Q_A((a_t - sum_{j<t} H_tj q_j) / H_tt),    a = tril(G) w,

and ``u`` is never formed: only the running inner products ``a_t - sum_{j<t} H_tj q_j`` are
kept, updated a block of columns at a time. Memory is ``O(d^2)`` whatever the number of
calibration patches; both forms give the same codes (up to float64 rounding).

A column with ``||X~_t|| = 0`` (dead on the calibration set) falls back to rounding ``w_t`` to
nearest; it changes neither the objective nor later steps (its row and column of ``H`` are 0).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from qlib.ptq.capture import CovStats, LayerInputs, Patches
from qlib.ptq.grid import round_codes
from qlib.ptq.loop import Bits, Calib, Retrain, Solver, quantize_layers
from qlib.ptq.results import QuantizedModel
from qlib.quant import UniformQuantizer

__all__ = ["METHODS", "quantize", "solve_covariance", "solve_im2col"]

METHODS = ("covariance", "im2col")


def solve_covariance(
    w: Tensor,
    qz: UniformQuantizer,
    H: Tensor,
    G: Tensor,
    *,
    noise: Tensor | None = None,
    block: int = 128,
) -> Tensor:
    """GPFQ codes ``[R, d]`` for weights ``w [R, d]`` from Grams ``H = X~^T X~``, ``G = X~^T X``.

    ``qz.scale`` is ``[R, 1]``; ``noise [R, d]`` in [0, 1) switches on stochastic rounding.
    """
    R, d = w.shape
    step = qz.scale[:, 0]
    diag = torch.diagonal(H)
    live = (diag > 0).tolist()
    num = w @ torch.tril(G).T  # [R, d]: a_t for every row; then minus the H_tj q_j terms
    codes = torch.empty_like(w)
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        for t in range(b0, b1):
            arg = num[:, t] / diag[t] if live[t] else w[:, t]
            c = round_codes(arg, step, qz, None if noise is None or not live[t] else noise[:, t])
            codes[:, t] = c
            if t + 1 < b1:
                num[:, t + 1 : b1] -= torch.outer(c * step, H[t + 1 : b1, t])
        if b1 < d:
            # Lazy update: the block's codes reach the later columns in one matrix product.
            num[:, b1:] -= (codes[:, b0:b1] * step[:, None]) @ H[b1:, b0:b1].T
    return codes


def solve_im2col(
    w: Tensor,
    qz: UniformQuantizer,
    X: Tensor,
    Xt: Tensor,
    *,
    noise: Tensor | None = None,
    max_elements: int = 1 << 25,
) -> Tensor:
    """GPFQ codes ``[R, d]`` from the unfolded inputs ``X``, ``X~`` ``[m, d]`` (the published form).

    Rows are solved in chunks so that ``U [rows, m]`` stays under ``max_elements``; rows are
    independent, so chunking changes nothing.
    """
    R, d = w.shape
    step = qz.scale[:, 0]
    norms = Xt.pow(2).sum(0)
    live = (norms > 0).tolist()
    codes = torch.empty_like(w)
    rows = max(1, max_elements // max(1, len(X)))
    for r0 in range(0, R, rows):
        r1 = min(r0 + rows, R)
        U = w.new_zeros(r1 - r0, len(X))
        for t in range(d):
            U.addr_(w[r0:r1, t], X[:, t])
            arg = (U @ Xt[:, t]) / norms[t] if live[t] else w[r0:r1, t]
            c = round_codes(
                arg, step[r0:r1], qz, None if noise is None or not live[t] else noise[r0:r1, t]
            )
            codes[r0:r1, t] = c
            U.addr_(c * step[r0:r1], Xt[:, t], alpha=-1)
    return codes


def _solver(stochastic: bool) -> Solver:
    def solve(
        w: Tensor, qz: UniformQuantizer, inputs: LayerInputs | None, gen: torch.Generator
    ) -> Tensor:
        # One draw per weight, made before solving, so both forms see the same randomness.
        noise = (
            torch.rand(w.shape, generator=gen, dtype=w.dtype).to(w.device) if stochastic else None
        )
        if isinstance(inputs, CovStats):
            return solve_covariance(w, qz, inputs.H, inputs.G, noise=noise)
        assert isinstance(inputs, Patches)
        return solve_im2col(w, qz, inputs.X, inputs.Xt, noise=noise)

    return solve


def quantize(
    model: nn.Module,
    calib: Calib,
    bits: Bits,
    *,
    scalar: float | str = "auto",
    levels: str = "2^b",
    per_channel: bool = False,
    method: str = "covariance",
    p: float = 1.0,
    fresh_batches: bool = False,
    bias_correction: bool = False,
    float_layers: Sequence[str | int] = (),
    layers: Sequence[str] | None = None,
    retrain: Retrain | None = None,
    stochastic: bool = False,
    seed: int = 0,
    batch_size: int = 256,
    eval_data: tuple[Tensor, Tensor] | None = None,
    log_path: str | os.PathLike | None = None,
) -> QuantizedModel:
    """GPFQ-quantise the weights of every Linear/Conv2d layer of a copy of ``model``.

    Args:
        calib: images ``[N, C, H, W]`` or a pair ``(X, y)`` (labels needed for ``retrain``).
        bits: an int, a list per quantised layer, or a mapping (layer name / index /
            ``"conv"`` / ``"linear"`` / ``"default"`` -> bits).
        scalar: C in the step ``C * mean_rows(max|w|) / max_int``; ``"auto"`` searches a grid
            for the smallest relative layer error; ``"max"`` is the max-abs grid.
        levels: ``"2^b"``, ``"2^b-1"`` (symmetric) or the published ``"2^b+1"`` alphabet.
        per_channel: one step per output row (``rad`` = that row's max|w|).
        method: ``"covariance"`` (Gram matrices) or ``"im2col"`` (the published form).
        p: share of each image's conv patches kept (drawn without replacement).
        fresh_batches: split ``calib`` into one disjoint batch per layer, as published.
        bias_correction: add ``mean(Xw - X~q)`` to each layer's bias.
        float_layers: layer names or indices (negative allowed) to leave in float.
        layers: quantise exactly these module names (an unsupported one is an error).
        retrain: fine-tune the remaining float layers after each quantised layer.
        stochastic: SPFQ stochastic rounding instead of rounding to nearest.
        eval_data, log_path: measure accuracy and append a row to a CSV log.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return quantize_layers(
        model,
        calib,
        bits,
        _solver(stochastic),
        method="gpfq-spfq" if stochastic else "gpfq",
        scalar=scalar,
        levels=levels,
        per_channel=per_channel,
        form=method,
        p=p,
        fresh_batches=fresh_batches,
        bias_correction=bias_correction,
        float_layers=float_layers,
        layers=layers,
        retrain=retrain,
        seed=seed,
        batch_size=batch_size,
        eval_data=eval_data,
        log_path=log_path,
        extra_config={"stochastic": stochastic},
    )
