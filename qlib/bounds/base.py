"""The layer protocol of the perturbation model and what every layer shares: the ``Layer`` base
class with its three rules, the clipped perturbation, the concrete row deltas of attacks, the
rounding slack of a back-substitution step, and the ``Flatten`` layer."""

from __future__ import annotations

import contextlib
import functools
import itertools
import math
import weakref
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from qlib.bounds import rounding
from qlib.bounds.rounding import floor
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import Perturbation

__all__ = [
    "Clipped",
    "Flatten",
    "Layer",
    "RowDelta",
    "abs_dot",
    "rowdot",
    "split_sum",
    "split_terms",
    "splits",
    "clip_of",
    "as_float64",
    "converted",
    "floor",
    "step_slack",
    "DERIVED",
    "BoundedCache",
    "TensorMemo",
    "version",
    "checked_once",
    "same",
]

T = TypeVar("T")


@dataclass(frozen=True)
class Clipped(Perturbation):
    """A scalar perturbation whose values are clipped at ``clip`` before ``δ`` is added:
    ``min(v, clip) + δ``, ``|δ| <= eps``, result ``>= 0`` (for a ReLU ``v = relu(ẑ)`` and
    ``eps = eps_act``; for the input ``v = x`` and ``eps = eps_input``): a saturating quantiser
    with range ``clip`` whose rounding is a box of half a step. ``clip=None``: no clip."""

    clip: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.clip is not None:
            c = float(self.clip)
            if not math.isfinite(c) or c < 0:
                raise ValueError(f"clip must be finite and >= 0, got {self.clip!r}")
            object.__setattr__(self, "clip", c)


def clip_of(pert: Perturbation) -> float | None:
    """The clip of a per-layer perturbation (None for a plain ``Perturbation``)."""
    return pert.clip if isinstance(pert, Clipped) else None


@dataclass(frozen=True)
class RowDelta:
    """A weight delta that is constant along each output row: ``dW[n, o, ...] = eps * t[n, o]``.

    ``t`` [N, out] in [-1, 1], one row per sample. For a non-negative layer input ``h`` these
    deltas reach exactly the pre-activations ``W h + b +/- eps_w 1^T h`` that any weight delta
    reaches (the envelope of ``qlib.bounds``), with ``out`` instead of ``out x in`` parameters per
    sample, which is what makes gradient attacks on wide layers affordable. For a convolution the
    row is a whole kernel, shared by every position, so it is a real network too.
    """

    t: Tensor
    eps: float

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.t.shape)

    def abs(self) -> Tensor:
        return self.t.abs() * self.eps


def version(tensor: Tensor) -> tuple[int, int]:
    """What identifies a tensor's current values: itself and a generation that changes whenever
    its values do, found by comparing them with a private copy. A change through ``.data``
    (in-place quantisation, ``p.data.add_``) keeps the version counter, the storage and the
    identity all three, and caches keyed on those served the old weights to the next bound,
    which was unsound. The copy lives as long as the tensor (a bounded model's parameters take
    twice their memory). Inside ``checked_once`` each tensor is compared once."""
    key = id(tensor)
    checked = _CHECKED.get()
    if checked is not None:
        hit = checked.get(key)
        if hit is not None and hit[0]() is tensor:
            return key, hit[1]
    entry = _SNAPSHOTS.get(key)
    if entry is None or entry[0]() is not tensor or not same(entry[1], tensor):
        ref = weakref.ref(tensor, functools.partial(_forget, key))
        entry = _SNAPSHOTS[key] = (ref, tensor.detach().clone(), next(_GENERATIONS))
    if checked is not None:
        checked[key] = (entry[0], entry[2])
    return key, entry[2]


@contextlib.contextmanager
def checked_once() -> Iterator[None]:
    """Inside the block, ``version`` compares each tensor's values once (a 784x256 float32
    weight takes about 35 µs, and a certificate asks about a hundred times): for a caller that
    changes no tensor while it runs, such as one bound or one certificate. An inner block joins
    the outer one."""
    if _CHECKED.get() is not None:
        yield
        return
    token = _CHECKED.set({})
    try:
        yield
    finally:
        _CHECKED.reset(token)


def same(a: Tensor, b: Tensor) -> bool:
    """Whether ``b`` holds the values of ``a`` (NaN never equals itself, so a non-finite tensor
    is never taken from a cache)."""
    if a.dtype != b.dtype or a.shape != b.shape or a.device != b.device:
        return False
    b = b.detach()
    if a.device.type == "cpu" and a.dtype in (torch.float32, torch.float64):
        return bool(np.array_equal(a.numpy(), b.numpy()))  # 4x faster than torch.equal
    return torch.equal(a, b)


def _forget(key: int, ref: weakref.ref) -> None:
    """Drop the snapshot of a tensor that died, unless its id already names another one."""
    if _SNAPSHOTS.get(key, (None,))[0] is ref:
        del _SNAPSHOTS[key]


