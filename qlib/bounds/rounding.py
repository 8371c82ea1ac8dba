"""Outward rounding: the margins that make every bound hold for the floating-point numbers computed.

The model of arithmetic (Higham, *Accuracy and Stability of Numerical Algorithms*, 2nd ed.,
section 3.1): IEEE 754 binary32 or binary64 with round-to-nearest, unit roundoff ``u`` (2^-24 or
2^-53). A dot product or sum of ``n`` terms, evaluated in *any* order (so the BLAS's blocking,
threading and fused multiply-adds do not matter), satisfies

    |fl(a . b) - a . b| <= gamma_n |a| . |b|,    gamma_n = n u / (1 - n u),

as long as nothing underflows; each operation adds at most half the smallest subnormal ``eta``
in absolute terms when something does. A bound computed in floating point therefore becomes
sound by subtracting (lower) or adding (upper) ``gamma_n`` times the same expression evaluated on
absolute values, which costs one extra product of absolute values per step. That margin is
itself computed in floating point, so its factor is ``gamma_n (1 + 2 gamma_{n+1})`` (the
computed sum of absolute values is at least ``1 - gamma_n`` times the exact one), plus ``n eta``;
single operations (``x + eps``) are rounded outward to the neighbouring float with
``nextafter``, which bounds a round-to-nearest result from the right side.

Not covered, and refused where they can be detected: reduced-precision matrix products
(``torch.set_float32_matmul_precision`` other than ``"highest"``, TF32 on GPUs), and
flush-to-zero modes. The attack and the training losses are not bounds and use no margins.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = [
    "check_arithmetic",
    "ceil",
    "convert",
    "down",
    "enabled",
    "factor",
    "floor",
    "gamma",
    "gamma_ratio",
    "margin",
    "outward",
    "underflow",
    "up",
]

_ENABLED = True


@contextlib.contextmanager
def outward(on: bool) -> Iterator[None]:
    """Switch the margins on or off inside the block; off exists only so that tests can show
    what goes wrong without them (a bound computed with them off is not a certificate)."""
    global _ENABLED
    old, _ENABLED = _ENABLED, on
    try:
        yield
    finally:
        _ENABLED = old


def enabled() -> bool:
    return _ENABLED


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u`` of a floating-point format: half the distance from 1 to the next number."""
    return torch.finfo(dtype).eps / 2


def factor(n: int, dtype: torch.dtype, summed: int | None = None) -> float:
    """A Python float ``c`` such that ``fl(c * fl(S))`` bounds ``gamma_n`` times the exact value
    of a non-negative sum ``S`` of at most ``summed`` terms (default ``n``), each term computed
    with at most ``summed`` roundings too: ``gamma_n (1 + 2 gamma_{summed+1})``, rounded up
    (``fl(S) >= S (1 - gamma_summed)`` and the product loses at most one more ``u``)."""
    m = n if summed is None else max(n, summed)
    if (m + 1) * unit_roundoff(dtype) >= 0.01:
        raise ValueError(f"{m} terms are too many for a rounding bound in {dtype}")
    return gamma(n, dtype) * (1 + 2 * gamma(m + 1, dtype)) * (1 + 1e-6)


def gamma(n: int, dtype: torch.dtype) -> float:
    """``gamma_n = n u / (1 - n u)`` of ``dtype`` (Higham's bound for ``n`` roundings)."""
    u = unit_roundoff(dtype)
    return n * u / (1 - n * u)


@functools.lru_cache(maxsize=1024)
def gamma_ratio(n: int, m: int, dtype: torch.dtype) -> float:
    """A number of ``dtype`` at least ``gamma_n / gamma_m``: a part that needs ``gamma_n``, scaled
    by it, can share a margin of ``gamma_m`` with others (one pass over a matrix instead of
    two). Exactly 1 where ``n <= m``."""
    if n <= m:
        return 1.0
    return ceil(gamma(n, dtype) / gamma(m, dtype) * (1 + 1e-9), dtype)


def margin(abs_value: Tensor, n: int, summed: int | None = None) -> Tensor:
    """An upper bound on the rounding error of an expression whose every term passes through at
    most ``n`` roundings and whose evaluation on absolute values is ``abs_value`` (>= 0, same
    dtype; itself a computed sum of at most ``summed`` terms, default ``n``); zero when margins
    are off."""
    if not _ENABLED:
        return torch.zeros_like(abs_value)
    terms = n if summed is None else max(n, summed)
    return abs_value * factor(n, abs_value.dtype, summed) + underflow(terms, abs_value.dtype)


def up(x: Tensor) -> Tensor:
    """The next float above ``x``: an upper bound of the exact result of the one rounded
    operation that produced ``x``."""
    return torch.nextafter(x, _infinity(x.dtype, x.device, 1.0)) if _ENABLED else x


def down(x: Tensor) -> Tensor:
    """The next float below ``x``."""
    return torch.nextafter(x, _infinity(x.dtype, x.device, -1.0)) if _ENABLED else x


@functools.lru_cache(maxsize=64)  # a bound rounds outward a few hundred times per call
def _infinity(dtype: torch.dtype, device: torch.device, sign: float) -> Tensor:
    return torch.tensor(sign * float("inf"), dtype=dtype, device=device)


def convert(x: Tensor, dtype: torch.dtype, side: str) -> Tensor:
    """``x`` in the narrower ``dtype``, moved one step ``"up"`` or ``"down"``: a conversion
    rounds to the nearest number, which may lie on the wrong side of ``x``; its neighbour on the
    chosen side does not (two passes; testing which side it fell on would take five)."""
    y = x.to(dtype)
    if not _ENABLED or y.dtype == x.dtype:
        return y
    return up(y) if side == "up" else down(y)


def ceil(value: float, dtype: torch.dtype) -> float:
    """The smallest number of ``dtype`` that is >= ``value`` (a radius must never shrink when
    it is converted to the format the bounds are computed in)."""
    return _toward(float(value), dtype, 1.0)


def floor(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is <= ``value``."""
    return _toward(float(value), dtype, -1.0)


# Bounds call these a few hundred times per call on a deep net, each a small tensor and a
# read-back: remembered, they cost a dictionary lookup (a certificate spent 1-2 ms on them).
@functools.lru_cache(maxsize=4096)
def _toward(value: float, dtype: torch.dtype, side: float) -> float:
    """``value`` in ``dtype``, moved to the neighbour on ``side`` if the conversion crossed it."""
    t = torch.tensor(value, dtype=dtype)
    if (float(t) - value) * side < 0:
        t = torch.nextafter(t, torch.tensor(side * float("inf"), dtype=dtype))
    return float(t)


def underflow(n: int, dtype: torch.dtype) -> float:
    """The absolute part of ``margin``: what ``n`` roundings can lose to underflow."""
    return (n + 8) * torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps


def check_arithmetic(dtype: torch.dtype) -> None:
    """Refuse settings under which the rounding model above does not hold."""
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"bounds are computed in float32 or float64, got {dtype}")
    if dtype == torch.float32 and torch.get_float32_matmul_precision() != "highest":
        raise RuntimeError(
            "float32 bounds need torch.set_float32_matmul_precision('highest'): reduced-precision "
            f"products ({torch.get_float32_matmul_precision()!r}) void the rounding margins"
        )
