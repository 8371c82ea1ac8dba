"""Bound methods by name: sound per-logit bounds of a whole network (``margins`` bounds the
margins ``logit_y - logit_j`` with the same methods).

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from qlib.bounds import rounding
from qlib.bounds.base import DERIVED, checked_once
from qlib.bounds.layers import ReLU, layers
from qlib.bounds.perlayer import AnyPerturbation, check_perturbation, resolve
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


@checked_once()
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
            xs = X[start : start + step]  # not rounded to dtype: its box is, outward
            boxes = forward_bounds(net, xs, pert, method, options, cache=cache, dtype=dtype)
            out = boxes[-1]
            if method != "ibp":
                spec = identity_spec(net[-1].out_shape, boxes[0].lower)
                low = backsubstitute(net, len(net) - 1, spec, boxes, pert, stop)
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


@checked_once()
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
