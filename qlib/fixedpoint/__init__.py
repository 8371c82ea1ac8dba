"""The published fixed-point post-training quantisation simulator, with a certified bound beside
every measured error.

The feed-forward of Dang et al. (AISTATS 2025, ``quantization/compute_quantization_error_*.py``)
for a ReLU MLP ``Flatten, Linear, ReLU, ..., Linear``:

- weights and biases: signed, per tensor, range ``R = 2^ceil(log2 max|W|)``, step ``R 2^(1-b)``,
  codes ``-2^(b-1) .. 2^(b-1) - 1``, round to nearest (the published ``quantizeSigned``; a
  weight equal to ``R`` does not fit and saturates to ``R (1 - 2^(1-b))``). ``asymmetric=True``
  uses a min/max grid with a zero point instead: step ``(max - min) / (2^b - 1)`` over
  ``[min(W, 0), max(W, 0)]``, codes ``0 .. 2^b - 1``.
- inputs: the signed grid with ``R = 1`` (pixels in [0, 1]; a pixel near 1 saturates);
- hidden activations: ``relu``, clip to ``[0, R_a]``, unsigned grid of step ``R_a 2^-b_a``, codes
  ``0 .. 2^b_a - 1`` (``quantizeUnsigned``); ``R_a = 8`` as published for Fashion-MNIST, or a
  per-layer power of two from calibration data (``act_range="pow2"``);
- the logits are the last layer's exact output (not quantised).

Arithmetic is float64: every quantised value is a multiple of a power of two, so the sums of
products are exact (a fixed-point accumulator) as long as they fit in 53 bits, which they do
for the bit widths swept here; with ``asymmetric=True`` or ``act_range`` not a power of two
they are float64-rounded instead.

Certified bound. Every quantised network built here lies in a per-layer box
(``qlib.quant.LayerPerturbation``) around the float network: each layer's weights and biases
within half its own step, inputs and activations the clipped model ``min(v, T) + δ`` with ``T``
the top grid value and ``|δ|`` half a step. Saturation is handled soundly, not assumed away:
an input or activation beyond ``T`` is rounded to ``T`` exactly, which the clip models, so the
box holds for every input in [0, 1], not only the evaluated images; a saturated weight or bias
(a weight equal to its power-of-two range, or a forced ``weight_range``) widens its layer's
radius to the exact largest error, which is reported (``PTQResult.widened``). The bounds of
``qlib.bounds`` computed with this box are therefore sound for this exact quantised network,
and every saturation count is in each result.
"""

from qlib.fixedpoint.evaluation import PTQResult, evaluate_fixed_point, ptq_sweep
from qlib.fixedpoint.simulator import (
    FixedPoint,
    LayerQuant,
    QuantizedInputs,
    QuantizedMLP,
    SimOutput,
    activation_maxima,
    fixed_point,
    quantize_inputs,
)

__all__ = [
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
]