# id -> (weak reference, a copy of the values, their generation), for ``version``.
_SNAPSHOTS: dict[int, tuple[weakref.ref, Tensor, int]] = {}
_GENERATIONS = itertools.count()
# Inside ``checked_once``: id -> (weak reference, generation) of the tensors compared so far.
_CHECKED: ContextVar[dict[int, tuple[weakref.ref, int]] | None] = ContextVar(
    "qlib_checked", default=None
)


class BoundedCache:
    """Entries kept up to ``max_bytes`` (and 4096 entries), the least recently used dropped
    first: the storage of ``TensorMemo`` and ``memo.IntervalMemo``."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self.size = 0

    def lookup(self, key: Hashable) -> object | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        self.entries.move_to_end(key)
        return hit[0]

    def store(self, key: Hashable, value: object, size: int) -> None:
        old = self.entries.pop(key, None)
        if old is not None:
            self.size -= old[1]
        self.entries[key] = (value, size)
        self.size += size
        while len(self.entries) > 1 and (self.size > self.max_bytes or len(self.entries) > 4096):
            self.size -= self.entries.popitem(last=False)[1][1]


class TensorMemo(BoundedCache):
    """Values derived from tensors (a weight in float64, its interval-product terms), each
    remembered while its tensor is alive and unchanged (``version``). Weak: it never keeps a
    model's weights alive."""

    def get(self, tensor: Tensor, name: Hashable, make: Callable[[], T]) -> T:
        """``make()``, remembered for ``tensor``'s current values under ``name``."""
        key = (*version(tensor), name)
        hit = self.lookup(key)
        if hit is not None and hit[0]() is tensor:
            return hit[1]
        value = make()
        self.store(
            key, (weakref.ref(tensor), value), value.nbytes if isinstance(value, Tensor) else 0
        )
        return value


# An exploration bounds one model under many boxes, and attacks run thousands of forwards: the
# weight-sized values they derive are computed once per weight (and radius).
DERIVED = TensorMemo(96 * 2**20)


