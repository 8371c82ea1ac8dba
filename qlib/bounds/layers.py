"""The per-layer objects of the perturbation model, each with its three rules.

A network (``nn.Sequential`` of Linear, Conv2d, ReLU and Flatten, a ReLU after every affine layer
but the last) becomes a list of ``Layer`` objects (``layers``). Each knows its shapes and

- ``ibp``: the interval of its output from the interval of its input,
- ``backward``: a linear lower bound in terms of its input from one in terms of its output
  (back-substitution),
- ``perturbed``: its output for one concrete perturbed network (float64), the concrete
  counterpart that attacks and solver witnesses replay.

Every affine layer's input is non-negative (pixels in [0, 1], ReLU outputs), which is what makes
the weight-perturbation rules below exact per neuron.
"""

from __future__ import annotations

import math
import weakref
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.bounds import rounding
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import Perturbation

__all__ = [
    "Affine",
    "Clipped",
    "Conv2d",
    "Flatten",
    "Layer",
    "Linear",
    "ReLU",
    "RowDelta",
    "clip_of",
    "layers",
]


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


def floor(value: float, dtype: torch.dtype) -> float:
    """The largest number of ``dtype`` that is <= ``value``."""
    t = torch.tensor(value, dtype=dtype)
    if float(t) > value:
        t = torch.nextafter(t, torch.tensor(float("-inf"), dtype=dtype))
    return float(t)


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


# id(parameter) -> (weak reference to it, its version, its float64 copy). Weak, so that the
# cache never keeps a model's weights alive; dead entries are dropped on the next insertion.
_FLOAT64: dict[int, tuple[weakref.ref, int, Tensor]] = {}


def _float64(tensor: Tensor) -> Tensor:
    """``tensor`` in float64, converted once per version (attacks run thousands of forwards)."""
    hit = _FLOAT64.get(id(tensor))
    if hit is not None and hit[0]() is tensor and hit[1] == tensor._version:
        return hit[2]
    for key in [k for k, (ref, _, _) in _FLOAT64.items() if ref() is None]:
        del _FLOAT64[key]
    value = tensor.detach().to(torch.float64)
    _FLOAT64[id(tensor)] = (weakref.ref(tensor), tensor._version, value)
    return value


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
        weight = getattr(module, "weight", None)
        dtype = weight.dtype if isinstance(weight, Tensor) else torch.get_default_dtype()
        with torch.no_grad():
            self.out_shape = tuple(module(torch.zeros(1, *in_shape, dtype=dtype)).shape[1:])

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

    def input_box(self) -> Interval:
        if self.inp is None:
            raise RuntimeError(f"layer {self.index}: its input interval is not set")
        return self.inp


def _abs_dot(A: Tensor, v: Tensor) -> Tensor:
    """``|A| · v`` per sample ``[N, S]`` for ``A`` ``[N, S, *shape]`` or ``[S, *shape]`` and
    ``v`` ``[N, *shape]`` (the evaluation on absolute values that a rounding margin needs)."""
    n, k = len(v), v[0].numel()
    per_sample = A.ndim == v.ndim + 1
    v = v.reshape(n, k)
    if per_sample:
        return torch.bmm(A.abs().reshape(n, -1, k), v.unsqueeze(2)).squeeze(2)
    return v @ A.abs().reshape(-1, k).T


def _step_slack(bound: LinearBound, abs_value: Tensor, n_terms: int) -> Tensor | None:
    """The slack after one backward step: the old one plus the step's rounding margin, whose
    evaluation on absolute values is ``abs_value`` ``[N, S]`` plus ``|const|``."""
    if not rounding.enabled():
        return bound.slack
    step = rounding.margin(abs_value + bound.const.abs(), n_terms)
    return step if bound.slack is None else rounding.up(bound.slack + step)


class Flatten(Layer):
    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        return Interval(box.lower.flatten(1), box.upper.flatten(1))

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        lead = bound.A.shape[: bound.A.ndim - len(self.out_shape)]
        return LinearBound(bound.A.reshape(*lead, *self.in_shape), bound.const, bound.slack)

    def perturbed(self, h: Tensor) -> Tensor:
        return h.flatten(1)


