"""Uniform quantisers (the grid every post-training method shares) and quantisation perturbations.

The quantiser follows the integer/scale split of Brevitas's ``IntQuant``: ``to_int`` divides by
the scale, rounds and clamps to ``[min_int, max_int]``; ``dequant`` multiplies back;
``fake_quant`` is the two together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class UniformQuantizer:
    """A symmetric uniform b-bit grid ``scale * {min_int, ..., max_int}``.

    ``signed`` grids hold ``-2^(b-1) .. 2^(b-1)-1`` (2^b levels), or ``-(2^(b-1)-1) .. 2^(b-1)-1``
    (2^b - 1 levels) with ``narrow_range``; unsigned grids hold ``0 .. 2^b - 1``.
    ``scale`` is a float (per tensor) or a tensor broadcastable to the quantised tensor
    (per channel: shape ``[out, 1, ...]``).
    """

    bits: int
    scale: float | Tensor
    signed: bool = True
    narrow_range: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 16:
            raise ValueError(f"bits must be an integer in [2, 16], got {self.bits!r}")
        scale = torch.as_tensor(self.scale)
        if not torch.all(torch.isfinite(scale)) or not torch.all(scale > 0):
            raise ValueError(f"scale must be finite and > 0, got {self.scale!r}")

    @property
    def min_int(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + int(self.narrow_range)

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def levels(self) -> int:
        """Number of grid points."""
        return self.max_int - self.min_int + 1

    def to_int(self, x: Tensor) -> Tensor:
        """Integer codes (as a float tensor of whole numbers) of ``x``: round to nearest, clamp."""
        return torch.clamp(torch.round(x / self.scale), self.min_int, self.max_int)

    def dequant(self, q: Tensor) -> Tensor:
        return q * self.scale

    def fake_quant(self, x: Tensor) -> Tensor:
        """``x`` rounded to the nearest grid point (round-to-nearest, RTN)."""
        return self.dequant(self.to_int(x))


def symmetric_quantizer(
    w: Tensor, bits: int, *, per_channel: bool = False, narrow_range: bool = True
) -> UniformQuantizer:
    """The max-abs symmetric grid for ``w``: ``scale = max|w| / max_int`` per tensor or per output channel.

    Rows (output channels) that are all zero get scale 1 so the grid stays valid.
    """
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
    max_int = 2 ** (bits - 1) - 1
    if per_channel:
        m = w.detach().abs().reshape(len(w), -1).amax(1)
        scale = torch.where(m > 0, m / max_int, torch.ones_like(m))
        scale = scale.reshape(-1, *([1] * (w.ndim - 1)))
    else:
        m = w.detach().abs().max().item()
        scale = m / max_int if m > 0 else 1.0
    return UniformQuantizer(bits, scale, signed=True, narrow_range=narrow_range)


# ----------------------------------------------------------------------------- perturbation

# The published convention (Dang et al., AISTATS 2025, verification scripts): for these bit-widths
# eps_input = 2^-b and eps_weight = eps_bias = eps_act = 2^(1-b); 16 bits perturbs only weights and
# biases, by 2^-15. Other widths have no published convention, so ``for_bits`` refuses them.
_PUBLISHED_BITS = (6, 8, 10, 16)
_KINDS = ("input", "weight", "bias", "act")


@dataclass(frozen=True)
class Perturbation:
    """Per-entry box radii of the quantisation perturbation model of the certification chapter.

    A quantised network differs from the float one by at most ``eps_input`` per input pixel (inputs
    stay in [0, 1]), ``eps_weight`` per weight, ``eps_bias`` per bias and ``eps_act`` per post-ReLU
    activation (activations stay >= 0); all perturbations are independent and absolute.
    """

    eps_input: float = 0.0
    eps_weight: float = 0.0
    eps_bias: float = 0.0
    eps_act: float = 0.0

    def __post_init__(self) -> None:
        for kind in _KINDS:
            name = f"eps_{kind}"
            value = getattr(self, name)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a real number, got {value!r}") from None
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
            object.__setattr__(self, name, value)

    @classmethod
    def for_bits(cls, bits: int) -> Perturbation:
        """The published convention for ``bits`` in {6, 8, 10, 16} (see the module comment)."""
        if bits not in _PUBLISHED_BITS or isinstance(bits, bool):
            raise ValueError(
                f"the published convention only covers bits in {_PUBLISHED_BITS}, got {bits!r}; "
                "use Perturbation.from_model(model, bits, X) for a range-derived perturbation"
            )
        if bits == 16:
            return cls(0.0, 2.0**-15, 2.0**-15, 0.0)
        return cls(2.0**-bits, 2.0 ** (1 - bits), 2.0 ** (1 - bits), 2.0 ** (1 - bits))

    @classmethod
    def from_model(cls, model: nn.Module, bits: int, X: Tensor | None = None) -> Perturbation:
        """Half a quantisation step of a ``bits``-bit round-to-nearest grid over the real ranges.

        Weights and biases: the max-abs symmetric signed grid of ``symmetric_quantizer``
        (narrow range, step ``max|W| / (2^(b-1) - 1)``). Inputs: the unsigned grid over [0, 1]
        (step ``1 / (2^b - 1)``). Activations: the unsigned grid over [0, max activation observed
        on ``X`` [N, C, H, W]]; ``eps_act = 0`` when ``X`` is None. Each kind is one scalar, so the
        range is the max over layers: every layer's own rounding error is within it (sound,
        though loose for layers with smaller ranges). Activations larger than the observed max on
        other inputs would be clipped by more than half a step; the bound covers rounding only.
        """
        if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
            raise ValueError(f"bits must be an integer in [2, 16], got {bits!r}")
        affine = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
        if not affine:
            raise ValueError("model has no Linear or Conv2d layer to take weight ranges from")
        signed_levels = 2 ** (bits - 1) - 1
        unsigned_levels = 2**bits - 1
        w_max = max(m.weight.detach().abs().max().item() for m in affine)
        b_max = max(
            (m.bias.detach().abs().max().item() for m in affine if m.bias is not None), default=0.0
        )
        a_max = 0.0
        if X is not None:
            a_max = _max_activation(model, X)
        return cls(
            eps_input=0.5 / unsigned_levels,
            eps_weight=0.5 * w_max / signed_levels,
            eps_bias=0.5 * b_max / signed_levels,
            eps_act=0.5 * a_max / unsigned_levels,
        )

    @classmethod
    def only(cls, kind: str, eps: float) -> Perturbation:
        """Perturb one kind ("input", "weight", "bias" or "act") by ``eps``, the rest by 0."""
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        return cls(**{f"eps_{kind}": eps})

    @classmethod
    def uniform(cls, eps: float) -> Perturbation:
        """All four kinds perturbed by the same ``eps``."""
        return cls(eps, eps, eps, eps)

    def scaled(self, factor: float) -> Perturbation:
        """Every radius times ``factor`` (>= 0), e.g. for an eps ramp during training."""
        if not math.isfinite(factor) or factor < 0:
            raise ValueError(f"factor must be finite and >= 0, got {factor!r}")
        return Perturbation(*(factor * v for v in self.as_tuple()))

    def as_tuple(self) -> tuple[float, float, float, float]:
        """``(eps_input, eps_weight, eps_bias, eps_act)``."""
        return (self.eps_input, self.eps_weight, self.eps_bias, self.eps_act)

    @property
    def is_zero(self) -> bool:
        return not any(self.as_tuple())


def _radius(name: str, value: object) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerPerturbation:
    """Per-layer box radii: the ``Perturbation`` model with one radius per layer, and clipping.

    ``eps_weight[k]`` and ``eps_bias[k]`` belong to the ``k``-th affine layer (Linear or Conv2d,
    forward order), ``eps_act[j]`` to the ``j``-th hidden ReLU (one fewer than affine layers).
    ``act_clip[j]`` (``None``: no clip) makes the ``j``-th hidden ReLU output
    ``min(relu(ẑ), act_clip[j]) + δ`` with ``|δ| <= eps_act[j]``, the range of a quantiser that
    saturates at ``act_clip[j]`` with the rounding as a box of half a step. ``input_clip``
    likewise makes the input ``min(x, input_clip) + δ``, ``|δ| <= eps_input``, ``>= 0`` (without
    a clip the input stays in [0, 1], as in ``Perturbation``). A uniform ``Perturbation`` is the
    special case ``LayerPerturbation.uniform(pert, n_affine)``.
    """

    eps_input: float = 0.0
    eps_weight: tuple[float, ...] = ()
    eps_bias: tuple[float, ...] = ()
    eps_act: tuple[float, ...] = ()
    input_clip: float | None = None
    act_clip: tuple[float | None, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "eps_input", _radius("eps_input", self.eps_input))
        for kind in ("weight", "bias", "act"):
            name = f"eps_{kind}"
            values = getattr(self, name)
            if isinstance(values, str) or not hasattr(values, "__iter__"):
                raise ValueError(f"{name} must be a sequence of radii, got {values!r}")
            radii = tuple(_radius(f"{name}[{i}]", v) for i, v in enumerate(values))
            object.__setattr__(self, name, radii)
        if len(self.eps_bias) != len(self.eps_weight):
            raise ValueError(
                f"eps_bias has {len(self.eps_bias)} entries, eps_weight {len(self.eps_weight)}: "
                "both need one per affine layer"
            )
        if self.eps_weight and len(self.eps_act) != len(self.eps_weight) - 1:
            raise ValueError(
                f"eps_act has {len(self.eps_act)} entries; {len(self.eps_weight)} affine layers "
                f"have {len(self.eps_weight) - 1} hidden ReLUs"
            )
        if self.input_clip is not None:
            object.__setattr__(self, "input_clip", _radius("input_clip", self.input_clip))
        if self.act_clip is not None:
            clips = tuple(
                None if c is None else _radius(f"act_clip[{j}]", c)
                for j, c in enumerate(self.act_clip)
            )
            if len(clips) != len(self.eps_act):
                raise ValueError(
                    f"act_clip has {len(clips)} entries, expected one per hidden ReLU "
                    f"({len(self.eps_act)})"
                )
            object.__setattr__(self, "act_clip", clips)

    @classmethod
    def uniform(cls, pert: Perturbation, n_affine: int) -> LayerPerturbation:
        """``pert``'s radii repeated for a network of ``n_affine`` affine layers (no clips)."""
        if not isinstance(n_affine, int) or n_affine < 1:
            raise ValueError(f"n_affine must be an integer >= 1, got {n_affine!r}")
        return cls(
            pert.eps_input,
            (pert.eps_weight,) * n_affine,
            (pert.eps_bias,) * n_affine,
            (pert.eps_act,) * (n_affine - 1),
        )

    @property
    def n_affine(self) -> int:
        return len(self.eps_weight)

    def clip(self, j: int) -> float | None:
        """The clip of hidden ReLU ``j`` (None: none)."""
        return None if self.act_clip is None else self.act_clip[j]


