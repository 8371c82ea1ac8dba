"""The published fixed-point feed-forward (grids, saturation, the per-layer certified box).

See ``qlib.fixedpoint`` for the model of arithmetic; ``evaluation`` measures what it does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.quant import LayerPerturbation

__all__ = [
    "DTYPE",
    "MAX_BITS",
    "MIN_BITS",
    "FixedPoint",
    "LayerQuant",
    "QuantizedInputs",
    "QuantizedMLP",
    "SimOutput",
    "activation_maxima",
    "check_bits",
    "fixed_point",
    "layer_bias",
    "mlp_linears",
    "quantize_inputs",
]

MIN_BITS, MAX_BITS = 2, 32
DTYPE = torch.float64


def check_bits(name: str, bits) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"{name} must be an integer in [{MIN_BITS}, {MAX_BITS}], got {bits!r}")
    return bits


@dataclass(frozen=True)
class FixedPoint:
    """Settings of the fixed-point simulator (defaults: the published Fashion-MNIST sweep).

    ``bias_bits`` None uses ``weight_bits`` (as published). ``act_range``: the clip ``R_a`` of
    every hidden activation (a positive float), or ``"pow2"``: per layer
    ``2^ceil(log2 max activation)`` over calibration images. ``weight_range`` None: the
    published per-tensor power of two; a float forces that range on every weight and bias
    tensor (weights beyond it saturate, which is counted). ``asymmetric``: min/max zero-point
    grids for weights and biases (inputs and activations are one-sided and keep theirs).
    """

    weight_bits: int = 8
    input_bits: int = 4
    act_bits: int = 4
    bias_bits: int | None = None
    act_range: float | Literal["pow2"] = 8.0
    weight_range: float | None = None
    asymmetric: bool = False

    def __post_init__(self) -> None:
        check_bits("weight_bits", self.weight_bits)
        check_bits("input_bits", self.input_bits)
        check_bits("act_bits", self.act_bits)
        if self.bias_bits is not None:
            check_bits("bias_bits", self.bias_bits)
        if self.act_range != "pow2" and not _positive(self.act_range):
            raise ValueError(f"act_range must be a float > 0 or 'pow2', got {self.act_range!r}")
        if self.weight_range is not None and not _positive(self.weight_range):
            raise ValueError(f"weight_range must be None or a float > 0, got {self.weight_range!r}")
        if not isinstance(self.asymmetric, bool):
            raise ValueError(f"asymmetric must be a bool, got {self.asymmetric!r}")

    @property
    def effective_bias_bits(self) -> int:
        """The bias bit width: ``bias_bits``, or ``weight_bits`` when it is None."""
        return self.weight_bits if self.bias_bits is None else self.bias_bits


def _positive(v) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


@dataclass(frozen=True)
class LayerQuant:
    """How one Linear layer was quantised: ranges, steps, saturation and the largest errors."""

    index: int
    weight_range: float
    weight_step: float
    bias_range: float
    bias_step: float
    saturated_weights: int
    saturated_biases: int
    weight_error: float
    bias_error: float
    n_weights: int
    act_range: float | None  # None for the logit layer
    act_step: float | None


@dataclass(frozen=True)
class SimOutput:
    """One simulated forward pass: logits ``[N, classes]`` and what the rounding did.

    ``input_error`` / ``act_error`` are the largest ``|x̂ - x|`` over the inputs and
    ``|ĥ - relu(ẑ)|`` over all hidden activations (``ẑ`` the quantised network's own
    pre-activation), ``input_errors`` / ``act_errors`` [N] the same per image;
    ``saturated_*`` count clipped entries.
    """

    logits: Tensor
    input_errors: Tensor
    act_errors: Tensor
    saturated_inputs: int
    saturated_acts: int

    @property
    def input_error(self) -> float:
        return self.input_errors.max().item()

    @property
    def act_error(self) -> float:
        return self.act_errors.max().item()


def _signed(x: Tensor, bits: int, r: float) -> tuple[Tensor, Tensor]:
    """The published ``quantizeSigned`` with both ends clipped to the b-bit two's complement
    codes; also the mask of saturated entries."""
    step = r * 2.0 ** (1 - bits)
    code = torch.round(x / step)
    lo, hi = -(2.0 ** (bits - 1)), 2.0 ** (bits - 1) - 1
    sat = (code > hi) | (code < lo)
    return code.clamp(lo, hi) * step, sat


def _asymmetric(x: Tensor, bits: int) -> tuple[Tensor, Tensor, float]:
    """Min/max zero-point grid over ``[min(x, 0), max(x, 0)]``: values, saturation, step."""
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    step = (hi - lo) / (2.0**bits - 1) if hi > lo else 1.0
    zero = round(-lo / step)
    code = torch.round(x / step) + zero
    sat = (code < 0) | (code > 2.0**bits - 1)
    return (code.clamp(0, 2.0**bits - 1) - zero) * step, sat, step


def _pow2_range(m: float) -> float:
    """``2^ceil(log2 m)`` (1 for an all-zero tensor)."""
    return 2.0 ** math.ceil(math.log2(m)) if m > 0 else 1.0


def mlp_linears(model: nn.Module) -> list[nn.Linear]:
    """The Linear layers of a ReLU MLP; any other structure is refused naming the layer."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"the fixed-point simulator needs an nn.Sequential MLP, got {type(model).__name__}"
        )
    linears: list[nn.Linear] = []
    expect_relu = False
    for i, m in enumerate(model):
        where = f"layer {i} ({type(m).__name__})"
        if isinstance(m, nn.Flatten) and i == 0:
            continue
        if isinstance(m, nn.Linear):
            if expect_relu:
                raise ValueError(f"{where}: a hidden Linear layer must be followed by a ReLU")
            linears.append(m)
            expect_relu = True
        elif isinstance(m, nn.ReLU):
            if not expect_relu:
                raise ValueError(f"{where}: a ReLU must directly follow a Linear layer")
            expect_relu = False
        else:
            raise ValueError(
                f"{where}: the fixed-point simulator supports only MLPs (Flatten first, then "
                "Linear and ReLU); convolutions and other layers are not simulated"
            )
    if not linears or not expect_relu:
        raise ValueError("the MLP must end with a Linear layer giving the logits")
    return linears