class Affine(Layer):
    """``ẑ = (W + ΔW) h + (b + Δb)`` for a non-negative input ``h``; Linear or Conv2d subclasses."""

    def weight(self, like: Tensor) -> Tensor:
        return self.module.weight.to(like.dtype)

    def bias(self, like: Tensor) -> Tensor:
        b = self.module.bias
        if b is None:
            return torch.zeros(self.module.weight.shape[0], dtype=like.dtype, device=like.device)
        return b.to(like.dtype)

    @abstractmethod
    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        """``weight`` applied to ``x`` [B, *in_shape] without bias -> [B, *out_shape]."""
        raise NotImplementedError

    @abstractmethod
    def apply_t(self, A: Tensor, weight: Tensor) -> Tensor:
        """The transpose: ``A`` [B, *out_shape] -> [B, *in_shape]."""
        raise NotImplementedError

    @abstractmethod
    def bias_map(self, like: Tensor) -> Tensor:
        """The bias broadcast to ``out_shape``."""
        raise NotImplementedError

    def apply_ones(self, x: Tensor) -> Tensor:
        """An all-ones weight applied to ``x``: sums over every output's receptive field."""
        return self.apply(x, torch.ones_like(self.weight(x)))

    def apply_t_ones(self, A: Tensor) -> Tensor:
        """The transpose of ``apply_ones``."""
        return self.apply_t(A, torch.ones_like(self.weight(A)))

    @property
    def fan_in(self) -> int:
        """Terms of one output's dot product: the inputs of one neuron or one kernel."""
        return self.module.weight[0].numel()

    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        """The exact interval product for a non-negative input ``[l, u]``: with
        ``Wu = W + eps_w`` and ``Wl = W - eps_w``, ``Wu⁺ u + Wu⁻ l + b + eps_b`` above and
        ``Wl⁺ l + Wl⁻ u + b - eps_b`` below, each term its own weight's extreme (tighter than
        the centre-radius rule by ``eps_w (u_j - l_j)`` per term), rounded outward."""
        lo, hi = box.lower, box.upper
        W = self.weight(lo)
        eps_w = rounding.ceil(pert.eps_weight, lo.dtype)
        eps_b = rounding.ceil(pert.eps_bias, lo.dtype)
        b = self.bias_map(lo)
        Wu, Wl = (rounding.up(W + eps_w), rounding.down(W - eps_w)) if eps_w else (W, W)
        upper = self.apply(hi, Wu.clamp(min=0)) + self.apply(lo, Wu.clamp(max=0)) + b
        lower = self.apply(lo, Wl.clamp(min=0)) + self.apply(hi, Wl.clamp(max=0)) + b
        if eps_b:
            upper, lower = upper + eps_b, lower - eps_b
        if rounding.enabled():
            # 2 fan_in + 2 terms per output; |Wu|, |Wl| <= |W| + eps_w and 0 <= l <= u.
            m = rounding.margin(
                self.apply(hi, W.abs() + eps_w) + b.abs() + eps_b, 2 * self.fan_in + 2
            )
            upper, lower = rounding.up(upper + m), rounding.down(lower - m)
        return Interval(lower, upper)

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        A = bound.A
        lead = A.shape[: A.ndim - len(self.out_shape)]
        flat = A.reshape(-1, *self.out_shape)
        W = self.weight(A)
        eps_w = rounding.ceil(pert.eps_weight, A.dtype)
        eps_b = rounding.ceil(pert.eps_bias, A.dtype)
        A_in = self.apply_t(flat, W)
        l1 = None
        if eps_w:
            # Valid because the layer input is non-negative: min over ΔW of c^T ΔW h = -eps_w ||c||_1 1^T h
            # per output row, i.e. the transpose of an all-ones kernel applied to |c|.
            A_in, l1 = self.sub_weight_term(A_in, flat, eps_w)
        const = self.bias_dot(flat)
        if eps_b:
            if l1 is None:
                l1 = torch.linalg.vector_norm(flat.flatten(1), 1, dim=1)
            const = const - eps_b * l1
        return LinearBound(
            A_in.reshape(*lead, *self.in_shape),
            bound.const + const.reshape(lead),
            self.step_slack(bound, pert),
        )

    def step_slack(self, bound: LinearBound, pert: Perturbation) -> Tensor | None:
        """``bound.slack`` plus the rounding error of ``backward(bound)`` over the layer input
        ``h`` in ``[0, u_h]``: ``|A| (|W| + eps_w) u_h`` for ``A_in h`` and ``|A| (|b| + eps_b)``
        for the constant. Per sample ``[N, S]`` even where ``A`` is shared."""
        if not rounding.enabled():
            return bound.slack
        A = bound.A
        eps_w = rounding.ceil(pert.eps_weight, A.dtype)
        eps_b = rounding.ceil(pert.eps_bias, A.dtype)
        u_h = self.input_box().upper
        v = self.apply(u_h, self.weight(A).abs() + eps_w) + self.bias_map(A).abs() + eps_b
        return _step_slack(bound, _abs_dot(A, v), math.prod(self.out_shape) + 4)

    def sub_weight_term(
        self, A_in: Tensor, flat: Tensor, eps: float
    ) -> tuple[Tensor, Tensor | None]:
        """``A_in - eps * apply_t_ones(|flat|)`` and, when computed anyway, ``||flat||_1`` [B]."""
        return A_in - eps * self.apply_t_ones(flat.abs()), None

    def bias_dot(self, flat: Tensor) -> Tensor:
        """``A · b`` [B] for ``A`` [B, *out_shape]."""
        return (flat * self.bias_map(flat)).flatten(1).sum(1)

    def perturbed(
        self, h: Tensor, dW: Tensor | RowDelta | None = None, db: Tensor | None = None
    ) -> Tensor:
        """``(W + dW) h + (b + db)`` in float64 for ``h`` [N, *in_shape]; a delta with a leading
        sample dimension ``[N, ...]`` gives every sample its own network."""
        W = _float64(self.module.weight)
        b = self.bias(W).detach() if self.module.bias is None else _float64(self.module.bias)
        if isinstance(dW, RowDelta):
            z = self.perturbed(h, None, db)
            # (W + eps t 1^T) h = W h + eps t (1^T h), the sum running over each output's receptive
            # field: the same for every output row, so one all-ones row computes it.
            support = self.apply(h, torch.ones_like(W[:1]))
            t = dW.t.to(torch.float64).reshape(len(h), -1, *([1] * (support.ndim - 2)))
            return z + dW.eps * t * support
        if dW is not None:
            W = W + dW.to(torch.float64)
        if db is not None:
            b = b + db.to(torch.float64)
        return self.apply_per_sample(h, W, b)

    @abstractmethod
    def apply_per_sample(self, h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        """``W h + b`` where ``W`` and ``b`` may carry a leading sample dimension."""
        raise NotImplementedError


class Linear(Affine):
    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight.T

    def apply_t(self, A: Tensor, weight: Tensor) -> Tensor:
        return A @ weight

    def bias_map(self, like: Tensor) -> Tensor:
        return self.bias(like)

    def apply_ones(self, x: Tensor) -> Tensor:
        return x.sum(-1, keepdim=True).expand(*x.shape[:-1], self.module.out_features)

    def apply_t_ones(self, A: Tensor) -> Tensor:
        return A.sum(-1, keepdim=True).expand(*A.shape[:-1], self.module.in_features)

    def sub_weight_term(
        self, A_in: Tensor, flat: Tensor, eps: float
    ) -> tuple[Tensor, Tensor | None]:
        # Every input gets the same term eps ||c||_1: one norm, one in-place subtraction.
        l1 = torch.linalg.vector_norm(flat, 1, dim=-1)
        if A_in.requires_grad or l1.requires_grad:
            return A_in - eps * l1.unsqueeze(-1), l1
        return A_in.sub_(eps * l1.unsqueeze(-1)), l1

    def bias_dot(self, flat: Tensor) -> Tensor:
        return flat @ self.bias(flat)

    def apply_per_sample(self, h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        if W.ndim > self.module.weight.ndim:
            return torch.einsum("ni,noi->no", h, W) + b
        return h @ W.T + b


class Conv2d(Affine):
    def __init__(self, index: int, module: nn.Conv2d, in_shape: tuple[int, ...]) -> None:
        super().__init__(index, module, in_shape)
        m = module
        # conv_transpose2d cannot tell which input size produced the output: recover the rows and
        # columns that the stride dropped as output padding.
        self.output_padding = tuple(
            in_shape[1 + d]
            - (
                (self.out_shape[1 + d] - 1) * m.stride[d]
                - 2 * m.padding[d]
                + m.dilation[d] * (m.kernel_size[d] - 1)
                + 1
            )
            for d in range(2)
        )

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        return F.conv2d(x, weight, None, m.stride, m.padding, m.dilation, m.groups)

    def apply_t(self, A: Tensor, weight: Tensor) -> Tensor:
        m = self.module
        return F.conv_transpose2d(
            A, weight, None, m.stride, m.padding, self.output_padding, m.groups, m.dilation
        )

    def bias_map(self, like: Tensor) -> Tensor:
        return self.bias(like).reshape(-1, 1, 1)

    def apply_per_sample(self, h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        m, n = self.module, len(h)
        if W.ndim > m.weight.ndim:
            # One grouped convolution runs a different kernel for every sample.
            z = F.conv2d(
                h.reshape(1, -1, *h.shape[2:]),
                W.reshape(-1, *W.shape[2:]),
                None,
                m.stride,
                m.padding,
                m.dilation,
                m.groups * n,
            )
            z = z.reshape(n, -1, *z.shape[2:])
        else:
            z = F.conv2d(h, W, None, m.stride, m.padding, m.dilation, m.groups)
        return z + (b.reshape(n, -1, 1, 1) if b.ndim == 2 else b.reshape(-1, 1, 1))


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
        k = bl[0, 0].numel()
        flat_b = bl.reshape(-1, k, 1)  # [N, k, 1]
        const = torch.matmul(A.reshape(*A.shape[: A.ndim - len(self.in_shape)], k), flat_b)
        const = const + torch.matmul(
            neg.reshape(*neg.shape[: neg.ndim - len(self.in_shape)], k),
            (bu - bl).reshape(-1, k, 1),
        )
        slack = bound.slack
        if rounding.enabled():
            # Entry errors of A_in are within |A| (2|al| + |au|) and act on |ẑ| <= max(|l|, |u|);
            # the constant's within |A| (2|bl| + |bu|).
            al0, bl0, au0, bu0 = (t.squeeze(1) for t in (al, bl, au, bu))
            z = torch.maximum(self.pre.lower.abs(), self.pre.upper.abs())
            v = (2 * al0.abs() + au0.abs()) * z + 2 * bl0.abs() + bu0.abs()
            slack = _step_slack(bound, _abs_dot(A, v), k + 4)
        return LinearBound(A_in, bound.const + const.squeeze(-1), slack)

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


# ----------------------------------------------------------------------------- network


def layers(model: nn.Module, in_shape: Sequence[int]) -> list[Layer]:
    """The per-layer objects of ``model`` for inputs of shape ``in_shape`` (no batch dim).

    Raises ``ValueError`` naming the layer for unsupported modules, a missing ReLU after a hidden
    affine layer, or a shape that does not fit.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    shape = tuple(int(s) for s in in_shape)
    out: list[Layer] = []
    last_kind = "input"
    for i, module in enumerate(model):
        name = f"layer {i} ({type(module).__name__})"
        if isinstance(module, nn.Flatten):
            if module.start_dim != 1 or module.end_dim != -1:
                raise ValueError(f"{name}: only Flatten(start_dim=1, end_dim=-1) is supported")
            cls: type[Layer] = Flatten
        elif isinstance(module, nn.Linear):
            if len(shape) != 1 or shape[0] != module.in_features:
                raise ValueError(
                    f"{name}: expects inputs of shape ({module.in_features},), gets {shape}"
                )
            cls = Linear
        elif isinstance(module, nn.Conv2d):
            if module.padding_mode != "zeros" or isinstance(module.padding, str):
                raise ValueError(f"{name}: only explicit zero padding is supported")
            if len(shape) != 3 or shape[0] != module.in_channels:
                raise ValueError(
                    f"{name}: expects inputs of shape ({module.in_channels}, H, W), gets {shape}"
                )
            cls = Conv2d
        elif isinstance(module, nn.ReLU):
            if last_kind != "affine":
                raise ValueError(f"{name}: a ReLU must directly follow a Linear or Conv2d layer")
            cls = ReLU
        else:
            raise ValueError(
                f"{name}: unsupported layer; bounds support Linear, Conv2d, ReLU and Flatten"
            )
        if cls is not Flatten:
            if cls is not ReLU and last_kind == "affine":
                raise ValueError(
                    f"{name}: the hidden affine layer before it must be followed by a ReLU"
                )
            last_kind = "relu" if cls is ReLU else "affine"
        try:
            layer = cls(i, module, shape)
        except RuntimeError as e:
            raise ValueError(f"{name}: input shape {shape} does not fit: {e}") from e
        out.append(layer)
        shape = layer.out_shape
    if last_kind != "affine":
        raise ValueError("the network must end with a Linear or Conv2d layer giving the logits")
    return out
