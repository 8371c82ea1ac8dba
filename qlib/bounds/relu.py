"""The hidden ReLU with activation perturbation (and an optional clip): ``ĥ = relu(ẑ) + δ``
(``min(relu(ẑ), c) + δ`` when clipped), its interval rule and its linear relaxations."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from qlib.bounds import rounding
from qlib.bounds.base import Layer, abs_dot, clip_of, floor, rowdot, split_terms, step_slack
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import Perturbation

__all__ = ["ReLU", "clip_relaxation", "relax_together"]


class ReLU(Layer):
    """``ĥ = relu(ẑ) + δ >= 0``, ``|δ| <= eps_a``; ``pre`` (its input interval) holds the bounds
    on ``ẑ`` once known."""

    def output_shape(self) -> tuple[int, ...]:
        return self.in_shape

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
        ``al ẑ + bl <= ĥ <= au ẑ + bu`` for all ``ẑ`` in ``pre``. Remembered for this ``pre``
        (the same object) and ``pert``: a back-substitution from every hidden layer
        (``"crown"``) meets the layers below it again."""
        if self.pre is None:
            raise RuntimeError(f"layer {self.index}: pre-activation bounds are not set")
        hit = self._remembered(pert)
        if hit is not None:
            return hit[2]
        key = (pert, rounding.enabled())
        lo, up = self.pre.lower, self.pre.upper
        eps = rounding.ceil(pert.eps_act, lo.dtype)
        clip = clip_of(pert)
        if clip is not None:
            return self._remember(key, clip_relaxation(lo, up, clip, eps))
        # Lower: ĥ >= relu(ẑ - eps_a) >= al (ẑ - eps_a); adaptive slope 0 or 1 (CROWN). Either
        # slope is valid everywhere, so rounding in choosing it cannot break soundness.
        ls, us = lo - eps, up - eps
        active = _ge(ls, 0.0)
        # 1 where ls >= 0, else 0 where us <= 0, else whether us > -ls.
        al = active + (1 - active) * _gt(us, 0.0) * _gt(us, -ls)
        bl = -al * eps
        # Upper: ĥ <= relu(ẑ) + eps_a <= chord of relu over [l, u], plus eps_a.
        negative = _gt(0.0, lo)
        unstable = negative * _gt(up, 0.0)
        denom = _pick(unstable, up - lo, 1.0)
        au = (1 - negative) + unstable * (up / denom)
        bu = unstable * (-au * lo) + eps
        if rounding.enabled():
            # The computed chord may sit below relu at an end of [l, u] by a few roundings of
            # au (u - l); lift its offset by a margin for them (stable neurons are exact).
            lift = rounding.margin(au * (up - lo).abs() + bu.abs(), 4)
            bu = _pick(unstable, rounding.up(bu + lift), bu)
        return self._remember(key, (al, bl, au, bu))

    _relaxed: tuple | None = None  # (pre, (pert, margins on), relaxation, margin vector)

    def _remembered(self, pert: Perturbation) -> tuple | None:
        """The remembered ``_relaxed`` if it is for the current ``pre`` and ``pert``."""
        hit = self._relaxed
        if hit is not None and hit[0] is self.pre and hit[1] == (pert, rounding.enabled()):
            return hit
        return None

    def _remember(
        self, key: tuple, relaxation: tuple, vector: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self._relaxed = (self.pre, key, relaxation, vector)
        return relaxation

    def restrict(self, idx: Tensor, box: Interval) -> None:
        """Make ``box``, the samples ``idx`` of the current ``pre``, the new ``pre``, keeping
        those samples' part of a remembered relaxation: it is computed neuron by neuron, so the
        part equals the relaxation of ``box`` bit for bit, without its few dozen operations."""
        hit = self._relaxed
        if hit is not None and hit[0] is self.pre:
            vector = None if hit[3] is None else hit[3][idx]
            self._relaxed = (box, hit[1], tuple(t[idx] for t in hit[2]), vector)
        self.pre = box

    def margin_vector(self, pert: Perturbation) -> Tensor:
        """``(2|al| + |au|) max(|l|, |u|) + r (2|bl| + |bu|)`` [N, *shape] of the relaxation
        (``_margin_vector``): what ``backward``'s rounding margin weighs ``|A|`` with, once per
        relaxation."""
        relaxation = self.relaxation(pert)
        pre, key, _, vector = self._relaxed
        if vector is None:
            lo, up = self.pre.lower, self.pre.upper
            vector = _margin_vector(*relaxation, lo, up, _fold_ratio(lo[0].numel(), lo.dtype))
            self._relaxed = (pre, key, relaxation, vector)
        return vector

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        al, bl, au, bu = (t.unsqueeze(1) for t in self.relaxation(pert))
        A = bound.A
        # For a lower bound a positive coefficient takes the lower relaxation, a negative the upper:
        # A_in = A⁺ al + A⁻ au = A al + A⁻ (au - al), written so that the sums become matmuls.
        neg = torch.clamp(A, max=0.0)
        A_in = torch.addcmul(A * al, neg, au - al)
        k, n = bl[0, 0].numel(), len(bl)
        lead = A.shape[: A.ndim - len(self.in_shape)]  # [S] (shared rows) or [N, S]
        # Split sums: the offsets of unstable neurons are large, and their sums' margin was most
        # of a ReLU step's.
        const = rowdot(A.reshape(*lead, k), bl.reshape(n, k), split=True)
        const = const + rowdot(neg.reshape(*lead, k), (bu - bl).reshape(n, k), split=True)
        slack = bound.slack
        if rounding.enabled():
            # Each entry of A_in carries three roundings (A al, au - al, addcmul): its error is
            # within gamma_3 |A| (2|al| + |au|) and acts on |ẑ| <= max(|l|, |u|). The constant's
            # two split dot products of k terms (t = split_terms(k, dtype) roundings) and two
            # additions: within gamma_{t+3} |A| (2|bl| + |bu|) = gamma_3 |A| r (2|bl| + |bu|).
            # So gamma_3 |A| · margin_vector covers both; a term of that sum passes through at
            # most 5 roundings (3 in the entries' vector, the fold's addition, the product with
            # |A|) besides the k of the sum.
            total = abs_dot(A, self.margin_vector(pert))
            slack = step_slack(bound, [(total, 3, k + 5)])
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
    return _clip_relaxation(
        lo, up, rounding.ceil(clip, dtype), floor(clip, dtype), rounding.ceil(eps, dtype)
    )


def _clip_relaxation(
    lo: Tensor, up: Tensor, c_hi: float | Tensor, c_lo: float | Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``clip_relaxation`` with the clip rounded outward to ``c_lo <= clip <= c_hi`` and ``eps``
    rounded up, each a number or a tensor in ``lo``'s dtype that broadcasts against it.

    Most neurons lie inside one linear piece of both envelopes, where the relaxation is exact
    and needs no arithmetic: ``0 <= ĥ <= eps`` where ``up < 0``, and ``ẑ - eps <= ĥ <= ẑ + eps``
    where ``eps < lo`` and ``up < c_lo`` (both hold for the real numbers, with ``eps`` rounded
    up, so no rounding margin is needed). Only the others go through the general rule
    (``_piecewise_relaxation``), some hundred operations that would otherwise cost their pass
    over every neuron (on the Fashion MLP's genome boxes at 12 bits, about one neuron in seven;
    where most are unstable, all of them take the general rule and the stable ones are then
    replaced, which gives the same result)."""
    dtype = lo.dtype
    eps_t = eps if isinstance(eps, Tensor) else torch.tensor(eps, dtype=dtype)
    linear = _gt(lo, eps_t) * _gt(c_lo, up)  # indicators: see _gt
    other = 1 - linear - _gt(0.0, up)  # the two pieces exclude each other (lo <= up)
    al, au = linear, linear.clone()
    bl = linear * -eps_t
    bu = eps_t.expand_as(lo).clone()
    count = int(other.sum().item())
    if 2 * count > other.numel():
        # Mostly unstable (a wide box): gathering them would cost more than it saves.
        parts = _piecewise_relaxation(lo, up, c_hi, c_lo, eps)
        return tuple(  # type: ignore[return-value]
            _pick(other, part, out) for out, part in zip((al, bl, au, bu), parts, strict=True)
        )
    if count:
        idx = other.flatten().nonzero()[:, 0]

        def pick(v: float | Tensor) -> float | Tensor:
            return v.expand_as(lo).reshape(-1)[idx] if isinstance(v, Tensor) else v

        parts = _piecewise_relaxation(
            lo.reshape(-1)[idx], up.reshape(-1)[idx], pick(c_hi), pick(c_lo), pick(eps)
        )
        for out, part in zip((al, bl, au, bu), parts, strict=True):
            out.view(-1)[idx] = part
    return al, bl, au, bu


def _piecewise_relaxation(
    lo: Tensor, up: Tensor, c_hi: float | Tensor, c_lo: float | Tensor, eps: float | Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The general rule of ``_clip_relaxation``, valid for any neuron."""
    # Tensors over tensors keep the slopes bit for bit those of the plain formulas (a Python
    # number over a tensor is computed as a reciprocal and a product).
    c_hi_t = c_hi.expand_as(lo) if isinstance(c_hi, Tensor) else torch.full_like(lo, c_hi)
    c_lo_t = c_lo.expand_as(lo) if isinstance(c_lo, Tensor) else torch.full_like(lo, c_lo)
    width = _pick(_gt(up, lo), up - lo, 1.0)
    lo_pos = _ge(lo, 0.0)

    # Upper: Gu is 0 + eps up to 0, the identity + eps to c, then c + eps.
    steep = _gt(c_hi - lo, up - c_hi)  # the tangent through (lo, .) and (c, c) beats the flat one
    chord = _pick(lo_pos, 1.0, _slope(up, width))
    through_c = _pick(lo_pos, 1.0, _slope(c_hi_t, _pick(_gt(c_hi, lo), c_hi - lo, 1.0)))
    au = _pick(_ge(c_hi, up), chord, steep * through_c)
    au = au * _gt(up, 0.0) * _gt(c_hi, lo)  # 0 where up <= 0 or lo >= c
    # Lower: Gl is 0 up to e = eps, the identity - eps to c, then c - eps (0 if c <= eps).
    # The chord from (lo, lo - e) to (up, c - e), and the line through (e, 0) and (up, c - e).
    bend = _slope(c_lo - lo, width)
    from_e = _slope(c_lo_t - eps, _pick(_gt(up, eps), up - eps, 1.0))
    flat = _gt(up - eps, eps - lo)
    inside = _ge(c_lo, up)
    al = _pick(
        _ge(lo, eps),
        _pick(inside, 1.0, bend),
        _pick(inside, flat, flat * from_e),
    )
    al = al * _gt(up, eps) * _gt(c_lo_t, eps) * _gt(c_lo, lo)
    bl, bu = _offsets(lo, up, al, au, c_hi_t, c_lo, eps)
    return al, bl, au, bu


def _offsets(
    lo: Tensor,
    up: Tensor,
    al: Tensor,
    au: Tensor,
    c_hi: float | Tensor,
    c_lo: float | Tensor,
    eps: float | Tensor,
) -> tuple[Tensor, Tensor]:
    """The tightest offsets ``(bl, bu)`` for slopes ``al``, ``au`` in [0, 1] (any slopes there),
    rounded outward: ``bu`` the maximum of ``Gu(p) - au p`` over ``[lo, up]`` and ``bl`` the
    minimum of ``Gl(p) - al p`` (the clip and ``eps`` as in ``_clip_relaxation``).

    With a slope in [0, 1] each of these functions falls up to its first kink (0 for ``Gu``,
    ``eps`` for ``Gl``), rises up to the clip and falls after it. So the maximum lies at ``lo``
    or at ``c`` clamped into ``[lo, up]``, and the minimum at ``eps`` clamped into ``[lo, up]``
    or at ``up``: two candidates each, exact points, whatever rounding did to the slopes."""
    c_hi_t = c_hi.expand_as(lo) if isinstance(c_hi, Tensor) else torch.full_like(lo, c_hi)
    p = torch.stack([lo, _inside(c_hi_t, lo, up)])
    g = _shift(torch.clamp(torch.relu(p), max=c_hi), eps, "up")
    bu = (g - au * p).amax(0)
    # The rounding of g - a p at the extreme candidate, bounded once per neuron: 0 <= g <= max g
    # and |a p| <= a max(|lo|, |up|). Where rounding lifts the other candidate past it, the
    # margin still covers the extreme one.
    z = torch.maximum(lo.abs(), up.abs())
    if rounding.enabled():
        bu = rounding.up(bu + rounding.margin(g.amax(0) + au * z, 3))
    eps_t = eps.expand_as(lo) if isinstance(eps, Tensor) else torch.full_like(lo, eps)
    p = torch.stack([_inside(eps_t, lo, up), up])
    g = torch.clamp(_shift(torch.clamp(torch.relu(p), max=c_lo), eps, "down"), min=0.0)
    bl = (g - al * p).amin(0)
    if rounding.enabled():
        bl = rounding.down(bl - rounding.margin(g.amax(0) + al * z, 3))
    return bl, bu


def relax_together(pairs: Sequence[tuple[ReLU, Perturbation]]) -> None:
    """Compute and remember (``ReLU.relaxation``) the relaxations of the clipped ReLUs among
    ``pairs`` whose ``pre`` is set, in one pass over their neurons side by side: a relaxation
    takes some sixty elementwise operations, which on the few hundred neurons of a hidden layer
    cost their overhead rather than their arithmetic (on the Fashion MLP's genome boxes, four
    layers of 256 samples took 2.4 ms one by one, 1.5 ms together)."""
    todo = []
    for layer, pert in pairs:
        clip = clip_of(pert)
        if clip is None or layer.pre is None or layer._remembered(pert) is not None:
            continue
        todo.append((layer, pert, (pert, rounding.enabled()), clip))
    if len(todo) < 2:
        return
    lo = torch.cat([layer.pre.lower.flatten(1) for layer, *_ in todo], 1)
    up = torch.cat([layer.pre.upper.flatten(1) for layer, *_ in todo], 1)
    sizes = [layer.pre.lower[0].numel() for layer, *_ in todo]

    dtype, counts = lo.dtype, torch.tensor(sizes)

    def column(values: list[float]) -> Tensor:  # exact: each value is a number of ``dtype``
        return torch.tensor(values, dtype=dtype).repeat_interleave(counts)

    c_hi = column([rounding.ceil(clip, dtype) for *_, clip in todo])
    c_lo = column([floor(clip, dtype) for *_, clip in todo])
    eps = column([rounding.ceil(pert.eps_act, dtype) for _, pert, *_ in todo])
    relaxation = _clip_relaxation(lo, up, c_hi, c_lo, eps)
    parts = [t.split(sizes, 1) for t in relaxation]
    vectors = [None] * len(todo)
    if rounding.enabled():
        ratio = column([_fold_ratio(size, dtype) for size in sizes])
        vectors = _margin_vector(*relaxation, lo, up, ratio).split(sizes, 1)
    for k, (layer, _, key, _) in enumerate(todo):
        shape = layer.pre.lower.shape
        vector = None if vectors[k] is None else vectors[k].reshape(shape)
        layer._remember(key, tuple(part[k].reshape(shape) for part in parts), vector)


def _margin_vector(
    al: Tensor, bl: Tensor, au: Tensor, bu: Tensor, lo: Tensor, up: Tensor, ratio: float | Tensor
) -> Tensor:
    """``(2|al| + |au|) max(|l|, |u|) + ratio (2|bl| + |bu|)``: the entries' and the constant's
    parts of a ReLU step's margin, which need different gammas, folded into one vector with
    ``ratio >= gamma_{t+3} / gamma_3`` (``_fold_ratio``), so that ``ReLU.backward`` takes one
    pass over ``|A|`` instead of two (the fold's roundings are counted there).

    A neuron with ``al = au = 1`` (stable and active) has no entry error: ``A * 1``,
    ``au - al = 0`` and ``A + A⁻ * 0`` are exact; nor has one with ``al = au = 0``, whose entry
    term is zero already."""
    inexact = 1 - _indicator(torch.eq, al, 1.0) * _indicator(torch.eq, au, 1.0)
    entries = (2 * al.abs() + au.abs()) * torch.maximum(lo.abs(), up.abs()) * inexact
    return entries + ratio * (2 * bl.abs() + bu.abs())


def _fold_ratio(k: int, dtype: torch.dtype) -> float:
    """A number of ``dtype`` at least ``gamma_{t+3} / gamma_3`` for ``t = split_terms(k, dtype)``
    (see ``_margin_vector``)."""
    return rounding.gamma_ratio(split_terms(k, dtype) + 3, 3, dtype)


# Boolean masks and torch.where cost 5-25x an arithmetic operation per element on the CPU (up to
# 65 µs against 3 µs on a [256, 128] float32 tensor), and a relaxation makes a few dozen
# selections: so they are arithmetic on 0/1 indicators, each a comparison written straight into a
# float tensor (as cheap as a subtraction; a boolean result converted afterwards costs 8x, and
# the sign of a difference 4x). Products with 0 or 1 are exact, and lerp with weight 0 or 1
# returns one of its ends unchanged; so every operand, also of a branch not taken, must stay
# finite (``_slope``).
def _gt(a: Tensor | float, b: Tensor | float) -> Tensor:
    """1.0 where ``a > b``, else 0.0."""
    return _indicator(torch.gt, a, b) if isinstance(a, Tensor) else _indicator(torch.lt, b, a)


def _ge(a: Tensor | float, b: Tensor | float) -> Tensor:
    """1.0 where ``a >= b``, else 0.0."""
    return _indicator(torch.ge, a, b) if isinstance(a, Tensor) else _indicator(torch.le, b, a)


def _indicator(compare: Callable[..., Tensor], a: Tensor, b: Tensor | float) -> Tensor:
    # An empty ``out`` takes the broadcast shape (torch.broadcast_shapes costs 30 µs in Python).
    return compare(a, b, out=a.new_empty(0))


def _slope(num: Tensor, den: Tensor) -> Tensor:
    """``num / den`` clamped to [0, 1]. Where a slope is chosen, ``0 <= num <= den`` holds for the
    computed operands (rounding is monotone), so the clamp changes nothing there; where it is
    not, a tiny ``den`` could make the quotient infinite, and lerp's ``0 * inf`` would turn the
    selection into NaN."""
    return (num / den).clamp_(0.0, 1.0)


def _pick(mask: Tensor, a: Tensor | float, b: Tensor | float) -> Tensor:
    """``a`` where the indicator ``mask`` is 1, ``b`` where it is 0."""
    a = a if isinstance(a, Tensor) else torch.full_like(mask, a)
    b = b if isinstance(b, Tensor) else torch.full_like(mask, b)
    return torch.lerp(b, a, mask)


def _inside(kink: Tensor, lo: Tensor, up: Tensor) -> Tensor:
    """``kink`` clamped into ``[lo, up]`` (exact)."""
    return torch.minimum(torch.maximum(kink, lo), up)


def _shift(g: Tensor, eps: float | Tensor, side: str) -> Tensor:
    """``g + eps`` rounded up (``side="up"``) or ``g - eps`` rounded down, where ``eps > 0``; ``g``
    unchanged where it is 0 (bit for bit as without a perturbation)."""
    moved = rounding.up(g + eps) if side == "up" else rounding.down(g - eps)
    if not isinstance(eps, Tensor):
        return moved if eps else g
    return _pick(_gt(eps, 0.0), moved, g)