@torch.no_grad()
def _act_maxima(linears: Sequence[nn.Linear], X: Tensor) -> list[float]:
    """Largest post-ReLU float activation of every hidden layer on ``X``."""
    h = X.flatten(1).to(DTYPE)
    out = []
    for lin in linears[:-1]:
        h = torch.relu(F.linear(h, lin.weight.to(DTYPE), layer_bias(lin)))
        out.append(h.max().item() if h.numel() else 0.0)
    return out


def activation_maxima(model: nn.Module, X: Tensor) -> list[float]:
    """The largest float post-ReLU activation of every hidden layer of the ReLU MLP ``model``
    on ``X`` [N, C, H, W] (what a clip range ``R_a`` has to cover)."""
    return _act_maxima(mlp_linears(model), X)


def layer_bias(lin: nn.Linear) -> Tensor:
    if lin.bias is None:
        return torch.zeros(lin.out_features, dtype=DTYPE)
    return lin.bias.detach().to(DTYPE)


@dataclass(frozen=True)
class QuantizedInputs:
    """Inputs on the ``bits``-bit signed grid with ``R = 1``: ``values`` [N, features] (float64),
    ``errors`` [N] the largest ``|x̂ - x|`` per image, ``saturated`` the clipped pixels."""

    bits: int
    values: Tensor
    errors: Tensor
    saturated: int


@torch.no_grad()
def quantize_inputs(X: Tensor, bits: int) -> QuantizedInputs:
    """The published input quantisation of ``X`` [N, ...] in [0, 1] (``quantizeSigned``, R = 1)."""
    check_bits("input_bits", bits)
    x = X.flatten(1).to(DTYPE)
    h, sat = _signed(x, bits, 1.0)
    return QuantizedInputs(bits, h, (h - x).abs_().amax(1), int(sat.sum()))