def converted(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """``tensor`` (detached) in ``dtype``, converted once per version."""
    return DERIVED.get(tensor, ("to", dtype), lambda: tensor.detach().to(dtype))


def as_float64(tensor: Tensor) -> Tensor:
    """``tensor`` in float64, converted once per version (attacks run thousands of forwards)."""
    return converted(tensor, torch.float64)


class Layer(ABC):
    """One layer of the perturbation model: shapes (without the batch dim) and its rules.

    ``inp`` holds the interval of the layer's input ``[N, *in_shape]`` once propagation has
    computed it (``forward_bounds``); the rounding margins of ``backward`` are taken over it.
    """

    inp: Interval | None = None

    def __init__(self, index: int, module: nn.Module, in_shape: tuple[int, ...]) -> None:
        self.index = index
        self.module = module
        self.in_shape = in_shape
        self.out_shape = self.output_shape()

    def output_shape(self) -> tuple[int, ...]:
        """The output shape (no batch dim), from one forward pass of a zero input (which also
        raises a ``RuntimeError`` when ``in_shape`` does not fit); layers whose shape is plain
        arithmetic compute it instead (a bound builds its layers on every call)."""
        weight = getattr(self.module, "weight", None)
        dtype = weight.dtype if isinstance(weight, Tensor) else torch.get_default_dtype()
        with torch.no_grad():
            return tuple(self.module(torch.zeros(1, *self.in_shape, dtype=dtype)).shape[1:])

    @abstractmethod
    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        """Interval of the layer output ``[N, *out_shape]`` from the input interval."""
        raise NotImplementedError

    @abstractmethod
    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        """Lower bound in terms of the layer input from a lower bound in terms of its output."""
        raise NotImplementedError

    @abstractmethod
    def perturbed(self, h: Tensor) -> Tensor:
        """The output ``[N, *out_shape]`` (float64) of one concrete network for the input ``h``;
        subclasses take that layer's deltas as further arguments."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(#{self.index} {self.module}, {self.in_shape}->{self.out_shape})"
        )

    def restrict(self, idx: Tensor, box: Interval) -> None:
        """Make ``box``, the samples ``idx`` of the current input interval, the new one; layers
        that remember something per sample of it keep those samples' part."""
        self.inp = box

    def input_box(self) -> Interval:
        if self.inp is None:
            raise RuntimeError(f"layer {self.index}: its input interval is not set")
        return self.inp


def abs_dot(A: Tensor, v: Tensor, abs_A: Tensor | None = None) -> Tensor:
    """``|A| · v`` per sample ``[N, S]`` for ``A`` ``[N, S, *shape]`` or ``[S, *shape]`` and
    ``v`` ``[N, *shape]`` (the evaluation on absolute values that a rounding margin needs);
    ``abs_A``: ``|A|`` when the caller has it already (one pass over ``A`` less)."""
    n, k = len(v), v[0].numel()
    per_sample = A.ndim == v.ndim + 1
    v = v.reshape(n, k)
    abs_A = A.abs() if abs_A is None else abs_A
    if per_sample:
        return rowdot(abs_A.reshape(n, -1, k), v)
    return v @ abs_A.reshape(-1, k).T


# Elements of A per block of rowdot: the product's temporary stays in cache.
_ROWDOT_BLOCK = 2**20


def rowdot(A: Tensor, v: Tensor, split: bool = False) -> Tensor:
    """``A · v`` per sample ``[N, S]`` for rows ``A`` ``[N, S, k]`` (or ``[S, k]``, shared by the
    samples) and ``v`` ``[N, k]``. Per-sample rows are multiplied and summed elementwise, in
    blocks of samples small enough for the cache: a batched matrix-vector ``bmm`` runs 2-4x
    slower on the CPU for these shapes, and one elementwise pass over a tensor larger than the
    cache slower still. ``split``: each dot product is a ``split_sum``."""
    k = A.shape[-1]
    c = split_length(k, A.dtype) if split else k

    def dot(rows: Tensor, vec: Tensor) -> Tensor:
        if c == k:
            return torch.linalg.vecdot(rows, vec)
        return torch.linalg.vecdot(rows.unflatten(-1, (-1, c)), vec.unflatten(-1, (-1, c))).sum(-1)

    if A.ndim == 2:
        if c == k:
            return v @ A.T
        blocks = torch.einsum("nbc,sbc->nsb", v.unflatten(-1, (-1, c)), A.unflatten(-1, (-1, c)))
        return blocks.sum(-1)
    step = max(1, _ROWDOT_BLOCK // max(1, A[0].numel()))
    if step >= len(A):
        return dot(A, v.unsqueeze(1))
    return torch.cat(
        [dot(A[i : i + step], v[i : i + step].unsqueeze(1)) for i in range(0, len(A), step)]
    )


def split_sum(x: Tensor) -> Tensor:
    """The sums over the last dimension, each in blocks of ``c = split_length`` terms and then
    over the blocks: every term passes through ``split_terms`` roundings (39 instead of 255 for
    256 terms), whatever order each sum takes. For float32 only; a float64 margin is too small
    to pay for the second pass."""
    k = x.shape[-1]
    c = split_length(k, x.dtype)
    return x.sum(-1) if c == k else x.unflatten(-1, (-1, c)).sum(-1).sum(-1)


# Sums of fewer terms are not split (``split_length``, ``Linear.apply_t_in_parts``,
# ``Linear.rises``): their ``gamma`` is small enough that the extra pass costs more than it
# saves. Nor are float64 ones.
SPLIT_FROM = 256


def splits(k: int, dtype: torch.dtype) -> bool:
    """Whether a sum of ``k`` terms in ``dtype`` may be summed in parts (``SPLIT_FROM``)."""
    return dtype != torch.float64 and k >= SPLIT_FROM


@functools.lru_cache(maxsize=256)
def split_length(k: int, dtype: torch.dtype) -> int:
    """The block length of a split sum of ``k`` terms in ``dtype``: the largest divisor of ``k``
    up to 32, or ``k`` (no split) where ``splits`` says no, and where that divisor is under 8
    (short blocks cost more than they save)."""
    if not splits(k, dtype):
        return k
    c = max(d for d in range(1, min(k, 32) + 1) if k % d == 0)
    return c if c >= 8 else k


def split_terms(k: int, dtype: torch.dtype) -> int:
    """Roundings per term of a split sum (or dot product) of ``k`` terms in ``dtype``."""
    c = split_length(k, dtype)
    return k if c == k else c + k // c - 1


def step_slack(bound: LinearBound, parts: list[tuple[Tensor, int, int | None]]) -> Tensor | None:
    """The slack after one backward step: the old one plus the step's rounding margin.

    ``parts``: triples ``(abs_value, n, summed)``, each the evaluation on absolute values
    ``[N, S]`` of errors whose terms pass through at most ``n`` roundings, itself a computed sum
    whose terms passed through at most ``summed`` (``None``: ``n``; see ``rounding.margin``).
    An elementwise step's coefficient errors need ``gamma_3``, not the ``gamma`` of a dot
    product: the sum over the coefficients is the bound's, not a computed one. The step's own
    constant, the addition to ``bound.const`` included, belongs in ``parts``; ``bound.const``
    itself passes through that one addition, whose error ``u |bound.const|`` ``gamma_2``
    covers. (It was charged the largest ``n`` of the step, some hundred times that, on every
    step: a sixth of the float32 looseness of CROWN-IBP on the MNIST 4x256 MLP.)"""
    if not rounding.enabled():
        return bound.slack
    step = rounding.margin(bound.const.abs(), 2)
    for abs_value, n, summed in parts:
        step = rounding.up(step + rounding.margin(abs_value, n, summed))
    return step if bound.slack is None else rounding.up(bound.slack + step)


class Flatten(Layer):
    def output_shape(self) -> tuple[int, ...]:
        return (math.prod(self.in_shape),)

    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        return Interval(box.lower.flatten(1), box.upper.flatten(1))

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        lead = bound.A.shape[: bound.A.ndim - len(self.out_shape)]
        A = bound.A.reshape(*lead, *self.in_shape)
        return LinearBound(A, bound.const, bound.slack, bound.nonzeros)

    def perturbed(self, h: Tensor) -> Tensor:
        return h.flatten(1)
