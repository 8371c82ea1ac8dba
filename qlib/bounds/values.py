"""The value types of bound propagation: intervals and linear bounds.

Shape letters: ``N`` samples, ``S`` linear functions (spec rows) bounded at once, ``*shape`` a
layer variable's shape without the batch dimension.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Interval", "LinearBound"]


@dataclass(frozen=True)
class Interval:
    """Elementwise bounds ``lower <= v <= upper``, each ``[N, *shape]``."""

    lower: Tensor
    upper: Tensor

    @property
    def center(self) -> Tensor:
        return (self.upper + self.lower) / 2

    @property
    def radius(self) -> Tensor:
        return (self.upper - self.lower) / 2

    @property
    def width(self) -> Tensor:
        return self.upper - self.lower

    def intersect(self, other: Interval) -> Interval:
        return Interval(
            torch.maximum(self.lower, other.lower), torch.minimum(self.upper, other.upper)
        )


@dataclass(frozen=True)
class LinearBound:
    """``S`` linear lower bounds ``A · v + const - slack`` on functions of a layer variable ``v``.

    ``A`` is ``[N, S, *shape]`` (per sample) or ``[S, *shape]`` (shared by all samples, as long as
    no ReLU has been crossed); ``const`` is ``[N, S]`` or ``[S]``. ``slack`` (``[N, S]``, or None
    for zero) is the rounding error accumulated by the floating-point steps that produced ``A``
    and ``const``: subtracting it keeps the bound sound for the numbers actually computed
    (``qlib.bounds.rounding``). ``nonzeros``: at most this many nonzero entries in each row of
    ``A`` (``None``: any), for a spec's unit or difference rows, whose products with a layer's
    weight round fewer times.
    """

    A: Tensor
    const: Tensor
    slack: Tensor | None = None
    nonzeros: int | None = None
