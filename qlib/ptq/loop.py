"""The layer loop that every PTQ method shares, and its solver protocol.

Every method quantises the Linear and Conv2d layers of a model one after another, in module
registration order; for each it captures the layer's inputs (``qlib.ptq.capture``), chooses the
grid (``qlib.ptq.grid``) and calls a per-layer ``Solver`` that turns the float weights
``W [R, d]`` into integer codes. A solver sees only one layer: RTN, GPFQ and GPTQ differ in that
function alone.

Dead columns: an input coordinate that is zero on every calibration row of ``X~`` carries no
information about its weight, so every method rounds that weight to nearest (RTN).
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib import models
from qlib.ptq.capture import LayerInputs, collect_inputs, find_layers, model_device
from qlib.ptq.grid import (
    LEVELS,
    candidate_scalars,
    check_bits,
    check_scalar,
    grid_steps,
    make_quantizer,
)
from qlib.ptq.results import LayerResult, QuantizedModel, append_log, model_name
from qlib.quant import UniformQuantizer

__all__ = [
    "Bits",
    "Calib",
    "Retrain",
    "Solver",
    "check_calib",
    "quantize_layers",
    "resolve_bits",
    "split_float_layers",
]

Calib = Tensor | tuple[Tensor, Tensor]
Bits = int | Sequence[int] | Mapping[str | int, int]


@dataclass(frozen=True)
class Retrain:
    """Brief fine-tune of the float layers left after each quantised layer (published defaults)."""

    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-6
    batch_size: int = 128


def resolve_bits(bits: Bits, layers: Sequence[tuple[str, nn.Module]]) -> list[int]:
    """Bit width per layer from an int, a per-layer list, or a mapping.

    Mapping keys: layer names, layer indices (into ``layers``), ``"conv"``/``"linear"``, or
    ``"default"``; the most specific key wins.
    """
    if isinstance(bits, Mapping):
        out = []
        for i, (name, module) in enumerate(layers):
            kind = "conv" if isinstance(module, nn.Conv2d) else "linear"
            for key in (name, i, i - len(layers), kind, "default"):
                if key in bits:
                    out.append(bits[key])
                    break
            else:
                raise ValueError(f"bits: no entry for layer {name!r} (nor '{kind}' or 'default')")
    elif isinstance(bits, Sequence) and not isinstance(bits, str):
        if len(bits) != len(layers):
            raise ValueError(f"bits: got {len(bits)} values for {len(layers)} quantised layers")
        out = list(bits)
    else:
        out = [bits] * len(layers)
    for (name, _), b in zip(layers, out, strict=True):
        check_bits(b, f"bits of layer {name!r}")
    return out


def split_float_layers(
    layers: list[tuple[str, nn.Module]], float_layers: Sequence[str | int]
) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """Remove the layers named (or indexed, negative allowed) in ``float_layers``."""
    names = [n for n, _ in layers]
    keep_float = set()
    for key in float_layers:
        if isinstance(key, int) and not isinstance(key, bool):
            if not -len(names) <= key < len(names):
                raise ValueError(f"float_layers: index {key} out of range for {len(names)} layers")
            keep_float.add(names[key])
        elif key in names:
            keep_float.add(key)
        else:
            raise ValueError(f"float_layers: {key!r} is not a quantisable layer; have {names}")
    return [(n, m) for n, m in layers if n not in keep_float], [n for n in names if n in keep_float]


def check_calib(model: nn.Module, calib: Calib | None) -> tuple[Tensor, Tensor | None]:
    """``(X [N, ...], y [N] or None)`` from a tensor or an ``(X, y)`` pair; ValueError if unusable."""
    if calib is None:
        raise ValueError("calibration set is required (got None)")
    y = None
    if isinstance(calib, tuple | list):
        if len(calib) != 2:
            raise ValueError("calibration set must be a tensor X or a pair (X, y)")
        X, y = calib
        if len(X) != len(y):
            raise ValueError(f"calibration set: X has {len(X)} samples but y has {len(y)}")
    else:
        X = calib
    if not isinstance(X, Tensor) or X.ndim < 2:
        raise ValueError("calibration set: X must be a tensor [N, ...]")
    if len(X) == 0:
        raise ValueError("calibration set is empty")
    arch = getattr(model, "arch", None)
    if (
        isinstance(arch, dict)
        and "in_shape" in arch
        and list(X.shape[1:]) != list(arch["in_shape"])
    ):
        raise ValueError(
            f"calibration set: samples have shape {list(X.shape[1:])}, model expects {arch['in_shape']}"
        )
    try:
        with torch.no_grad():
            model.eval()
            model(X[:1].to(model_device(model)))
    except RuntimeError as e:
        raise ValueError(f"calibration set does not fit the model: {e}") from e
    return X, y


Solver = Callable[[Tensor, UniformQuantizer, LayerInputs | None, torch.Generator], Tensor]


def quantize_layers(
    model: nn.Module,
    calib: Calib | None,
    bits: Bits,
    solver: Solver,
    *,
    method: str,
    scalar: float | str = "auto",
    levels: str = "2^b",
    per_channel: bool = False,
    form: str | None = "covariance",
    p: float = 1.0,
    fresh_batches: bool = False,
    bias_correction: bool = False,
    float_layers: Sequence[str | int] = (),
    layers: Sequence[str] | None = None,
    retrain: Retrain | None = None,
    seed: int = 0,
    batch_size: int = 256,
    eval_data: tuple[Tensor, Tensor] | None = None,
    log_path: str | os.PathLike | None = None,
    extra_config: Mapping | None = None,
) -> QuantizedModel:
    """Quantise ``model``'s layers one after another with ``solver``; the input model is untouched.

    ``form=None`` runs without calibration data (RTN without a calibration set). ``retrain`` uses
    the partially quantised, fine-tuned network itself as the reference (``X = X~``), as the
    published retraining code does, because its float layers no longer match the original.
    """
    start = time.perf_counter()
    if levels not in LEVELS:
        raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")
    if not 0 < p <= 1:
        raise ValueError(f"p must be in (0, 1], got {p!r}")
    if form not in ("covariance", "im2col", None):
        raise ValueError(f"method must be 'covariance' or 'im2col', got {form!r}")
    qmodel = copy.deepcopy(model).eval()
    targets = find_layers(qmodel, layers)
    if not targets:
        raise ValueError("the model has no layer that can be quantised")
    targets, kept_float = split_float_layers(targets, float_layers)
    widths = resolve_bits(bits, targets)
    check_scalar(scalar)
    X, y = (None, None) if form is None else check_calib(qmodel, calib)
    if form is None and (scalar == "auto" or bias_correction or retrain is not None):
        raise ValueError("scalar='auto', bias_correction and retrain need a calibration set")
    if retrain is not None and y is None:
        raise ValueError("retrain needs a labelled calibration set (X, y)")
    ref = qmodel if retrain is not None else copy.deepcopy(model).eval()
    ref_modules = dict(ref.named_modules())
    gen = torch.Generator().manual_seed(seed)
    chunks = _calib_chunks(X, len(targets), fresh_batches, gen) if X is not None else None

    results = []
    for i, ((name, layer), b) in enumerate(zip(targets, widths, strict=True)):
        inputs = None
        if X is not None:
            Xi = X[chunks[i]] if chunks is not None else X
            inputs = collect_inputs(
                ref,
                ref_modules[name],
                qmodel,
                layer,
                Xi,
                form=form,
                p=p,
                gen=gen,
                batch_size=batch_size,
            )
        results.append(
            _quantize_one(
                name, layer, b, solver, inputs, scalar, levels, per_channel, bias_correction, gen
            )
        )
        if retrain is not None and i + 1 < len(targets):
            _fine_tune(qmodel, [m for _, m in targets[: i + 1]], X, y, retrain, seed + i)
    qmodel.eval()

    config = {
        "bits": widths,
        "scalar": scalar,
        "levels": levels,
        "per_channel": per_channel,
        "method": form,
        "p": p,
        "fresh_batches": fresh_batches,
        "bias_correction": bias_correction,
        "retrain": retrain,
        "seed": seed,
        **(extra_config or {}),
    }
    out = QuantizedModel(
        qmodel,
        results,
        method,
        config,
        calib_size=0 if X is None else len(X),
        time_s=time.perf_counter() - start,
        float_layers=kept_float,
    )
    if eval_data is not None:
        out.accuracy = models.evaluate(qmodel, eval_data)
        out.float_accuracy = models.evaluate(copy.deepcopy(model), eval_data)
    if log_path is not None:
        append_log(out.log_row(model_name(model)), log_path)
    return out


def _calib_chunks(
    X: Tensor, n_layers: int, fresh: bool, gen: torch.Generator
) -> list[Tensor] | None:
    """Disjoint, seeded index sets, one per layer (published fresh batches); None = reuse all."""
    if not fresh:
        return None
    if len(X) < n_layers:
        raise ValueError(
            f"calibration set: fresh_batches needs at least one image per layer ({n_layers}), got {len(X)}"
        )
    return list(torch.randperm(len(X), generator=gen).tensor_split(n_layers))


def _quantize_one(
    name: str,
    layer: nn.Module,
    bits: int,
    solver: Solver,
    inputs: LayerInputs | None,
    scalar: float | str,
    levels: str,
    per_channel: bool,
    bias_correction: bool,
    gen: torch.Generator,
) -> LayerResult:
    """Quantise one layer in place (its weight becomes ``codes * scale``) and describe it."""
    w = layer.weight.detach().reshape(len(layer.weight), -1).double()  # [R, d]
    R = len(w)
    max_int = make_quantizer(bits, 1.0, levels).max_int
    scalars = candidate_scalars(w, scalar, per_channel)
    steps = grid_steps(w, scalars, max_int, per_channel)  # [K * R, 1]
    qz = make_quantizer(bits, steps, levels)
    w_all = w.repeat(len(scalars), 1)  # the K candidate grids solved as one stack of rows
    codes = solver(w_all, qz, inputs, gen)  # [K * R, d]
    if inputs is not None:
        err, ref = inputs.sq_errors(w_all, codes * steps)
        rel = err.reshape(-1, R).sum(1) / ref[:R].sum().clamp_min(1e-300)
        best = int(torch.argmin(rel))  # first minimum: ties keep the smaller C
        rel_error = rel[best].item()
    else:
        best, rel_error = 0, float("nan")
    codes, step = codes[best * R : (best + 1) * R], steps[best * R : (best + 1) * R]
    q = codes * step
    with torch.no_grad():
        layer.weight.copy_(q.reshape(layer.weight.shape).to(layer.weight.dtype))
        if bias_correction:
            assert inputs is not None
            # E[Xw - X~q] over calibration rows, added back so the mean output is unchanged.
            shift = (w @ inputs.sx - q @ inputs.sxt) / inputs.m
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(R, dtype=layer.weight.dtype, device=w.device))
            layer.bias += shift.to(layer.bias.dtype)
    scale = step.reshape(-1, *([1] * (layer.weight.ndim - 1))) if per_channel else step[0, 0]
    return LayerResult(
        name=name,
        codes=codes.reshape(layer.weight.shape).to(torch.int32).cpu(),
        scale=scale.float().cpu(),
        bits=bits,
        levels=levels,
        min_int=qz.min_int,
        max_int=qz.max_int,
        scalar=scalars[best],
        rel_error=rel_error,
        bias=None if layer.bias is None else layer.bias.detach().clone().cpu(),
    )


def _fine_tune(
    model: nn.Module, frozen: list[nn.Module], X: Tensor, y: Tensor, cfg: Retrain, seed: int
) -> None:
    """Train the parameters of ``model`` outside ``frozen`` layers on ``(X, y)`` for a short while."""
    frozen_params = [p for m in frozen for p in m.parameters()]
    frozen_ids = {id(p) for p in frozen_params}
    params = [p for p in model.parameters() if id(p) not in frozen_ids]
    if not params:
        return
    opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    device = model_device(model)

    def loss_fn(xb: Tensor, yb: Tensor) -> Tensor:
        return F.cross_entropy(model(xb.to(device)), yb.to(device))

    # The quantised layers get no gradient at all: backward stops before them, and the
    # optimiser, which holds only the float layers, could not move them anyway.
    flags = [p.requires_grad for p in frozen_params]
    try:
        for p in frozen_params:
            p.requires_grad_(False)
        for _ in range(cfg.epochs):
            models.train_epoch(model, (X, y), opt, gen, cfg.batch_size, loss_fn)
    finally:
        for p, flag in zip(frozen_params, flags, strict=True):
            p.requires_grad_(flag)
    model.eval()
