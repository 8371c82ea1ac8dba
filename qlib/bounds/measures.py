"""Measures built on bounds: the worst-case discrepancy and the verified accuracy of a data set.

Each takes a bound method by name (``qlib.bounds.available_methods()``), so a method registered
later (``register_method``) is measured the same way as the built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.bounds.layers import layers
from qlib.bounds.margins import margin_bounds, margin_interval, margins_and_logits, margins_of
from qlib.bounds.methods import Method, Options, check_labels, logit_bounds
from qlib.bounds.values import Interval
from qlib.quant import LayerPerturbation, Perturbation

__all__ = [
    "Discrepancy",
    "Verification",
    "certified_discrepancy",
    "float_logits",
    "probability_bounds",
    "true_probability",
    "verified_accuracy",
    "worst_case_discrepancy",
]


@dataclass(frozen=True)
class Discrepancy:
    """Worst-case discrepancy between ``f`` and every perturbed network, per sample ``[N]``.

    ``d`` is the published measure on the true-class softmax probability:
    ``max(p_best - p0, p0 - p_worst)``, with ``p_best`` and ``p_worst`` bounded through the
    margins ``logit_y - logit_j`` (``probability_bounds``); ``logit_gap`` is
    ``max_j max(U_j - f_j, f_j - L_j)`` over the logit bounds ``lower`` and ``upper``.
    ``worst`` and ``worst_logit_gap`` are the data-set maxima.
    """

    d: Tensor
    logit_gap: Tensor
    p0: Tensor
    p_best: Tensor
    p_worst: Tensor
    lower: Tensor
    upper: Tensor
    worst: float
    worst_logit_gap: float


def worst_case_discrepancy(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation | LayerPerturbation,
    method: Method | str = "ibp",
    *,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
    logits: Tensor | None = None,
    margins: bool = True,
) -> Discrepancy:
    """Bound the published discrepancy for every sample of ``X`` [N, ...] with labels ``y`` [N]
    by ``method`` (any name of ``available_methods()``), computed in ``dtype`` (see
    ``logit_bounds``): one pass bounds both sides of every margin and every logit
    (``margins_and_logits``, ``4C - 2`` rows instead of ``logit_bounds``' ``2C``: on the MNIST
    4x256 MLP 1.5x its time with ``"crown"``, 2.4x with ``"crown-ibp"``). ``logits``:
    ``float_logits(model, X)`` when the caller already has them (they do not depend on
    ``pert``). ``margins=False``: the published bound, each logit at its own end of
    ``logit_bounds`` (faster, looser)."""
    if margins:
        m, box = margins_and_logits(model, X, y, pert, method, options=options, dtype=dtype)
        y = check_labels(y, len(X), box.lower.shape[1])
    else:
        box = Interval(*logit_bounds(model, X, pert, method, options=options, dtype=dtype))
        y = check_labels(y, len(X), box.lower.shape[1])
        m = margins_of(box, y)
    lower, upper = box.lower.double(), box.upper.double()
    if logits is None:
        with torch.no_grad():
            f = float_logits(model, X)
    elif logits.shape != lower.shape:
        raise ValueError(f"logits must have shape {tuple(lower.shape)}, got {tuple(logits.shape)}")
    else:
        f = logits.double()
    p0 = true_probability(f, y)
    p = _probability(m)
    d = torch.maximum(p.upper - p0, p0 - p.lower)
    gap = torch.maximum(upper - f, f - lower).amax(1)
    return Discrepancy(d, gap, p0, p.upper, p.lower, lower, upper, d.max().item(), gap.max().item())


def probability_bounds(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation | LayerPerturbation,
    method: Method | str = "ibp",
    *,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
) -> Interval:
    """Bounds ``[N]`` on the true-class softmax probability of every perturbed network.

    ``p_y = 1 / sum_j exp(-(logit_y - logit_j))`` falls as any margin falls, so the ends of
    ``margin_interval`` give its ends: tighter than taking each logit at its own end, and with
    18 rows per image instead of ``worst_case_discrepancy``'s 38 (which bounds the logits too).
    ``max(upper - p0, p0 - lower)`` is then the published discrepancy, certified. Both ends are
    widened by 1e-13 for the rounding of ``exp`` and ``log``, which are not correctly rounded.
    """
    return _probability(margin_interval(model, X, y, pert, method, options=options, dtype=dtype))


def certified_discrepancy(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation | LayerPerturbation,
    method: Method | str = "ibp",
    *,
    p0: Tensor | None = None,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> Tensor:
    """Per sample ``[N]`` the certified discrepancy ``max(p_best - p0, p0 - p_worst)`` from
    ``probability_bounds``, at about half its cost: the upper margins, which bound ``p_best``,
    are back-substituted only for the samples where they can decide it.

    The lower margins give ``p_worst``; the logit interval gives a first ``p_best``. Where that
    one already has ``p_best - p0 <= p0 - p_worst``, no tighter ``p_best`` can change the result,
    which is ``p0 - p_worst``, as sound as ``probability_bounds``' (on the Fashion-MNIST MLP's
    genome boxes this held for about seven images in eight). Images with ``p0 < 1/2``, whose
    probability can rise further than it can fall, get their upper margins in the same pass
    (there they decided, for every genome of a search); any other image where the upper side
    may decide gets it from a second back-substitution on its slices of the same intervals. NaN
    where a bound is not finite. ``p0``: the nominal true-class probabilities ``[N]`` (float64),
    if the caller has them; ``chunk``: samples per pass (``margins_and_logits``)."""
    if p0 is None:
        with torch.no_grad():
            f = float_logits(model, X)
        p0 = true_probability(f, check_labels(y, len(X), f.shape[1]))
    elif p0.shape != (len(X),):
        raise ValueError(f"p0 must have shape ({len(X)},), got {tuple(p0.shape)}")

    def need(margins: Interval, start: int) -> Tensor:
        p, q = _probability(margins), p0[start : start + len(margins.lower)]
        return p.upper - q > q - p.lower

    margins, _ = margins_and_logits(
        model,
        X,
        y,
        pert,
        method,
        options=options,
        dtype=dtype,
        chunk=chunk,
        upper=need,
        logits=False,
        upper_first=p0 < 0.5,
    )
    p = _probability(margins)
    return torch.maximum(p.upper - p0, p0 - p.lower)


def true_probability(logits: Tensor, y: Tensor) -> Tensor:
    """The softmax probability ``[N]`` of the true class ``y`` [N] under ``logits`` [N, C]: the
    nominal ``p0`` that a discrepancy is measured from."""
    return torch.softmax(logits, 1).gather(1, y.long()[:, None])[:, 0]


# exp and log are not correctly rounded, but the C library keeps them within a few units in the
# last place: probabilities (all <= 1) computed in float64, the nominal one included, are within
# about 1e-15 of their exact values. Widening the bounds by 1e-13 covers that and the rounding of
# the discrepancy's subtraction, so that the certified discrepancy bounds the exact one.
_PROBABILITY_SLACK = 1e-13


def _probability(margins: Interval) -> Interval:
    """Bounds on ``p_y = 1 / sum_j exp(-(logit_y - logit_j))`` from bounds on its margins."""
    lower, upper = margins.lower.double(), margins.upper.double()
    p_lower = torch.exp(-torch.logsumexp(-lower, 1)) - _PROBABILITY_SLACK
    p_upper = torch.exp(-torch.logsumexp(-upper, 1)) + _PROBABILITY_SLACK
    return Interval(p_lower.clamp(min=0.0), p_upper.clamp(max=1.0))


def float_logits(model: nn.Module, X: Tensor) -> Tensor:
    """The nominal network's logits ``[N, C]`` evaluated in float64 (every delta zero)."""
    h = X.to(torch.float64)
    for layer in layers(model, X.shape[1:]):
        h = layer.perturbed(h)
    return h


