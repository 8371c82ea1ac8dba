"""From a genome to a certificate: the per-layer box that contains its fake-quantised network.

``genome_box(qnet, genome)`` builds the ``qlib.quant.LayerPerturbation`` around the float model
that provably contains the ModelOpt fake-quantised network of ``genome``, as it is computed in
float32 (``qlib.explore.fakequant``):

- weights: ``eps_weight[k]`` is the measured ``max |W - q(W)|`` of layer ``k``, ``q`` being the
  layer's own ModelOpt weight quantiser at the genome's bits (per tensor, its own max as range);
- layer inputs: the input quantiser of layer ``k`` (signed, not narrow: ModelOpt's default;
  scale ``s = fl32(M / amax)``, ``M = 2^(b-1) - 1``) computes ``fl32(clamp(round(fl32(x s)), -M-1,
  M) / s)``, which for ``x >= 0`` equals ``min(x, M / s) + δ`` with ``|δ| <= 0.5 / s + 2.02 u
  M / s`` (``u = 2^-24``: the rounding of the product and of the division). So the clip is
  ``M / s`` and the radius ``0.5 / s + 3 u M / s``; for layer 0 they are the input's
  (``input_clip``, ``eps_input``), for layer ``k > 0`` those of the hidden ReLU before it;
- float32 evaluation: ``fl32(W_q h + b) = W_q h + b + e`` with ``|e| <= gamma_{n+2} (|W_q| h +
  |b|)`` for a fan-in of ``n`` in any summation order (``qlib.bounds.rounding``), and ``h`` is at
  most the clip plus the radius, so ``e`` joins the box as ``eps_bias[k]`` (biases are not
  quantised). This assumes dot products (direct or im2col convolutions, as PyTorch's CPU
  kernels compute them), not Winograd or FFT convolutions.

``Certifier`` bounds a box over a fixed set of images with a named bound method and returns a
``Certificate``: the certified mean discrepancy (``kind="discrepancy"``: the published measure on
the true-class probability, per image, averaged; bounded through the margins
``logit_y - logit_j``, ``bounds.certified_discrepancy``) or the certified accuracy at a margin
(``kind="accuracy"``). A box whose every bound is vacuous is ``"uncertifiable"`` (value 1 or 0),
never an error.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from qlib import bounds
from qlib.bounds import rounding
from qlib.bounds.base import checked_once, version
from qlib.bounds.measures import true_probability
from qlib.bounds.memo import IntervalMemo, remember_intervals
from qlib.quant import LayerPerturbation

__all__ = [
    "CERTIFIED_KINDS",
    "Certificate",
    "CertifyError",
    "Certifier",
    "check_certifiable",
    "genome_box",
    "quantizer_clip",
]

CERTIFIED_KINDS = ("discrepancy", "accuracy")
_U32 = 2.0**-24


class CertifyError(ValueError):
    """A model or quantised network that the certified objective cannot handle."""


def _up(x: float) -> float:
    return math.nextafter(x, math.inf)


def quantizer_clip(amax: float, bits: int, unsigned: bool = False) -> tuple[float, float]:
    """``(clip, radius)`` of a ModelOpt integer quantiser on non-negative inputs: its output is
    ``min(x, clip) + δ`` with ``|δ| <= radius`` (see the module docstring)."""
    if not math.isfinite(amax) or amax < 0:
        raise CertifyError(f"amax must be finite and >= 0, got {amax!r}")
    max_bound = 2.0 ** (bits - 1 + int(unsigned)) - 1.0
    amax32 = torch.tensor(amax, dtype=torch.float32)
    if float(amax32) <= 1.0 / (1 << 24):  # ModelOpt quantises everything to 0
        return 0.0, 0.0
    scale = float(torch.tensor(max_bound, dtype=torch.float32) / amax32)
    clip = max_bound / scale
    return clip, _up((0.5 / scale + 3 * _U32 * clip) * (1 + 1e-12))


def _affine_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear | nn.Conv2d)]


# A layer's part of the box depends only on its own bits, range and weights: remembered per
# module, so that a run pays ModelOpt's weight quantiser once per layer and bit width rather than
# once per genome (it was about a tenth of a certificate's time on the Fashion MLP). Two levels:
# the whole part per (input bits, weight bits), and the weight quantiser's share per weight bits
# alone, which a search meets again with every input bit width.
_LAYER_BOXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Per quantised model, the lists of quantised layers found to hold every affine layer (a walk
# over its modules per genome otherwise).
_COMPLETE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _layer_box(name: str, m: nn.Module, iq: nn.Module, wq: nn.Module) -> tuple[float, ...]:
    """``(clip, radius, eps_weight, eps_bias)`` of quantised layer ``m`` at its current bits
    (``iq``, ``wq``: its input and weight quantisers)."""
    if iq.amax is None:
        raise CertifyError(f"layer {name!r} has no calibrated input range (amax)")
    W = m.weight.detach()
    weight_key = (
        int(wq.num_bits),
        bool(wq.is_enabled),
        None if wq.amax is None else tuple(wq.amax.flatten().tolist()),
        version(m.weight),
    )
    key = (
        float(iq.amax),
        int(iq.num_bits),
        bool(iq.unsigned),
        weight_key,
        None if m.bias is None else version(m.bias),
    )
    memo = _LAYER_BOXES.setdefault(m, {})
    if key in memo:
        return memo[key]
    if ("weight", weight_key) not in memo:
        with torch.no_grad():
            Wq = wq(W) if wq.is_enabled else W
        diff = (W.double() - Wq.double()).abs().max().item()  # exact: float32 differences
        memo["weight", weight_key] = diff, Wq.double().abs().reshape(len(W), -1).sum(1)
    diff, abs_rows = memo["weight", weight_key]
    clip, radius = quantizer_clip(key[0], key[1], key[2])
    h_max = _up(clip + radius)
    b = torch.zeros(len(W), dtype=torch.float64) if m.bias is None else m.bias.double().abs()
    row = abs_rows * h_max + b
    n = W[0].numel() + 2
    e = rounding.factor(n, torch.float32) * row.max().item() * (1 + 1e-9)
    e += rounding.underflow(n, torch.float32)
    memo[key] = clip, radius, _up(diff) if diff > 0 else 0.0, _up(e)
    return memo[key]


def genome_box(qnet, genome: Sequence[int]) -> LayerPerturbation:
    """The per-layer box around the float weights that contains ``qnet``'s network at ``genome``.

    ``qnet`` is a ``fakequant.QuantNet`` whose every Linear and Conv2d layer is quantised (input
    and weight) and has a calibrated input range; its bits are set to ``genome``. Raises
    ``CertifyError`` naming the layer otherwise.
    """
    qnet.set_bits(genome)
    complete = _COMPLETE.setdefault(qnet.model, set())
    if tuple(qnet.layers) not in complete:
        names = _affine_names(qnet.model)
        if list(qnet.layers) != names:
            missing = [n for n in names if n not in qnet.layers]
            raise CertifyError(
                f"layers {missing} are not quantised: a certificate needs every Linear and Conv2d "
                "layer quantised (workload key layers: conv+linear)"
            )
        complete.add(tuple(qnet.layers))
    clips, radii, eps_w, eps_b = [], [], [], []
    for name, parts in zip(qnet.layers, qnet.quantized(), strict=True):
        clip, radius, ew, eb = _layer_box(name, *parts)
        clips.append(clip)
        radii.append(radius)
        eps_w.append(ew)
        eps_b.append(eb)
    return LayerPerturbation(
        eps_input=radii[0],
        eps_weight=tuple(eps_w),
        eps_bias=tuple(eps_b),
        eps_act=tuple(radii[1:]),
        input_clip=clips[0],
        act_clip=tuple(clips[1:]),
    )


def check_certifiable(model: nn.Module, in_shape: Sequence[int], method: str) -> None:
    """Raise ``CertifyError`` naming the layer or method when ``model`` cannot be certified."""
    if method not in bounds.available_methods():
        raise CertifyError(
            f"unknown bound method {method!r}; expected one of {bounds.available_methods()}"
        )
    try:
        bounds.layers(model, in_shape)
    except (TypeError, ValueError) as e:
        raise CertifyError(f"bound method {method!r} cannot bound this model: {e}") from None


@dataclass(frozen=True)
class Certificate:
    """What a box certifies on the certification images: ``value`` (minimised: the mean certified
    discrepancy, or minus the certified accuracy), ``status`` (``"certified"`` or
    ``"uncertifiable"``: every bound vacuous), ``discrepancy`` (mean certified discrepancy,
    ``nan`` for the accuracy kind), ``verified`` (certified accuracy, ``nan`` for the discrepancy
    kind), ``seconds``."""

    value: float
    status: str
    discrepancy: float
    verified: float
    seconds: float


@dataclass
class Certifier:
    """Bounds boxes on ``X`` [N, *in_shape] with labels ``y`` [N] by ``method`` in ``dtype``
    (``"float64"`` or ``"float32"``); picklable. ``stop`` (``"crown-ibp"`` only): the logits are
    back-substituted to the input of that affine layer (``bounds.CrownIbpOptions``)."""

    X: Tensor
    y: Tensor
    method: str = "crown-ibp"
    kind: Literal["discrepancy", "accuracy"] = "discrepancy"
    margin: float = 0.0
    dtype: Literal["float64", "float32"] = "float64"
    stop: int = 0
    # (weak reference to the model, its parameters' versions, its float64 logits on X): the
    # same for every genome, so computed once.
    _nominal: tuple | None = field(default=None, init=False, repr=False, compare=False)
    # The IBP intervals of layers whose radii and input repeat between genomes (most often the
    # first: its bits recur across a search), per process.
    _memo: IntervalMemo = field(default_factory=IntervalMemo, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in CERTIFIED_KINDS:
            raise CertifyError(f"certified kind {self.kind!r}; expected one of {CERTIFIED_KINDS}")
        if self.method not in bounds.available_methods():
            raise CertifyError(
                f"unknown bound method {self.method!r}; expected one of "
                f"{bounds.available_methods()}"
            )
        if self.dtype not in ("float64", "float32"):
            raise CertifyError(f"dtype must be 'float64' or 'float32', got {self.dtype!r}")
        if self.stop and self.method != "crown-ibp":
            raise CertifyError(
                f"stop={self.stop} applies to method 'crown-ibp' only, got {self.method!r}"
            )

    @property
    def options(self) -> bounds.CrownIbpOptions | None:
        return bounds.CrownIbpOptions(self.stop) if self.stop else None

    def nominal(self, model: nn.Module) -> Tensor:
        """``bounds.float_logits(model, X)``, computed once per model and weights."""
        versions = tuple(version(p) for p in model.parameters())
        hit = self._nominal
        if hit is None or hit[0]() is not model or hit[1] != versions:
            # An ordinary tensor even when a certificate (inference mode) asks first: a caller
            # may change what this returns in place.
            with torch.inference_mode(False), torch.no_grad():
                hit = self._nominal = (
                    weakref.ref(model),
                    versions,
                    bounds.float_logits(model, self.X),
                )
        return hit[2]

    def __getstate__(self) -> dict:
        # A weak reference does not pickle; the memo starts afresh in each worker.
        return {**self.__dict__, "_nominal": None, "_memo": IntervalMemo()}

    def __call__(self, model: nn.Sequential, box: LayerPerturbation) -> Certificate:
        t0 = time.perf_counter()
        # Inference mode, not just no_grad: a certificate is over a thousand small operations,
        # and skipping autograd's bookkeeping (version counters, views) took about a tenth off
        # it on the Fashion MLP with one thread or two (the accuracy evaluation, a few large
        # products, gained nothing). Whatever it leaves in caches is an inference tensor, which
        # later code outside the mode may read but not change in place or save for backward.
        with torch.inference_mode(), remember_intervals(self._memo), checked_once():
            return self._certify(model, box, t0)

    def _certify(self, model: nn.Sequential, box: LayerPerturbation, t0: float) -> Certificate:
        dtype = getattr(torch, self.dtype)
        if self.kind == "discrepancy":
            p0 = true_probability(self.nominal(model), self.y)
            d = bounds.certified_discrepancy(
                model, self.X, self.y, box, self.method, p0=p0, options=self.options, dtype=dtype
            )
            finite = d.isfinite()
            # Vacuous: the bound allows the true-class probability to reach both 0 and 1.
            useful = finite & (d < torch.maximum(p0, 1 - p0) - 1e-9)
            d = torch.where(finite, d, torch.ones_like(d)).clamp(0, 1)
            value = d.mean().item() if useful.any() else 1.0
            status = "certified" if useful.any() else "uncertifiable"
            return Certificate(value, status, value, math.nan, time.perf_counter() - t0)
        low = bounds.margin_bounds(
            model, self.X, self.y, box, self.method, options=self.options, dtype=dtype
        )
        verified = torch.nan_to_num(low, nan=-math.inf).gt(self.margin).all(1)
        acc = verified.double().mean().item()
        status = "certified" if verified.any() else "uncertifiable"
        return Certificate(-acc, status, math.nan, acc, time.perf_counter() - t0)
