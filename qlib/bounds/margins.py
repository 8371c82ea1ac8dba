"""Bounds on the margins ``logit_y - logit_j`` by any bound method of ``methods``: lower bounds
(``margin_bounds``), both ends (``margin_interval``), and both with the logits from one pass
(``margins_and_logits``), the margins back-substituted directly as spec rows ``±(e_y - e_j)``
for the built-in methods.

Shape letters: ``N`` samples, ``C`` classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.bounds import rounding
from qlib.bounds.base import checked_once
from qlib.bounds.layers import Layer, layers
from qlib.bounds.methods import (
    METHODS,
    Method,
    Options,
    _bound_dtype,
    _check_inputs,
    _check_method,
    _unless_overflow,
    check_labels,
    logit_bounds,
)
from qlib.bounds.perlayer import AnyPerturbation, Resolved, resolve
from qlib.bounds.propagation import backsubstitute, chunk_size, forward_bounds, logit_stop, numel
from qlib.bounds.values import Interval, LinearBound

__all__ = ["margin_bounds", "margin_interval", "margins_and_logits", "margins_of"]


def margin_bounds(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: AnyPerturbation,
    method: Method | str = "ibp",
    *,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> Tensor:
    """Lower bounds ``[N, C]`` on ``logit_y - logit_j`` (entry ``y`` is +inf).

    For the built-in methods the difference is bounded directly with the spec matrix
    ``C = e_y - e_j`` back-substituted through the last affine layer (``"ibp"``: then the IBP
    interval of its input) or the whole network (linear methods). The same pass bounds every
    logit, and the result is the larger of the two sound bounds ``C``-spec and ``L_y - U_j``, so
    it is never looser than the latter. A registered method gives ``L_y - U_j`` from its logit
    bounds.
    """
    margins, _ = margins_and_logits(
        model, X, y, pert, method, options=options, dtype=dtype, chunk=chunk, upper=False
    )
    y = check_labels(y, len(X), margins.lower.shape[1])
    return margins.lower.masked_fill(F.one_hot(y, margins.lower.shape[1]).bool(), float("inf"))


def margin_interval(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: AnyPerturbation,
    method: Method | str = "ibp",
    *,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> Interval:
    """Lower and upper bounds, each ``[N, C]``, on ``logit_y - logit_j`` (entry ``y`` is 0).

    Both sides come from one pass with the ``2 (C - 1)`` spec rows ``±(e_y - e_j)``, each side
    the tighter of that bound and the one from the logit interval of the pass (for the linear
    methods its IBP interval, for a registered method its logit bounds). A margin cancels what
    moves every logit alike, so its interval is narrower than the difference of two logit
    intervals: on the Fashion-MNIST MLP's genome boxes it certified a third less discrepancy
    (``qlib.explore.certify``), at the cost of 18 rows instead of 20.
    """
    margins, _ = margins_and_logits(
        model, X, y, pert, method, options=options, dtype=dtype, chunk=chunk, logits=False
    )
    return margins


@checked_once()
def margins_and_logits(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: AnyPerturbation,
    method: Method | str = "ibp",
    *,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
    upper: bool | Callable[[Interval, int], Tensor] = True,
    logits: bool = True,
    upper_first: Tensor | None = None,
) -> tuple[Interval, Interval]:
    """Bounds ``[N, C]`` on the margins ``logit_y - logit_j`` (entry ``y`` is 0) and on the logits,
    from one pass per chunk of samples.

    For the built-in methods the spec rows are ``e_y - e_j`` for ``j != y``, then (``upper``)
    their negations, then (``logits``) ``±I``, all back-substituted like the logits of
    ``logit_bounds``. Each margin side is the tighter of its spec row and of the difference of
    the logit bounds; each logit bound the tighter of its row and of IBP's. Without ``upper``
    the upper margins, and without ``logits`` the logits, come from the logit interval alone (the
    IBP interval, for the linear methods). ``upper`` may instead select the samples that need
    their upper margins: called with a chunk's margins (upper ends from the logit interval) and
    the index of its first sample, it returns a mask ``[n]``, and the negated rows are then
    back-substituted for those samples only, on the chunk's intervals; ``upper_first`` (a mask
    ``[N]``, without ``logits``) names samples whose upper margins go into the first pass, as
    extra samples (a guess: the second pass takes those it missed). A registered method gives
    its logit bounds and their differences. float32 bounds that overflow are recomputed in
    float64 with a warning.
    """
    _check_method(method, options)
    _check_inputs(model, X, pert)
    if method not in METHODS:
        lower, upper_ = logit_bounds(
            model, X, pert, method, options=options, dtype=dtype, chunk=chunk
        )
        y = check_labels(y, len(X), lower.shape[1])
        box = Interval(lower, upper_)
        return margins_of(box, y, None, upper), box
    dtype = _bound_dtype(model, dtype)
    net = layers(model, X.shape[1:])
    pert = resolve(net, pert)
    classes = numel(net[-1].out_shape)
    if len(net[-1].out_shape) != 1:
        raise ValueError("margin bounds need a flat logit layer [N, classes]")
    y = check_labels(y, len(X), classes)
    if upper_first is not None and upper_first.shape != (len(X),):
        raise ValueError(
            f"upper_first must be a mask of shape ({len(X)},), got {tuple(upper_first.shape)}"
        )
    both = upper is True
    rows = (classes - 1) * (2 if both else 1) + (2 * classes if logits else 0)
    step = chunk or chunk_size(len(X), rows, net)
    stop = 0 if method in ("crown-fast", "crown") else logit_stop(net, method, options)

    def bound(xs: Tensor, ys: Tensor, start: int, dt: torch.dtype) -> tuple[Interval, Interval]:
        n = len(xs)
        boxes = forward_bounds(net, xs, pert, method, options, dtype=dt)
        eye = torch.eye(classes, dtype=dt)
        C = eye[ys].unsqueeze(1) - eye.unsqueeze(0)  # [n, classes, classes]: row j = e_y - e_j
        C = C.gather(1, _others(ys, classes)[..., None].expand(-1, -1, classes))
        spec = [C, -C] if both else [C]
        if logits:
            spec += [eye.expand(n, -1, -1), -eye.expand(n, -1, -1)]
        spec = torch.cat(spec, 1)
        selective = callable(upper) and classes > 1
        first = torch.zeros(n, dtype=torch.bool)
        if selective and upper_first is not None and not logits:
            first = upper_first[start : start + n]
        ahead = first.nonzero()[:, 0]
        inputs = boxes
        if len(ahead):
            # Their upper rows go along in the same pass, as extra samples.
            inputs = _restrict(net, boxes, torch.cat([torch.arange(n), ahead]), stop)
            spec = torch.cat([spec, -C[ahead]])
        spec_bound = _spec_rows(spec)
        # One class has no margin: nothing to back-substitute.
        low = (
            backsubstitute(net, len(net) - 1, spec_bound, inputs, pert, stop)
            if spec.shape[1]
            else spec[..., 0]
        )
        low, low_ahead = low[:n], low[n:]
        box = Interval(boxes[-1].lower.flatten(1), boxes[-1].upper.flatten(1))
        if logits:
            end = spec.shape[1] - 2 * classes
            box = Interval(low[:, end : end + classes], -low[:, end + classes :]).intersect(box)
        margins = margins_of(box, ys, low, both)
        if selective:
            margins = _tighten_upper(margins, ahead, low_ahead, ys)
            need = upper(margins, start) & ~first
            margins = _upper_where(margins, need, net, boxes, pert, C, ys, stop)
        return margins, box

    parts = []
    with torch.no_grad():
        for start in range(0, len(X), step):
            xs, ys = X[start : start + step], y[start : start + step]
            # An overflowing chunk comes back in float64, and the concatenation promotes.
            part = _unless_overflow(
                lambda dt, xs=xs, ys=ys, start=start: bound(xs, ys, start, dt),
                dtype,
                lambda p: (t for iv in p for t in (iv.lower, iv.upper)),
            )
            parts.append(part)
    margins, logits = (
        Interval(torch.cat([p[k].lower for p in parts]), torch.cat([p[k].upper for p in parts]))
        for k in range(2)
    )
    return margins, logits


def _restrict(
    net: Sequence[Layer], boxes: Sequence[Interval], idx: Tensor, stop: int
) -> list[Interval]:
    """The samples ``idx`` (repeats allowed) of ``boxes[stop:]``, the input intervals of the layers
    that a back-substitution to ``net[stop]`` reads, made those layers' own; each ReLU keeps
    those samples' part of its remembered relaxation, each affine layer its part of the base
    product ``W l`` (``Layer.restrict``). The entries below ``stop`` stay as they
    are (gathering the input box alone cost a Fashion MLP certificate 4 % of its time)."""
    sub = list(boxes[:stop]) + [Interval(b.lower[idx], b.upper[idx]) for b in boxes[stop:]]
    for layer, box in zip(net[stop:], sub[stop:], strict=False):
        layer.restrict(idx, box)
    return sub


def _spec_rows(rows: Tensor) -> LinearBound:
    """Spec rows ``[n, S, C]`` as a bound with zero constant: differences ``±(e_y - e_j)`` and unit
    rows ``±e_j``, so at most two nonzero entries per row (``LinearBound.nonzeros``)."""
    return LinearBound(rows, rows.new_zeros(rows.shape[:2]), nonzeros=2)


def _tighten_upper(margins: Interval, idx: Tensor, low: Tensor, ys: Tensor) -> Interval:
    """``margins`` with the upper margins of samples ``idx`` tightened by ``-low`` [len(idx), C-1],
    the lower bounds of their rows ``e_j - e_y``."""
    if not len(idx):
        return margins
    others = _others(ys[idx], margins.upper.shape[1])
    upper = margins.upper[idx]
    upper = upper.scatter(1, others, torch.minimum(upper.gather(1, others), -low))
    return Interval(margins.lower, margins.upper.index_put((idx,), upper))


def _upper_where(
    margins: Interval,
    need: Tensor,
    net: Sequence[Layer],
    boxes: Sequence[Interval],
    pert: Resolved,
    C: Tensor,
    ys: Tensor,
    stop: int,
) -> Interval:
    """``margins`` with the upper margins of the samples in the mask ``need`` [n] tightened by
    back-substituting their rows ``e_j - e_y`` (``-C``) on those samples' slices of ``boxes``,
    the chunk's intervals: no second forward pass."""
    idx = need.nonzero()[:, 0]
    if not len(idx):
        return margins
    sub = _restrict(net, boxes, idx, stop)
    rows = -C[idx]
    low = backsubstitute(net, len(net) - 1, _spec_rows(rows), sub, pert, stop)
    return _tighten_upper(margins, idx, low, ys)


