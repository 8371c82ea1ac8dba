"""The memo of ``remember_intervals``: IBP intervals, input boxes and the input-only parts of an
affine layer's interval, remembered across bounds of one batch under many perturbations (an
exploration's genomes share bit widths)."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TypeVar

from torch import Tensor

from qlib.bounds.base import BoundedCache, same
from qlib.bounds.values import Interval

__all__ = ["IntervalMemo", "memo", "remember_intervals"]

T = TypeVar("T")


class IntervalMemo(BoundedCache):
    """Affine layers' IBP intervals, the input box, and the parts of an interval that depend on
    its input alone, kept by the layer's weight, radii, dtype and input for
    ``remember_intervals``, up to ``max_bytes`` counted per entry (entries share their input
    tensors, so they take less). ``hits`` and ``misses`` count the intervals."""

    def __init__(self, max_bytes: int = 256 * 2**20) -> None:
        super().__init__(max_bytes)
        self.hits = self.misses = 0

    def recall(
        self,
        key: tuple,
        anchor: Tensor | None,
        inputs: tuple[Tensor, ...],
        make: Callable[[], T],
        counted: bool = False,
    ) -> T:
        """``make()``, remembered under ``key`` for ``anchor`` (a weight, held weakly; ``None``:
        none) and ``inputs``, compared element by element, so that a hit is exact (the key
        should carry sums of the inputs, to tell entries apart). ``counted``: in ``hits`` and
        ``misses``."""
        hit = self.lookup(key)
        if (
            hit is not None
            and (hit[0] is None if anchor is None else hit[0]() is anchor)
            and all(same(a, b) for a, b in zip(hit[1], inputs, strict=True))
        ):
            self.hits += counted
            return hit[2]
        self.misses += counted
        value = make()
        parts = [*inputs, *(value if isinstance(value, tuple) else (value,))]
        parts = [
            t for p in parts for t in ((p.lower, p.upper) if isinstance(p, Interval) else (p,))
        ]
        size = sum(t.nbytes for t in parts if isinstance(t, Tensor))
        ref = None if anchor is None else weakref.ref(anchor)
        self.store(key, (ref, inputs, value), size)
        return value


def memo() -> IntervalMemo | None:
    """The memo of the enclosing ``remember_intervals`` block, if any."""
    return _MEMO.get()


_MEMO: ContextVar[IntervalMemo | None] = ContextVar("qlib_bounds_memo", default=None)


@contextlib.contextmanager
def remember_intervals(memo: IntervalMemo) -> Iterator[None]:
    """Inside the block, an affine layer's IBP interval is taken from ``memo`` when the same
    layer (weight and bias unchanged) meets the same radii and an input interval equal element by
    element to one it met before, and stored there otherwise. For a caller that bounds one batch
    under many perturbations whose first layers repeat: the genomes of an exploration share bit
    widths, and the first layer of the Fashion MLP is most of its IBP time. Off by default, so
    that a timed bound is computed. Inside, the layer that reads the input also splits its rises
    (``Affine.split_rises``), so that their products are remembered across its weight radii: its
    bounds differ slightly from those computed outside (a digits certificate's value by 1.3e-6,
    relative), both sound."""
    token = _MEMO.set(memo)
    try:
        yield
    finally:
        _MEMO.reset(token)