@torch.no_grad()
def _max_activation(model: nn.Module, X: Tensor) -> float:
    """Largest post-ReLU value of ``model`` (an ``nn.Sequential``) on ``X`` [N, C, H, W]."""
    if not isinstance(model, nn.Sequential):
        raise TypeError(
            f"activation ranges need an nn.Sequential model, got {type(model).__name__}"
        )
    best = 0.0
    for start in range(0, len(X), 1024):
        h = X[start : start + 1024]
        for layer in model:
            h = layer(h)
            if isinstance(layer, nn.ReLU) and h.numel():
                best = max(best, h.max().item())
    return best


def perturbation_between(model: nn.Module, quantized: nn.Module) -> Perturbation:
    """The smallest weight-and-bias ``Perturbation`` whose box contains ``quantized``.

    ``model`` and ``quantized`` must have the same layers (e.g. a float network and its
    post-training-quantised copy); inputs and activations are left unperturbed.
    """
    pairs = [
        (name, a, b)
        for (name, a), (_, b) in zip(model.named_modules(), quantized.named_modules(), strict=True)
        if isinstance(a, nn.Linear | nn.Conv2d)
    ]
    if not pairs:
        raise ValueError("model has no Linear or Conv2d layer")
    eps_w = eps_b = 0.0
    for name, a, b in pairs:
        if type(a) is not type(b) or a.weight.shape != b.weight.shape:
            raise ValueError(f"layer {name!r}: {a} and {b} do not match")
        eps_w = max(eps_w, (a.weight - b.weight).abs().max().item())
        if a.bias is not None:
            eps_b = max(eps_b, (a.bias - b.bias).abs().max().item())

    # Round outwards so that the float32 differences lie inside the box after any re-rounding.
    def outward(v: float) -> float:
        return math.nextafter(v, math.inf) if v > 0 else 0.0

    return Perturbation(eps_weight=outward(eps_w), eps_bias=outward(eps_b))


# The published fixed-point PTQ simulator lives in ``qlib.fixedpoint`` (it needs ``Perturbation``
# from here); its public names are re-exported lazily so that either module may be imported first.
_FIXEDPOINT = (
    "FixedPoint",
    "LayerQuant",
    "QuantizedInputs",
    "QuantizedMLP",
    "SimOutput",
    "PTQResult",
    "fixed_point",
    "quantize_inputs",
    "activation_maxima",
    "evaluate_fixed_point",
    "ptq_sweep",
)


def __getattr__(name: str):
    if name in _FIXEDPOINT:
        from qlib import fixedpoint

        return getattr(fixedpoint, name)
    raise AttributeError(f"module 'qlib.quant' has no attribute {name!r}")


__all__ = [
    "LayerPerturbation",
    "Perturbation",
    "UniformQuantizer",
    "perturbation_between",
    "symmetric_quantizer",
] + list(_FIXEDPOINT)
