"""Bound methods by name: sound per-logit and per-margin bounds of a whole network.

``logit_bounds(model, X, pert, method)`` looks ``method`` up in a registry. The built-in methods
(``"ibp"``, ``"crown-ibp"``, ``"crown-fast"``, ``"crown"``; see the package docstring) share one
walk over the per-layer objects; a later method (an exact solver, say) plugs in with
``register_method`` and is then available to every measure (``worst_case_discrepancy``,
``verified_accuracy``) by its name.

Shape letters: ``N`` samples, ``C`` classes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.bounds import rounding
from qlib.bounds.base import DERIVED
from qlib.bounds.layers import Layer, ReLU, layers
from qlib.bounds.perlayer import AnyPerturbation, Resolved, check_perturbation, resolve
from qlib.bounds.propagation import (
    CrownIbpOptions,
    CrownOptions,
    FastOptions,
    backsubstitute,
    chunk_size,
    forward_bounds,
    identity_spec,
    logit_stop,
    numel,
)
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import Perturbation

__all__ = [
    "METHODS",
    "BoundMethod",
    "LogitBounds",
    "Method",
    "available_methods",
    "bound_coefficients",
    "check_labels",
    "logit_bounds",
    "margin_bounds",
    "margin_interval",
    "margins_and_logits",
    "margins_of",
    "register_method",
]

Method = Literal["ibp", "crown-ibp", "crown-fast", "crown"]
METHODS: tuple[str, ...] = ("ibp", "crown-ibp", "crown-fast", "crown")
Options = CrownOptions | FastOptions | CrownIbpOptions

# (model, X, pert, options, dtype, differentiable, chunk) -> (lower, upper), each [N, C]
BoundMethod = Callable[
    [nn.Module, Tensor, Perturbation, object, torch.dtype, bool, "int | None"],
    tuple[Tensor, Tensor],
]


@dataclass(frozen=True, eq=False)
class LogitBounds:
    """Sound bounds ``lower <= logit <= upper`` (each ``[N, C]``) from ``method`` in ``seconds``.

    Unpacks and indexes like the pair it replaces: ``lower, upper = logit_bounds(...)``.
    """

    lower: Tensor
    upper: Tensor
    method: str
    seconds: float

    def __iter__(self) -> Iterator[Tensor]:
        return iter((self.lower, self.upper))

    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> Tensor:
        return (self.lower, self.upper)[i]

    @property
    def width(self) -> Tensor:
        return self.upper - self.lower


_REGISTRY: dict[str, tuple[BoundMethod, type | None]] = {}


def register_method(
    name: str, fn: BoundMethod, *, options: type | None = None, replace: bool = False
) -> None:
    """Make ``fn`` available as ``method=name``; ``options`` is the type of its options object."""
    if name in _REGISTRY and not replace:
        raise ValueError(f"bound method {name!r} is already registered")
    _REGISTRY[name] = (fn, options)


def available_methods() -> tuple[str, ...]:
    """The names ``logit_bounds`` accepts."""
    return tuple(_REGISTRY)


def _check_method(method: str, options: object) -> BoundMethod:
    if method not in _REGISTRY:
        raise ValueError(f"method must be one of {available_methods()}, got {method!r}")
    fn, kind = _REGISTRY[method]
    if options is not None and (kind is None or not isinstance(options, kind)):
        expected = "no options" if kind is None else f"a {kind.__name__}"
        raise TypeError(
            f"method {method!r} takes {expected}, got options of type {type(options).__name__}"
        )
    return fn


def _check_inputs(model: nn.Module, X: Tensor, pert: AnyPerturbation) -> None:
    check_perturbation(pert)
    if not isinstance(X, Tensor) or X.ndim < 2 or len(X) == 0:
        raise ValueError(
            f"X must be a non-empty batch [N, *input_shape], got {getattr(X, 'shape', X)}"
        )
    arch = getattr(model, "arch", None)
    arch_shape = arch.get("in_shape") if isinstance(arch, dict) else None
    if arch_shape is not None and tuple(X.shape[1:]) != tuple(arch_shape):
        raise ValueError(
            f"X has sample shape {tuple(X.shape[1:])}, the model expects {tuple(arch_shape)}"
        )
    low, high = torch.aminmax(X)  # NaN comes out as NaN, and fails the test below
    if not (low >= 0 and high <= 1):
        raise ValueError("X must be finite and in [0, 1] (the nominal input must be a valid input)")


def logit_bounds(
    model: nn.Module,
    X: Tensor,
    pert: AnyPerturbation,
    method: Method | str = "ibp",
    *,
    options: Options | None = None,
    dtype: torch.dtype = torch.float64,
    differentiable: bool = False,
    chunk: int | None = None,
) -> LogitBounds:
    """Lower and upper bounds, each ``[N, C]``, on the logits of every perturbed network.

    ``X`` [N, *input_shape] in [0, 1]; ``pert``: a uniform ``Perturbation`` or a
    ``LayerPerturbation`` (per-layer radii and clips; the built-in methods take both, a
    registered method may refuse it); ``method``: a name of ``available_methods()``;
    ``dtype``: float64 by default, because float32's rigorous rounding margins cost the linear
    methods 0.04-0.08 % of width on the book's 4x256 MLP for a 2x speed-up (IBP less than
    0.005 %; see the package docstring); a float64
    model is always bounded in float64, and float32 bounds that overflow are recomputed in
    float64 with a warning.
    ``options``: the method's own (``CrownOptions`` for ``"crown"``, ``FastOptions`` for
    ``"crown-fast"``, ``CrownIbpOptions`` for ``"crown-ibp"``). ``differentiable=True`` keeps the autograd graph to the model parameters
    (for certified training). ``chunk`` samples are processed at a time (default: sized to bound
    memory).
    """
    fn = _check_method(method, options)
    _check_inputs(model, X, pert)
    dtype = _bound_dtype(model, dtype)
    start = time.perf_counter()
    # Training needs gradients, not certificates: no margins on the differentiable path.
    with rounding.outward(rounding.enabled() and not differentiable):
        lower, upper = _unless_overflow(
            lambda dt: fn(model, X, pert, options, dt, differentiable, chunk), dtype, lambda b: b
        )
    return LogitBounds(lower, upper, method, time.perf_counter() - start)


def _unless_overflow(compute: Callable, dtype: torch.dtype, tensors: Callable) -> object:
    """``compute(dtype)``; computed again in float64, with a warning, when a float32 result has a
    non-finite entry among ``tensors(result)``."""
    out = compute(dtype)
    if dtype == torch.float32 and not all(t.isfinite().all() for t in tensors(out)):
        warnings.warn(
            "bounds overflowed float32 (eps too large for this network); computed again in float64",
            RuntimeWarning,
            stacklevel=3,
        )
        out = compute(torch.float64)
    return out


def _finite(p: Tensor) -> bool:
    """Whether ``p`` is finite, checked once per version of it: an exploration bounds one model
    under many boxes, and checking every weight each time took 0.3 ms of a 15 ms certificate."""
    return DERIVED.get(p, "finite", lambda: bool(torch.isfinite(p).all()))


def _bound_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    """The dtype to compute in, after checking the weights: they must be finite, and they must
    convert exactly (a float64 model is bounded in float64 whatever ``dtype`` asks for, since
    rounding its weights to float32 would bound a different network; float16 and bfloat16
    weights convert exactly to either)."""
    rounding.check_arithmetic(dtype)
    for name, p in model.named_parameters():
        if not p.dtype.is_floating_point:
            raise ValueError(f"parameter {name!r} has dtype {p.dtype}; expected a float type")
        if not _finite(p):
            raise ValueError(f"parameter {name!r} of the model is not finite (NaN or infinity)")
        if p.dtype == torch.float64:
            dtype = torch.float64
    return dtype


def _propagate(
    model: nn.Module,
    X: Tensor,
    pert: Perturbation,
    options: Options | None,
    dtype: torch.dtype,
    differentiable: bool,
    chunk: int | None,
    *,
    method: str,
) -> tuple[Tensor, Tensor]:
    """The built-in methods: forward intervals, then (linear methods) the logits back-substituted."""
    net = layers(model, X.shape[1:])
    pert = resolve(net, pert)
    classes = numel(net[-1].out_shape)
    hidden = [numel(layer.out_shape) for layer in net if isinstance(layer, ReLU)]
    rows = 2 * max([classes] + (hidden if method == "crown" else []))
    if method == "crown-fast":
        rows = max(rows, 2 * classes + (options or FastOptions()).rows)
    step = chunk or (len(X) if method == "ibp" else chunk_size(len(X), rows, net))
    stop = logit_stop(net, method, options)
    lows, ups = [], []
    cache: dict = {}  # sample-independent back-substituted rows, shared by the chunks
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for start in range(0, len(X), step):
            xs = X[start : start + step].to(dtype)
            boxes = forward_bounds(net, xs, pert, method, options, cache=cache)
            out = boxes[-1]
            if method != "ibp":
                low = backsubstitute(
                    net, len(net) - 1, identity_spec(net[-1].out_shape, xs), boxes, pert, stop
                )
                low = low.reshape(len(xs), 2, -1)
                out = Interval(low[:, 0], -low[:, 1]).intersect(
                    Interval(out.lower.flatten(1), out.upper.flatten(1))
                )
            lows.append(out.lower.flatten(1))
            ups.append(out.upper.flatten(1))
    return torch.cat(lows), torch.cat(ups)


def _builtin(method: str) -> BoundMethod:
    def fn(model, X, pert, options, dtype, differentiable, chunk):  # noqa: ANN001, ANN202
        return _propagate(model, X, pert, options, dtype, differentiable, chunk, method=method)

    return fn


for _name, _kind in zip(METHODS, (None, CrownIbpOptions, FastOptions, CrownOptions), strict=True):
    register_method(_name, _builtin(_name), options=_kind)


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

    def bound(xs: Tensor, ys: Tensor, start: int) -> tuple[Interval, Interval]:
        n, dt = len(xs), xs.dtype
        boxes = forward_bounds(net, xs, pert, method, options)
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
            inputs = _restrict(net, boxes, torch.cat([torch.arange(n), ahead]))
            spec = torch.cat([spec, -C[ahead]])
        spec_bound = LinearBound(spec, spec.new_zeros(spec.shape[:2]))
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
                lambda dt, xs=xs, ys=ys, start=start: bound(xs.to(dt), ys, start),
                dtype,
                lambda p: (t for iv in p for t in (iv.lower, iv.upper)),
            )
            parts.append(part)
    margins, logits = (
        Interval(torch.cat([p[k].lower for p in parts]), torch.cat([p[k].upper for p in parts]))
        for k in range(2)
    )
    return margins, logits


def _restrict(net: Sequence[Layer], boxes: Sequence[Interval], idx: Tensor) -> list[Interval]:
    """The samples ``idx`` (repeats allowed) of ``boxes``, each layer's input interval, made the
    layers' own; each ReLU keeps those samples' part of its remembered relaxation."""
    sub = [Interval(b.lower[idx], b.upper[idx]) for b in boxes]
    for layer, box in zip(net, sub, strict=False):
        if isinstance(layer, ReLU):
            layer.restrict(idx, box)
        else:
            layer.inp = box
    return sub


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
    sub = _restrict(net, boxes, idx)
    rows = -C[idx]
    low = backsubstitute(
        net, len(net) - 1, LinearBound(rows, rows.new_zeros(rows.shape[:2])), sub, pert, stop
    )
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


def bound_coefficients(
    model: nn.Module,
    X: Tensor,
    pert: AnyPerturbation,
    rows: Tensor,
    method: Method | str = "crown",
    *,
    options: Options | None = None,
) -> list[Tensor]:
    """The coefficients of the linear lower bound on ``rows · logits`` (``rows`` [S, C]) that
    the linear ``method`` back-substitutes to the network input, layer by layer: entry ``i`` is
    the coefficient ``[N, S, *in_shape]`` of the input of layer ``i`` of ``layers(model, ...)``,
    the last entry that of the logits (``rows`` per sample).

    Their signs name the vertex of every box that minimises the relaxation (each delta against
    its coefficient), which is where an attack starts looking (``qlib.attack``). A guide, not a
    bound: computed in float64 without rounding margins.
    """
    if method not in ("crown-ibp", "crown-fast", "crown"):
        raise ValueError(
            f"method must be a linear method (crown-ibp, crown-fast, crown), got {method!r}"
        )
    _check_method(method, options)
    _check_inputs(model, X, pert)
    net = layers(model, X.shape[1:])
    pert = resolve(net, pert)
    classes = numel(net[-1].out_shape)
    if not isinstance(rows, Tensor) or rows.ndim != 2 or rows.shape[1] != classes:
        raise ValueError(
            f"rows must be a tensor [S, {classes}], got {tuple(getattr(rows, 'shape', ()))}"
        )
    xs = X.to(torch.float64)
    n = len(xs)
    with torch.no_grad(), rounding.outward(False):
        forward_bounds(net, xs, pert, method, options)
        bound = LinearBound(rows.to(torch.float64), torch.zeros(len(rows), dtype=torch.float64))
        coefficients = [bound.A]
        for i in range(len(net) - 1, -1, -1):
            bound = net[i].backward(bound, pert.layers[i])
            coefficients.append(bound.A)
    shapes = [layer.in_shape for layer in net] + [net[-1].out_shape]
    out = []
    for A, shape in zip(reversed(coefficients), shapes, strict=True):
        out.append(A.expand(n, *A.shape) if A.ndim == 1 + len(shape) else A)
    return out


def check_labels(y: Tensor, n: int, classes: int) -> Tensor:
    """``y`` as int64 after checking it is ``[n]`` with labels in ``[0, classes)``."""
    if not isinstance(y, Tensor) or y.shape != (n,):
        raise ValueError(f"y must be a tensor of shape ({n},), got {getattr(y, 'shape', y)}")
    y = y.long()
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got range [{y.min()}, {y.max()}]")
    return y