def margins_of(
    box: Interval, ys: Tensor, low: Tensor | None = None, upper: bool = True
) -> Interval:
    """Margin bounds ``[n, C]`` (entry ``y`` 0) from the logit interval ``box`` (rounded
    outward), tightened by the spec rows' lower bounds ``low`` if given (``e_y - e_j`` first,
    then, with ``upper``, ``e_j - e_y``)."""
    classes = box.lower.shape[1]
    lower = rounding.down(box.lower.gather(1, ys[:, None]) - box.upper)
    upper_ = rounding.up(box.upper.gather(1, ys[:, None]) - box.lower)
    if low is not None:
        others, k = _others(ys, classes), classes - 1
        lower = lower.scatter(1, others, torch.maximum(lower.gather(1, others), low[:, :k]))
        if upper:
            upper_ = upper_.scatter(
                1, others, torch.minimum(upper_.gather(1, others), -low[:, k : 2 * k])
            )
    hot = F.one_hot(ys, classes).bool()
    return Interval(lower.masked_fill(hot, 0.0), upper_.masked_fill(hot, 0.0))


def _others(ys: Tensor, classes: int) -> Tensor:
    """Per sample the ``classes - 1`` labels other than ``ys``, ascending: [n, classes - 1]."""
    j = torch.arange(classes - 1, device=ys.device).expand(len(ys), -1)
    return j + (j >= ys[:, None]).long()
