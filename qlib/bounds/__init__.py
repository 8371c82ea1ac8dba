"""Sound bounds on the logits of every quantised version of a float ReLU network.

The perturbation model (``qlib.quant.Perturbation``): inputs ``x̂ ∈ [x - eps_x, x + eps_x] ∩ [0, 1]``,
every affine layer computes ``ẑ = (W + ΔW) ĥ + (b + Δb)`` with ``|ΔW| <= eps_w``, ``|Δb| <= eps_b``
entrywise, and every hidden ReLU outputs ``ĥ = relu(ẑ) + δ >= 0`` with ``|δ| <= eps_a``.

Two ways to bound the logits ``[N, classes]``:

- ``"ibp"``: interval bound propagation with the exact interval product for
  ``(W + ΔW) x + (b + Δb)`` on a non-negative input ``x ∈ [l, l + d]``: the weight's upper end
  ``Wu = W + eps_w`` maximises every term and its lower end ``Wl = W - eps_w`` minimises it, so
  the output lies between ``W l - eps_w Σl + Wl⁻ d + b - eps_b`` and ``W l + eps_w Σl + Wu⁺ d + b
  + eps_b``: three products (the base ``W l`` and two rises over the width). It is tighter than
  the centre-radius rule (radius ``|W| r + eps_w Σ_j max(|l_j|, |u_j|) + eps_b``) by
  ``eps_w (u_j - l_j)`` per term. (The published code adds ``eps_w ||c||_1`` to the centre
  instead of the radius, which is unsound.)
- linear bounds (CROWN-style back-substitution). Every layer input ``h`` is non-negative, so for a
  fixed ``h`` the reachable ``c^T ẑ`` is exactly ``c^T (W h + b) ± ||c||_1 (eps_w 1^T h + eps_b)``;
  back-substituting a row ``c`` gives the lower bound ``(W^T c - eps_w ||c||_1 1)^T h + c^T b -
  eps_b ||c||_1``, linear in ``h``. ReLUs with activation perturbation are relaxed through
  ``relu(ẑ - eps_a) <= ĥ <= relu(ẑ) + eps_a``. ``"crown-ibp"`` takes the pre-activation bounds
  from IBP (``CrownIbpOptions(stop=1)`` ends the logits' back-substitution at the first hidden
  layer's IBP interval, skipping the widest layer), ``"crown"`` back-substitutes for every hidden layer too (intersected with IBP).
  Only the hidden neurons whose relaxation depends on their bounds (``unstable``: the IBP
  interval straddles 0 or ``eps_a``) are back-substituted, each sample its own rows; the others
  keep their IBP interval, and since any sub-interval gives them the same relaxation the logit
  bounds equal those of back-substituting every neuron (``CrownOptions(unstable_only=False)``).
  ``"crown-fast"`` is CROWN-IBP plus back-substituted bounds for only ``FastOptions.rows`` (neuron, side)
  pairs per sample of the last hidden layer, the unstable neurons with the largest relaxation gap
  times logit weight, down to the input of the affine layer two before the logits (as are the
  logits): the cost-effective middle between the two on deep MLPs (see
  ``benchmarks/bench_bounds.py``). Which rows are chosen affects only tightness, never soundness.

Per-layer boxes (``qlib.quant.LayerPerturbation``): every method also takes one radius per
affine layer and per hidden ReLU, and optional clips: a hidden ReLU with clip ``c`` outputs
``min(relu(ẑ), c) + δ`` (a saturating quantiser; ``layers.clip_relaxation`` bounds it), an input
clip makes the input ``min(x, c) + δ >= 0``. ``perlayer.resolve`` gives each layer its own scalar
``Perturbation`` (``Clipped`` where a clip applies); a uniform ``Perturbation`` is passed to every
layer unchanged. A caller that bounds one batch under many boxes (an exploration's genomes) may
wrap its calls in ``memo.remember_intervals``: an affine layer's IBP interval is then reused
when the same weights meet the same radii and an equal input interval.

For convolutions the weight kernel is shared across positions, but the bounds let every output
position pick its own ``ΔW``: a superset of the real networks, so sound (and only slightly loose).

Numerics: every bound is rounded outward (``qlib.bounds.rounding``: a rigorous margin for the
rounding of every product, sum and concretisation, under round-to-nearest in any summation
order), so it holds for the floating-point numbers computed, not only in exact arithmetic.
float64 is the default. float32 is 1.4-1.9x as fast, and its IBP is within 1.5e-5 (relative)
of float64's, because the base product ``W l`` of every Linear layer is computed in float64 (its
rounding error scales with ``|W| l``, far larger than a narrow box's width) and only the rises
over the width in float32, summed in quarters (``Linear.rises``). The linear methods'
back-substitution is float32 but for its last step, which takes ``A W l`` as ``A (W l)`` with that
float64 base, so that the float32 coefficients meet only the box's width
(``Affine.concretise``). The rigorous margins of the other steps (``gamma_n`` with ``u = 2^-24``
and ``n`` the roundings a coefficient passes through; products over 256 or more outputs are
summed in parts to keep ``n`` small, ``Linear.apply_t_in_parts`` and ``base.split_sum``) made
the logit bounds of the MNIST 4x256 MLP at eps = 1/1023 8e-5 (CROWN-IBP, 1.9x as fast), 1.0e-4
(``crown-fast``, 128 rows) and 1.6e-4 (``crown``, stop 1) looser (``benchmarks/bench_bounds.py``).
The default stays float64: it is the tighter for every method, two of them miss the 1e-4 the
book accepts, and the book sets bounds beside exact MILP optima, where float32's last digits
would show. Pass ``dtype=torch.float32`` when speed matters more (the certified exploration
does).
The differentiable path of certified training computes no margins (it needs gradients, not
certificates).

The network is an ``nn.Sequential`` of Linear, Conv2d, ReLU and Flatten; a ReLU must follow every
affine layer except the last, which gives the logits.

Modules: ``values`` (``Interval``, ``LinearBound``), ``base``, ``affine``, ``linear``, ``conv``
and ``relu`` (the per-layer objects with their IBP, back-substitution and concrete perturbed
rules), ``layers`` (``layers(model, in_shape)``), ``propagation`` (``forward_bounds``,
``backsubstitute``, ``unstable``), ``methods`` (``logit_bounds``, ``bound_coefficients`` and the
registry of methods by name), ``margins`` (``margin_bounds``, ``margin_interval``,
``margins_and_logits``), ``measures`` (``worst_case_discrepancy``, ``probability_bounds``,
``certified_discrepancy``, ``verified_accuracy``).
"""

