"""The grid every PTQ method quantises onto, and the choice of its scale.

Grids (``levels``): ``"2^b"`` is the honest signed b-bit grid ``{-2^(b-1), ..., 2^(b-1)-1}``,
``"2^b-1"`` its symmetric narrow range, and ``"2^b+1"`` the published GPFQ alphabet
``{-2^(b-1), ..., 2^(b-1)}`` (one level more than b bits hold). The step is
``C * rad / max_int`` where ``rad`` is the mean over output rows of ``max|w|`` (per layer, as
published) or each row's ``max|w|`` (per channel). ``scalar="max"`` is the plain max-abs grid of
``qlib.quant.symmetric_quantizer``; ``scalar="auto"`` picks C from ``AUTO_SCALARS`` (plus the
max-abs value) minimising the layer's relative error ``||XW^T - X~Q^T||^2 / ||XW^T||^2``.

Shape letters: ``R`` output rows (times the number of scale candidates ``K`` during the search),
``d`` fan-in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qlib.quant import UniformQuantizer

__all__ = [
    "AUTO_SCALARS",
    "LEVELS",
    "PublishedAlphabet",
    "candidate_scalars",
    "check_bits",
    "check_scalar",
    "grid_steps",
    "make_quantizer",
    "round_codes",
]

LEVELS = ("2^b", "2^b-1", "2^b+1")
AUTO_SCALARS = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.4, 1.6, 1.8, 2.0)


@dataclass(frozen=True)
class PublishedAlphabet(UniformQuantizer):
    """The published GPFQ alphabet ``scale * {-2^(b-1), ..., 2^(b-1)}``: 2^b + 1 levels.

    It needs ``b + 1`` bits to store; it is offered to reproduce the paper, not as a b-bit grid.
    """

    @property
    def min_int(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def max_int(self) -> int:
        return 2 ** (self.bits - 1)


def make_quantizer(bits: int, scale: float | Tensor, levels: str = "2^b") -> UniformQuantizer:
    """The shared grid: ``levels`` one of ``LEVELS``; ``scale`` a float or ``[R, 1]`` tensor."""
    check_bits(bits, "bits")
    if levels == "2^b":
        return UniformQuantizer(bits, scale, signed=True, narrow_range=False)
    if levels == "2^b-1":
        return UniformQuantizer(bits, scale, signed=True, narrow_range=True)
    if levels == "2^b+1":
        return PublishedAlphabet(bits, scale)
    raise ValueError(f"levels must be one of {LEVELS}, got {levels!r}")


def round_codes(
    arg: Tensor, scale: Tensor, qz: UniformQuantizer, noise: Tensor | None = None
) -> Tensor:
    """Codes of ``arg [R]`` on steps ``scale [R]``: nearest, or stochastic with ``noise`` in [0, 1).

    Stochastic rounding (SPFQ) goes up with probability equal to the fractional part.
    """
    x = arg / scale
    x = torch.round(x) if noise is None else torch.floor(x + noise)
    return x.clamp_(qz.min_int, qz.max_int)


def check_scalar(scalar: object) -> None:
    ok = (
        scalar in ("auto", "max")
        if isinstance(scalar, str)
        else (
            isinstance(scalar, int | float)
            and not isinstance(scalar, bool)
            and math.isfinite(scalar)
            and scalar > 0
        )
    )
    if not ok:
        raise ValueError(f"scalar must be a positive float, 'auto' or 'max', got {scalar!r}")


def candidate_scalars(w: Tensor, scalar: float | str, per_channel: bool) -> list[float]:
    """The values of C to try for weights ``w [R, d]``."""
    check_scalar(scalar)
    if isinstance(scalar, str):
        rows = w.abs().amax(1)
        rad = rows.mean().item()
        # C that makes the top level the largest |w|: the max-abs grid (C = 1 per channel).
        c_max = 1.0 if per_channel or rad == 0 else rows.max().item() / rad
        return [c_max] if scalar == "max" else sorted({*AUTO_SCALARS, c_max})
    return [float(scalar)]


def grid_steps(w: Tensor, scalars: Sequence[float], max_int: int, per_channel: bool) -> Tensor:
    """Steps ``[K * R, 1]`` for weights ``w [R, d]``, one block of R rows per value of C."""
    rows = w.abs().amax(1)
    rad = rows if per_channel else rows.mean().expand_as(rows)
    rad = torch.where(rad > 0, rad, torch.ones_like(rad))  # an all-zero row keeps a valid grid
    c = torch.tensor(scalars, dtype=w.dtype, device=w.device)
    return (c[:, None] * rad[None, :] / max_int).reshape(-1, 1)


def check_bits(bits: object, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"{what} must be an integer in [2, 16], got {bits!r}")