@dataclass(frozen=True)
class Verification:
    """Which samples ``[N]`` are certified: every perturbed network predicts the label."""

    verified: Tensor
    correct: Tensor
    accuracy: float
    clean_accuracy: float


def verified_accuracy(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation | LayerPerturbation,
    method: Method | str = "ibp",
    *,
    margin: bool = False,
    options: Options | None = None,
) -> Verification:
    """Fraction of samples whose true logit provably beats every other logit.

    ``margin=False``: ``L_y > max_{j != y} U_j``. ``margin=True``: bound ``logit_y - logit_j``
    directly (``margin_bounds``), which is tighter.
    """
    if margin:
        verified = (margin_bounds(model, X, y, pert, method, options=options) > 0).all(1)
        y = y.long()
    else:
        lower, upper = logit_bounds(model, X, pert, method, options=options)
        y = check_labels(y, len(X), lower.shape[1])
        hot = F.one_hot(y, lower.shape[1]).bool()
        verified = lower.gather(1, y[:, None]).squeeze(1) > upper.masked_fill(hot, -torch.inf).amax(
            1
        )
    with torch.no_grad():
        correct = float_logits(model, X).argmax(1) == y
    return Verification(
        verified, correct, verified.double().mean().item(), correct.double().mean().item()
    )
