"""The hidden ReLU with activation perturbation (and an optional clip): ``ĥ = relu(ẑ) + δ``
(``min(relu(ẑ), c) + δ`` when clipped), its interval rule and its linear relaxations."""

from __future__ import annotations

import torch
from torch import Tensor

from qlib.bounds import rounding
from qlib.bounds.base import Layer, abs_dot, clip_of, floor, rowdot, step_slack
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import Perturbation

__all__ = ["ReLU", "clip_relaxation"]


class ReLU(Layer):
    """``ĥ = relu(ẑ) + δ >= 0``, ``|δ| <= eps_a``; ``pre`` (its input interval) holds the bounds
    on ``ẑ`` once known."""

    @property
    def pre(self) -> Interval | None:
        return self.inp

    @pre.setter
    def pre(self, box: Interval | None) -> None:
        self.inp = box

    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        eps = rounding.ceil(pert.eps_act, box.lower.dtype)
        clip = clip_of(pert)
        if clip is not None:
            # min(relu(ẑ), c) + δ >= 0 is monotone in ẑ: its ends at the ends of the box, with
            # the clip rounded to the side that keeps the interval sound.
            dtype = box.lower.dtype
            lower = torch.clamp(torch.relu(box.lower), max=floor(clip, dtype))
            upper = torch.clamp(torch.relu(box.upper), max=rounding.ceil(clip, dtype))
            if eps:
                lower = torch.clamp(rounding.down(lower - eps), min=0.0)
                upper = rounding.up(upper + eps)
            return Interval(lower, upper)
        if not eps:
            return Interval(torch.relu(box.lower), torch.relu(box.upper))
        lower = torch.clamp(rounding.down(torch.relu(box.lower) - eps), min=0.0)
        return Interval(lower, rounding.up(torch.relu(box.upper) + eps))

    def relaxation(self, pert: Perturbation) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Slopes and offsets ``(al, bl, au, bu)``, each ``[N, *shape]``, with
        ``al ẑ + bl <= ĥ <= au ẑ + bu`` for all ``ẑ`` in ``pre``."""
        if self.pre is None:
            raise RuntimeError(f"layer {self.index}: pre-activation bounds are not set")
        lo, up = self.pre.lower, self.pre.upper
        eps = rounding.ceil(pert.eps_act, lo.dtype)
        clip = clip_of(pert)
        if clip is not None:
            return clip_relaxation(lo, up, clip, eps)
        # Lower: ĥ >= relu(ẑ - eps_a) >= al (ẑ - eps_a); adaptive slope 0 or 1 (CROWN). Either
        # slope is valid everywhere, so rounding in choosing it cannot break soundness.
        ls, us = lo - eps, up - eps
        al = torch.where(ls >= 0, 1.0, torch.where(us <= 0, 0.0, (us > -ls).to(lo.dtype)))
        bl = -al * eps
        # Upper: ĥ <= relu(ẑ) + eps_a <= chord of relu over [l, u], plus eps_a.
        unstable = (lo < 0) & (up > 0)
        denom = torch.where(unstable, up - lo, torch.ones_like(up))
        au = torch.where(lo >= 0, 1.0, torch.where(unstable, up / denom, 0.0))
        bu = torch.where(unstable, -au * lo, torch.zeros_like(lo)) + eps
        if rounding.enabled():
            # The computed chord may sit below relu at an end of [l, u] by a few roundings of
            # au (u - l); lift its offset by a margin for them (stable neurons are exact).
            lift = rounding.margin(au * (up - lo).abs() + bu.abs(), 4)
            bu = torch.where(unstable, rounding.up(bu + lift), bu)
        return al, bl, au, bu

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        al, bl, au, bu = (t.unsqueeze(1) for t in self.relaxation(pert))
        A = bound.A
        # For a lower bound a positive coefficient takes the lower relaxation, a negative the upper:
        # A_in = A⁺ al + A⁻ au = A al + A⁻ (au - al), written so that the sums become matmuls.
        neg = torch.clamp(A, max=0.0)
        A_in = torch.addcmul(A * al, neg, au - al)
        k, n = bl[0, 0].numel(), len(bl)
        lead = A.shape[: A.ndim - len(self.in_shape)]  # [S] (shared rows) or [N, S]
        const = rowdot(A.reshape(*lead, k), bl.reshape(n, k))
        const = const + rowdot(neg.reshape(*lead, k), (bu - bl).reshape(n, k))
        slack = bound.slack
        if rounding.enabled():
            # Entry errors of A_in are within |A| (2|al| + |au|) and act on |ẑ| <= max(|l|, |u|);
            # the constant's within |A| (2|bl| + |bu|).
            al0, bl0, au0, bu0 = (t.squeeze(1) for t in (al, bl, au, bu))
            z = torch.maximum(self.pre.lower.abs(), self.pre.upper.abs())
            v = (2 * al0.abs() + au0.abs()) * z + 2 * bl0.abs() + bu0.abs()
            slack = step_slack(bound, abs_dot(A, v), k + 4)
        return LinearBound(A_in, bound.const + const, slack)

    def perturbed(self, h: Tensor, dA: Tensor | None = None, clip: float | None = None) -> Tensor:
        """``min(relu(h), clip) + dA``, clamped at 0: the nominal output is there, so clamping
        only shrinks the effective delta and the network stays inside the model."""
        h = torch.relu(h)
        if clip is not None:
            h = torch.clamp(h, max=clip)
        return h if dA is None else torch.clamp(h + dA.to(torch.float64), min=0.0)


def clip_relaxation(
    lo: Tensor, up: Tensor, clip: float, eps: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Slopes and offsets ``(al, bl, au, bu)`` of linear bounds on ``ĥ = min(relu(ẑ), clip) + δ``,
    ``|δ| <= eps``, ``ĥ >= 0``, valid for ``ẑ`` in ``[lo, up]`` (each ``[N, *shape]``).

    The bounds hold between ``Gl(ẑ) = max(min(relu(ẑ), c) - eps, 0)`` and ``Gu(ẑ) = min(relu(ẑ),
    c) + eps``, both piecewise linear with kinks at ``0``/``eps`` and ``c``. The slopes follow
    CROWN's choice on each shape (identity, chord, or the steeper or flatter tangent where both
    kinks lie inside), and each offset is the tightest one for its slope: the extreme of
    ``G(p) - a p`` over the ends and the kinks inside ``[lo, up]``, where a line below (above) a
    piecewise-linear function must touch it. Any slope is sound, so only the offsets carry
    rounding margins.
    """
    dtype = lo.dtype
    c_hi, c_lo = rounding.ceil(clip, dtype), floor(clip, dtype)
    zero = torch.zeros_like(lo)

    def at(points: list[Tensor]) -> list[Tensor]:
        return [torch.minimum(torch.maximum(p, lo), up) for p in points]

    # Upper: Gu is 0 + eps up to 0, the identity + eps to c, then c + eps.
    c = torch.full_like(lo, c_hi)
    one = torch.ones_like(lo)
    chord = up / torch.where(up > lo, up - lo, one)
    through_c = c / torch.where(c > lo, c - lo, one)  # tangent through (c, c) and (lo, 0)
    au = torch.where(
        (up <= 0) | (lo >= c),
        zero,
        torch.where(
            lo >= 0,
            torch.where(up <= c, one, (c - lo > up - c).to(dtype)),
            torch.where(up <= c, chord, torch.where(c - lo > up - c, through_c, zero)),
        ),
    )
    bu = None
    for p in at([lo, up, zero, c]):
        g = torch.clamp(torch.relu(p), max=c_hi)
        g = rounding.up(g + eps) if eps else g
        value = g - au * p
        m = rounding.margin(g.abs() + (au * p).abs(), 3) if rounding.enabled() else 0.0
        value = rounding.up(value + m) if rounding.enabled() else value
        bu = value if bu is None else torch.maximum(bu, value)
    # Lower: Gl is 0 up to e = eps, the identity - eps to c, then c - eps (0 if c <= eps).
    e = torch.full_like(lo, eps)
    c = torch.full_like(lo, c_lo)
    if c_lo > eps:
        bend = (c - lo) / torch.where(
            up > lo, up - lo, one
        )  # chord from (lo, lo - e) to (up, c - e)
        from_e = (c - e) / torch.where(up > e, up - e, one)  # through (e, 0) and (up, c - e)
        al = torch.where(
            (up <= e) | (lo >= c),
            zero,
            torch.where(
                lo >= e,
                torch.where(up <= c, one, bend),
                torch.where(
                    up <= c, (up - e > e - lo).to(dtype), torch.where(up - e > e - lo, from_e, zero)
                ),
            ),
        )
    else:
        al = zero
    bl = None
    for p in at([lo, up, e, c]):
        g = torch.clamp(torch.relu(p), max=c_lo)
        g = torch.clamp(rounding.down(g - eps), min=0.0) if eps else g
        value = g - al * p
        m = rounding.margin(g.abs() + (al * p).abs(), 3) if rounding.enabled() else 0.0
        value = rounding.down(value - m) if rounding.enabled() else value
        bl = value if bl is None else torch.minimum(bl, value)
    return al, bl, au, bu