class QuantizedMLP:
    """A ReLU MLP quantised by ``fixed_point``: quantised parameters and the layer reports."""

    def __init__(
        self,
        params: list[tuple[Tensor, Tensor]],
        layers: list[LayerQuant],
        config: FixedPoint,
    ) -> None:
        self.params = params
        self.layers = layers
        self.config = config

    @property
    def saturated_weights(self) -> int:
        return sum(layer.saturated_weights for layer in self.layers)

    @property
    def saturated_biases(self) -> int:
        return sum(layer.saturated_biases for layer in self.layers)

    @torch.no_grad()
    def forward(self, X: Tensor, inputs: QuantizedInputs | None = None) -> SimOutput:
        """Simulate ``X`` [N, C, H, W] (or [N, features]) in [0, 1]; ``inputs``: the already
        quantised ``X`` (``quantize_inputs(X, config.input_bits)``), to share across networks."""
        cfg = self.config
        if inputs is None:
            inputs = quantize_inputs(X, cfg.input_bits)
        elif inputs.bits != cfg.input_bits or len(inputs.values) != len(X):
            raise ValueError(
                f"inputs were quantised to {inputs.bits} bits for {len(inputs.values)} images, "
                f"the network expects {cfg.input_bits} bits for {len(X)}"
            )
        h = inputs.values
        act_err = torch.zeros(len(h), dtype=DTYPE)
        act_sat = 0
        top = 2.0**cfg.act_bits - 1
        for (W, b), layer in zip(self.params, self.layers, strict=True):
            z = torch.addmm(b, h, W.T)
            if layer.act_range is None:
                break
            a = z.relu_()
            code = a.clamp(max=layer.act_range).div_(layer.act_step).round_()
            act_sat += int((code > top).sum())
            h = code.clamp_(max=top).mul_(layer.act_step)
            act_err = torch.maximum(act_err, (h - a).abs_().amax(1))
        return SimOutput(z, inputs.errors, act_err, inputs.saturated, act_sat)

    __call__ = forward

    def to_module(self, like: nn.Sequential) -> nn.Sequential:
        """A float64 copy of ``like`` carrying the quantised weights and biases (the network
        without input and activation rounding, e.g. for ``perturbation_between``)."""
        import copy

        out = copy.deepcopy(like).to(DTYPE)
        for lin, (W, b) in zip(mlp_linears(out), self.params, strict=True):
            lin.weight.data.copy_(W)
            if lin.bias is not None:
                lin.bias.data.copy_(b)
        return out

    def perturbation(self) -> tuple[LayerPerturbation, tuple[str, ...]]:
        """The per-layer box that contains this quantised network on every input in [0, 1], and
        the parameter kinds ("weight", "bias") widened past half a step by saturation.

        Inputs and activations saturate onto the top grid value ``T``, and
        ``round(min(v, T)) = q(v)`` exactly, so they are the clipped model of
        ``LayerPerturbation`` (``min(v, T) + δ``, ``|δ|`` at most half a step): no widening,
        and sound beyond the evaluated images. Weights and biases are known, so a saturated
        layer's radius is its exact largest error.
        """
        cfg = self.config
        # A relative slack covers float64 rounding of v / step when the step is not a power
        # of two (asymmetric grids, a user-chosen act_range); power-of-two steps are exact.
        w = [_up(max(0.5 * lq.weight_step, lq.weight_error)) for lq in self.layers]
        b = [_up(max(0.5 * lq.bias_step, lq.bias_error)) for lq in self.layers]
        hidden = self.layers[:-1]
        act = [_slack(0.5 * lq.act_step, lq.act_range) for lq in hidden]
        clips = [lq.act_range - lq.act_step for lq in hidden]
        step_x = 2.0 ** (1 - cfg.input_bits)
        widened = tuple(
            kind
            for kind, flag in (
                ("weight", any(lq.weight_error > 0.5 * lq.weight_step for lq in self.layers)),
                ("bias", any(lq.bias_error > 0.5 * lq.bias_step for lq in self.layers)),
            )
            if flag
        )
        pert = LayerPerturbation(
            eps_input=_up(0.5 * step_x),
            eps_weight=tuple(w),
            eps_bias=tuple(b),
            eps_act=tuple(act),
            input_clip=1.0 - step_x,
            act_clip=tuple(clips),
        )
        return pert, widened


def _slack(half: float, scale: float) -> float:
    return _up(half * (1 + 2.0**-40) + scale * 2.0**-50)


def _up(v: float) -> float:
    return math.nextafter(v, math.inf) if v > 0 else 0.0


def fixed_point(
    model: nn.Module, config: FixedPoint | None = None, calib: Tensor | None = None
) -> QuantizedMLP:
    """Quantise the ReLU MLP ``model`` with ``config``; ``calib`` [N, C, H, W] (training images)
    sets the activation ranges when ``config.act_range == "pow2"``.

    Raises ``ValueError`` naming the layer for anything but ``Flatten, Linear, ReLU, ...,
    Linear``.
    """
    cfg = config or FixedPoint()
    if not isinstance(cfg, FixedPoint):
        raise TypeError(f"config must be a qlib.fixedpoint.FixedPoint, got {type(cfg).__name__}")
    linears = mlp_linears(model)
    if cfg.act_range == "pow2":
        if calib is None:
            raise ValueError("act_range='pow2' needs calibration images: pass calib=X_train[:n]")
        act_ranges = [_pow2_range(m) for m in _act_maxima(linears, calib)]
    else:
        act_ranges = [float(cfg.act_range)] * (len(linears) - 1)
    params, layers = [], []
    for i, lin in enumerate(linears):
        W, b = lin.weight.detach().to(DTYPE), layer_bias(lin)
        qW, sat_w, rW, sW = _quantize_param(W, cfg.weight_bits, cfg)
        qb, sat_b, rb, sb = _quantize_param(b, cfg.effective_bias_bits, cfg)
        hidden = i < len(linears) - 1
        ar = act_ranges[i] if hidden else None
        layers.append(
            LayerQuant(
                index=i,
                weight_range=rW,
                weight_step=sW,
                bias_range=rb,
                bias_step=sb,
                saturated_weights=int(sat_w.sum()),
                saturated_biases=int(sat_b.sum()),
                weight_error=(qW - W).abs().max().item(),
                bias_error=(qb - b).abs().max().item() if b.numel() else 0.0,
                n_weights=W.numel(),
                act_range=ar,
                act_step=ar * 2.0**-cfg.act_bits if hidden else None,
            )
        )
        params.append((qW, qb))
    return QuantizedMLP(params, layers, cfg)


def _quantize_param(t: Tensor, bits: int, cfg: FixedPoint) -> tuple[Tensor, Tensor, float, float]:
    """Quantised tensor, saturation mask, range and step."""
    if cfg.asymmetric:
        q, sat, step = _asymmetric(t, bits)
        lo, hi = min(t.min().item(), 0.0), max(t.max().item(), 0.0)
        return q, sat, hi - lo, step
    r = cfg.weight_range or _pow2_range(t.abs().max().item() if t.numel() else 0.0)
    q, sat = _signed(t, bits, r)
    return q, sat, r, r * 2.0 ** (1 - bits)