from qlib.bounds.layers import (
    Affine,
    Clipped,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    ReLU,
    RowDelta,
    clip_of,
    layers,
)
from qlib.bounds.margins import margin_bounds, margin_interval, margins_and_logits
from qlib.bounds.measures import (
    Discrepancy,
    Verification,
    certified_discrepancy,
    float_logits,
    probability_bounds,
    verified_accuracy,
    worst_case_discrepancy,
)
from qlib.bounds.methods import (
    METHODS,
    BoundMethod,
    LogitBounds,
    Method,
    available_methods,
    bound_coefficients,
    logit_bounds,
    register_method,
)
from qlib.bounds.perlayer import Resolved, resolve
from qlib.bounds.propagation import (
    CrownIbpOptions,
    CrownOptions,
    FastOptions,
    backsubstitute,
    forward_bounds,
    input_box,
    unstable,
)
from qlib.bounds.values import Interval, LinearBound

__all__ = [
    "METHODS",
    "Affine",
    "BoundMethod",
    "Clipped",
    "Conv2d",
    "CrownIbpOptions",
    "CrownOptions",
    "Discrepancy",
    "FastOptions",
    "Flatten",
    "Interval",
    "Layer",
    "Linear",
    "LinearBound",
    "LogitBounds",
    "Method",
    "ReLU",
    "Resolved",
    "RowDelta",
    "Verification",
    "available_methods",
    "backsubstitute",
    "bound_coefficients",
    "certified_discrepancy",
    "clip_of",
    "float_logits",
    "forward_bounds",
    "input_box",
    "layers",
    "logit_bounds",
    "margin_bounds",
    "margin_interval",
    "margins_and_logits",
    "probability_bounds",
    "register_method",
    "resolve",
    "unstable",
    "verified_accuracy",
    "worst_case_discrepancy",
]
