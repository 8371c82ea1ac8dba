"""Affine layers, ``(W + ΔW) h + (b + Δb)`` for a non-negative input ``h``: the interval
product, the back-substitution rule, the final concretisation and the concrete forward that
``Linear`` (``qlib.bounds.linear``) and ``Conv2d`` (``qlib.bounds.conv``) share; they differ only
in how a weight is applied and transposed."""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from qlib.bounds import rounding
from qlib.bounds.base import (
    DERIVED,
    Layer,
    RowDelta,
    abs_dot,
    as_float64,
    converted,
    rowdot,
    split_terms,
    step_slack,
    version,
)
from qlib.bounds.memo import memo as _memo
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import Perturbation

__all__ = ["Affine"]


class _Step(NamedTuple):
    """``Affine._step``: the rows' shape, the rows flattened and their ``|A|`` (``None`` without
    radii and margins), the weight and radii in the rows' dtype, and the result."""

    lead: tuple[int, ...]
    flat: Tensor
    abs_flat: Tensor | None
    W: Tensor
    eps_w: float
    eps_b: float
    A_in: Tensor
    const: Tensor
    l1: Tensor | None


def _differentiable(w: Tensor) -> bool:
    """Whether results from ``w`` must carry gradients (never remembered then)."""
    return w.requires_grad and torch.is_grad_enabled()


class Affine(Layer):
    """``ẑ = (W + ΔW) h + (b + Δb)`` for a non-negative input ``h``; Linear or Conv2d subclasses."""

    reads_input = False  # set by ``layers`` on the first affine layer (after Flattens only)

    def weight(self, like: Tensor) -> Tensor:
        w = self.module.weight
        return w.to(like.dtype) if _differentiable(w) else converted(w, like.dtype)

    def term(
        self, name: str, eps_w: float, dtype: torch.dtype, make: Callable[[], Tensor]
    ) -> Tensor:
        """``make()``: a tensor that depends only on this layer's weight, ``eps_w`` and ``dtype``
        (and whether margins are on), remembered across calls (``base.DERIVED``: an exploration
        certifies many genomes whose layers share a weight radius) unless the weight takes part
        in autograd."""
        w = self.module.weight
        if _differentiable(w):
            return make()
        return DERIVED.get(w, (name, eps_w, dtype, rounding.enabled()), lambda: make().detach())

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

    def apply_t_in_parts(self, A: Tensor, weight: Tensor, split: bool) -> Tensor:
        """``apply_t(A, weight)``, summed in parts where ``split`` and the layer sums so
        (``entry_roundings`` counts them); by default as one product."""
        return self.apply_t(A, weight)

    def rises(self, d: Tensor, both: Tensor) -> tuple[Tensor, int]:
        """``apply(d, both)`` for ``ibp``'s width ``d`` and stacked rise weights ``both``, and
        the roundings a term of it passes through, the width's own included; by default one
        product, ``fan_in + 1``."""
        return self.apply(d, both), self.fan_in + 1

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
        """The exact interval product for a non-negative input ``h`` in ``[l, l + d]``: since
        ``h >= 0``, each weight's upper end ``W + eps_w`` maximises and its lower end minimises,
        so with ``Wu = W + eps_w`` and ``Wl = W - eps_w`` the output lies between
        ``W l - eps_w Σl + Wl⁻ d + b - eps_b`` and ``W l + eps_w Σl + Wu⁺ d + b + eps_b`` (``Σl``
        over each output's receptive field). That is tighter than the centre-radius rule
        ``|W| r + eps_w Σ max(|l|, |u|)`` by ``eps_w (u_j - l_j)`` per term, and takes the base
        product ``W l`` and the two rises over the width ``d`` (one product, weights stacked).

        Rounded outward. The base is computed in ``base_dtype`` (float64 for a Linear layer
        even when the box is float32): its rounding error scales with ``|W| l``, which for a
        narrow box is far larger than the width, while the rises' error scales with the width
        itself; in float64 the base's margin may use the cheap bound ``max(l) Σ|W| >= |W| l``.
        """
        memo, w, b = _memo(), self.module.weight, self.module.bias
        if memo is not None and not _differentiable(w):
            key = (
                "interval", version(w), None if b is None else version(b),
                pert.eps_weight, pert.eps_bias, rounding.enabled(),
                box.lower.dtype, box.lower.shape, float(box.lower.sum()), float(box.upper.sum()),
            )  # fmt: skip
            return memo.recall(
                key, w, (box.lower, box.upper), lambda: self._ibp(box, pert), counted=True
            )
        return self._ibp(box, pert)

    def _ibp(self, box: Interval, pert: Perturbation) -> Interval:
        lo, hi = box.lower, box.upper
        dtype = lo.dtype
        wide = self.base_dtype(dtype)
        eps_w = rounding.ceil(pert.eps_weight, dtype)
        eps_b = rounding.ceil(pert.eps_bias, dtype)
        W = self.weight(lo)
        d = hi - lo  # its rounding is counted in the rises' margin
        # Wu⁺ and Wl⁻ stacked: the two rises are one product (a GEMM twice as wide runs faster
        # than two).
        both = self.term(
            "rise|fall",
            eps_w,
            dtype,
            lambda: torch.cat(
                [rounding.up(W + eps_w).clamp(min=0), rounding.down(W - eps_w).clamp(max=0)]
            ),
        )
        rise_w, fall_w = both.split(len(W))
        split = self.split_rises(d, eps_w)
        if split is None:
            product, rise_n = self.rises(d, both)
            rise, fall = product.split(len(W), dim=1)
        else:  # three more roundings than one product (``split_rises``)
            (rise, fall), rise_n = split, self.fan_in + 4
        base, ones, low_max, abs_base = self.lower_terms(lo)
        Ww, b = self.weight(base), self.bias_map(base)
        spread = eps_w * ones if eps_w else None
        top, bottom, alpha = b + eps_b, b - eps_b, 1.0
        if rounding.enabled():
            # A rise's terms have one sign and rise_n roundings each: scaling it by 1 + factor
            # covers them, relative to its computed value.
            alpha = 1 + rounding.factor(rise_n, dtype)
            tiny = rounding.underflow(rise_n, dtype)
            # Then every term of a side passes through at most fan_in + 6 roundings in ``wide``:
            # its dot product, the sum for the spread, the scaling and four additions.
            n = self.fan_in + 6
            if wide == torch.float64:
                # A row of bounds from the batch's largest input and width: loose, but gamma is
                # 2^-53 times it, and a row costs no pass over the [N, out] result.
                size = max(low_max, alpha * d.max().item())  # both >= 0
                rows = self.term(
                    "rows",
                    eps_w,
                    dtype,
                    lambda: (
                        (Ww.abs() + rise_w.to(wide) - fall_w.to(wide) + eps_w).flatten(1).sum(1)
                    ),
                )
                total = size * rows.reshape(b.shape) + b.abs() + eps_b
                margin = rounding.margin(total, n) + tiny
            else:
                total = abs_base + b.abs() + eps_b + alpha * (rise - fall)
                margin = rounding.margin(total if spread is None else total + spread, n) + tiny
            top, bottom = top + margin, bottom - margin
        upper, lower = base + top, base + bottom
        if spread is not None:
            upper, lower = upper.add_(spread), lower.sub_(spread)
        upper, lower = upper.add_(rise, alpha=alpha), lower.add_(fall, alpha=alpha)
        if wide != dtype:
            upper = rounding.convert(upper, dtype, "up")
            lower = rounding.convert(lower, dtype, "down")
        return Interval(lower, upper)

    def split_rises(self, d: Tensor, eps_w: float) -> tuple[Tensor, Tensor] | None:
        """The rises ``(Wu⁺ d, Wl⁻ d)`` of ``ibp`` from products that do not depend on ``eps_w``,
        or ``None`` where that does not pay (the default).

        ``(W + e)⁺ = W⁺ + e [W >= 0] + (W + e) [-e <= W < 0]`` and ``(W - e)⁻ = W⁻ - e [W <= 0]
        + (W - e) [0 < W <= e]``, exactly; the last terms are sparse for a small ``e``. So the
        rises take ``W⁺ d``, ``W⁻ d`` and the sums ``Σ d`` over each output's non-negative and
        non-positive weights, which the memo of ``remember_intervals`` keeps per width ``d``,
        and bounds on the sparse terms. For the layer that reads the network input
        (``reads_input``): an exploration's genomes repeat the input's bit width, and so ``d``,
        far more often than the pair of it and the layer's weight bits. Every term of a side has
        one sign and passes through at most three more roundings than a plain rise (``ibp``
        counts them)."""
        return None

    def lower_terms(self, lo: Tensor) -> tuple[Tensor, Tensor, float, Tensor | None]:
        """What ``ibp`` takes from the lower end ``lo`` of its box alone, in ``base_dtype``: the
        base ``W l``, the sums ``Σl`` over each output's receptive field, and for the margins
        ``max l`` (float64 base) or ``|W| l`` (a base in the box's format). Remembered inside
        ``remember_intervals``: the input of the first layer repeats far more often than its
        radii do (an exploration's genomes share the input's bit width). The layer keeps the
        last one for ``concretise``, and a ``restrict``ed box takes its samples' rows of it."""
        hit = self._lower
        if hit is not None and hit[0] is lo and hit[1] == rounding.enabled():
            return hit[2]
        memo, w, parent = _memo(), self.module.weight, self._parent
        if parent is not None and parent[1] is lo:
            # Some samples of an earlier box (``restrict``): their rows of its terms. The batch's
            # largest input still bounds the subset's (low_max).
            base, ones, low_max, abs_base = self.lower_terms(parent[0])
            idx = parent[2]
            terms = (base[idx], ones[idx], low_max, None if abs_base is None else abs_base[idx])
        elif memo is None or _differentiable(w):
            terms = self._lower_terms(lo)
        else:
            key = ("lower", version(w), rounding.enabled(), lo.dtype, lo.shape, float(lo.sum()))
            terms = memo.recall(key, w, (lo,), lambda: self._lower_terms(lo))
        # Kept for ``concretise``, which meets the same box again at the end of a
        # back-substitution (a layer lives for one bound).
        self._lower = (lo, rounding.enabled(), terms)
        return terms

    _lower: tuple | None = None  # (lo, margins on, lower_terms(lo)) of the last call
    _parent: tuple | None = None  # (earlier lo, lo, idx) from the last ``restrict``

    def restrict(self, idx: Tensor, box: Interval) -> None:
        if self.inp is not None:
            self._parent = (self.inp.lower, box.lower, idx)
        self.inp = box

    def _lower_terms(self, lo: Tensor) -> tuple[Tensor, Tensor, float, Tensor | None]:
        low = lo.to(self.base_dtype(lo.dtype))
        Ww = self.weight(low)
        base, ones = self.apply(low, Ww), self.apply_ones(low)
        if not rounding.enabled():
            return base, ones, 0.0, None
        if low.dtype == torch.float64:
            return base, ones, low.max().item(), None
        return base, ones, 0.0, self.apply(low, self.term("abs", 0.0, lo.dtype, Ww.abs))

    def base_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The format of ``ibp``'s base product for a box in ``dtype``: float64 when margins are
        on (a float64 matrix product costs about twice a float32 one on the CPU); without them
        (training) the box's own."""
        return torch.float64 if rounding.enabled() else dtype

    def _step(self, bound: LinearBound, pert: Perturbation, split: bool = True) -> _Step:
        """The back-substitution rule through this layer: ``A_in = A W - eps_w |A| 1 1^T``
        (``[B, *in_shape]``, rows flattened) and ``const = A b - eps_b ||A||_1`` (``[B]``);
        ``split``: ``A W`` summed in parts where the layer does (``apply_t_in_parts``)."""
        A = bound.A
        lead = A.shape[: A.ndim - len(self.out_shape)]  # [S] (shared rows) or [N, S]
        flat = A.reshape(-1, *self.out_shape)
        W = self.weight(A)
        eps_w = rounding.ceil(pert.eps_weight, A.dtype)
        eps_b = rounding.ceil(pert.eps_bias, A.dtype)
        A_in = self.apply_t_in_parts(flat, W, split)
        # |A|, once for the weight term, the bias term and the step's margin.
        abs_flat = flat.abs() if eps_w or eps_b or rounding.enabled() else None
        l1 = None
        if eps_w:
            # Valid because the layer input is non-negative: min over ΔW of c^T ΔW h = -eps_w ||c||_1 1^T h
            # per output row, i.e. the transpose of an all-ones kernel applied to |c|.
            A_in, l1 = self.sub_weight_term(A_in, abs_flat, eps_w)
        const = self.bias_dot(flat)
        if eps_b:
            if l1 is None:
                l1 = abs_flat.flatten(1).sum(1)
            const = const - eps_b * l1
        return _Step(lead, flat, abs_flat, W, eps_w, eps_b, A_in, const, l1)

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        s = self._step(bound, pert)
        return LinearBound(
            s.A_in.reshape(*s.lead, *self.in_shape),
            bound.const + s.const.reshape(s.lead),
            self.step_slack(bound, pert, s.abs_flat),
        )

    def concretise(self, bound: LinearBound, pert: Perturbation, box: Interval) -> Tensor:
        """Lower bounds ``[N, S]`` of ``bound`` (over this layer's output) for every input in
        ``box`` and every weight and bias in their radii: ``backward`` and the concretisation of
        its result in one step, rounded outward.

        ``min`` over ``h`` in ``[l, u]`` of ``A_in h`` is ``A_in l + A_in⁻ (u - l)``, and
        ``A_in l = A (W l) - eps_w |A| Σl``, where ``W l`` and ``Σl`` are ``ibp``'s base and
        sums for this box (``lower_terms``, float64 for a Linear layer with margins on). So
        ``A_in``, and its rounding error, meet only the width ``u - l``; the large term is a dot
        product over the layer's outputs with a base computed in float64. That is tighter than
        concretising the computed ``A_in`` over ``[l, u]`` (whose error acts on all of ``u``)
        and takes one dot product over the layer's inputs instead of three.

        Margins: each entry of the computed ``A_in`` is within ``gamma_{e+4} |A| (|W| +
        eps_w)`` of the exact one (``step_slack``; ``e``: ``entry_roundings``, summed in parts
        except at the layer that reads the input), which moves
        ``A_in⁻ (u - l)`` by at most that times ``u - l``; the base is within ``gamma_{fan_in}
        |W| l`` of ``W l`` in its own format (``|W| l <= max(l) Σ|W|`` for a float64 base) and
        one rounding of it when converted; the dot products over the ``O`` outputs and the four
        additions of the result add at most ``O + 6`` roundings to every term of ``|A| (|b| +
        eps_b)`` and ``t + 6`` to those of ``|A| |W l|`` (a split sum, ``t = split_terms(O)``),
        the weight term's ``gamma`` its sums, and the width's dot product over the ``k`` inputs
        ``k + 5`` to its own (one-signed) terms. One product of ``|A|`` with a vector weighing
        each part by its ``gamma`` relative to the first covers all of them but the last."""
        A, dtype, on = bound.A, bound.A.dtype, rounding.enabled()
        # A_in meets only the width. At the layer that reads the input that is the input's
        # radius, so narrow that summing A W in parts there bought little (CROWN-IBP's float32
        # looseness on the MNIST 4x256 MLP: 8.10e-5 against 8.13e-5) for the largest product of
        # a back-substitution: one product. At a hidden layer (a stop) the width is not small.
        split = not self.reads_input
        lead, _, abs_flat, W, eps_w, eps_b, A_in, const, l1 = self._step(bound, pert, split)
        n, outputs = box.lower.shape[0], math.prod(self.out_shape)
        width = rounding.up(box.width).reshape(n, -1)
        spread = rowdot(torch.clamp(A_in.reshape(*lead, -1), max=0.0), width)
        base, ones, low_max, abs_base = self.lower_terms(box.lower)
        base_c = base.to(dtype)
        rows = A.reshape(*lead, outputs)
        low = rowdot(rows, base_c.reshape(n, outputs), split=True)
        ones_c = None
        if eps_w:
            ones_c = ones.to(dtype)
            low = low - eps_w * self.abs_dot_ones(rows, abs_flat, l1, ones_c)
        low = low + spread + const.reshape(lead) + bound.const
        if not on:
            return low
        wide = base.dtype
        main_n = split_terms(outputs, dtype) + 6

        def weight(gamma: float) -> float:
            """A part's gamma relative to the main one, rounded up."""
            return gamma / rounding.gamma(main_n, dtype) * (1 + 1e-6)

        constant = self.bias_map(base_c).abs() + eps_b
        v = base_c.abs() + weight(rounding.gamma(outputs + 6, dtype)) * constant
        coefficients = self.apply(
            width.reshape(n, *self.in_shape),
            self.term("abs+eps", eps_w, dtype, lambda: W.abs() + eps_w),
        )
        entry = self.entry_roundings(dtype, split)
        v = v + weight(rounding.gamma(entry + 4, dtype)) * coefficients
        if abs_base is None:  # a float64 base: |W| l <= max(l) Σ|W|, row by row
            sums = self.term(
                "abs rows", 0.0, wide, lambda: self.weight(base).abs().flatten(1).sum(1)
            )
            shape = (-1, *([1] * (len(self.out_shape) - 1)))
            size = (low_max * sums).reshape(shape).to(dtype)
        else:  # a base in dtype, with |W| l computed beside it (its own sum, rounded down)
            size = abs_base * (1 + 2 * rounding.gamma(self.fan_in + 1, dtype))
        v = v + weight(rounding.gamma(self.fan_in + 1, wide)) * size
        if eps_w:
            gamma = rounding.gamma(outputs + 8, dtype) + rounding.gamma(self.fan_in + 1, wide)
            v = v + weight(gamma) * eps_w * ones_c
        total = abs_dot(rows, v.reshape(n, outputs), abs_flat)
        slack = rounding.margin(total, main_n, outputs + self.fan_in + 12)
        slack = rounding.up(slack + rounding.margin(-spread, width.shape[1] + 5))
        slack = rounding.up(slack + rounding.margin(bound.const.abs(), 5))
        if bound.slack is not None:
            slack = rounding.up(slack + bound.slack)
        return rounding.down(low - slack)

    def abs_dot_ones(
        self, rows: Tensor, abs_flat: Tensor, l1: Tensor | None, ones: Tensor
    ) -> Tensor:
        """``|A| · apply_ones(l)`` per row, ``[N, S]`` or ``[S]``-broadcast, for ``rows`` = ``A``
        flattened to ``[*lead, O]`` (``abs_flat``: ``|A|``, ``l1``: its row sums if known)."""
        return abs_dot(rows, ones.reshape(len(ones), -1), abs_flat.reshape(rows.shape))

    def step_slack(
        self, bound: LinearBound, pert: Perturbation, abs_A: Tensor | None = None
    ) -> Tensor | None:
        """``bound.slack`` plus the rounding error of ``backward(bound)`` over the layer input
        ``h`` in ``[0, u_h]``: ``|A| (|W| + eps_w) u_h`` for ``A_in h`` and ``|A| (|b| + eps_b)``
        for the constant. Per sample ``[N, S]`` even where ``A`` is shared.

        A term of an entry of ``A_in`` passes through ``entry_roundings`` (the outputs its input
        reaches, ``fan_out``, or fewer where ``apply_t_in_parts`` splits the sum), plus the
        weight term's three; the constant sums over all outputs. Rows with at most ``k =
        bound.nonzeros`` nonzero entries take at most ``k + 1`` and ``k`` instead: their other
        products are exact zeros, and adding a zero is exact in any order. The evaluation on
        absolute values passes each term through ``fan_in`` more roundings (the product with
        ``u_h``). ``abs_A``: ``|A|`` if the caller has it (any shape with ``A``'s elements)."""
        if not rounding.enabled():
            return bound.slack
        A = bound.A
        abs_A = A.abs() if abs_A is None else abs_A.reshape(A.shape)
        eps_w = rounding.ceil(pert.eps_weight, A.dtype)
        eps_b = rounding.ceil(pert.eps_bias, A.dtype)
        u_h = self.input_box().upper
        outputs = math.prod(self.out_shape)
        summed = outputs + self.fan_in + 4
        W = self.weight(A)
        coefficients = self.apply(
            u_h, self.term("abs+eps", eps_w, A.dtype, lambda: W.abs() + eps_w)
        )
        constant = self.bias_map(A).abs() + eps_b
        entry, terms = self.entry_roundings(A.dtype), outputs
        if bound.nonzeros is not None:
            entry, terms = min(entry, bound.nonzeros + 1), min(terms, bound.nonzeros)
        entry += 4
        if self.fan_out >= outputs:
            # One pass over |A|: the constant's larger gamma folded into its terms as a ratio (two
            # more roundings for the terms of the vector).
            ratio = rounding.gamma_ratio(terms + 4, entry, A.dtype)
            vector = coefficients + constant if ratio == 1 else coefficients + ratio * constant
            total = abs_dot(A, vector, abs_A)
            return step_slack(bound, [(total, entry, summed + 2)])
        # A convolution's input reaches a few outputs of a large map: its own, smaller gamma.
        return step_slack(
            bound,
            [
                (abs_dot(A, coefficients, abs_A), entry, summed),
                (abs_dot(A, constant.expand_as(coefficients), abs_A), terms + 4, None),
            ],
        )

    @property
    def fan_out(self) -> int:
        """At most how many outputs one input reaches (the terms of an entry of ``A W``)."""
        return math.prod(self.out_shape)

    def entry_roundings(self, dtype: torch.dtype, split: bool = True) -> int:
        """At most how many roundings a term of an entry of ``apply_t_in_parts(A, W, split)`` in
        ``dtype`` passes through, and of ``||A||_1`` in ``sub_weight_term``."""
        return self.fan_out

    def sub_weight_term(
        self, A_in: Tensor, abs_flat: Tensor, eps: float
    ) -> tuple[Tensor, Tensor | None]:
        """``A_in - eps * apply_t_ones(abs_flat)`` for ``abs_flat = |A|`` [B, *out_shape] and,
        when computed anyway, ``||A||_1`` [B]."""
        return A_in - eps * self.apply_t_ones(abs_flat), None

    def bias_dot(self, flat: Tensor) -> Tensor:
        """``A · b`` [B] for ``A`` [B, *out_shape]."""
        return (flat * self.bias_map(flat)).flatten(1).sum(1)

    def perturbed(
        self, h: Tensor, dW: Tensor | RowDelta | None = None, db: Tensor | None = None
    ) -> Tensor:
        """``(W + dW) h + (b + db)`` in float64 for ``h`` [N, *in_shape]; a delta with a leading
        sample dimension ``[N, ...]`` gives every sample its own network."""
        W = as_float64(self.module.weight)
        b = self.bias(W).detach() if self.module.bias is None else as_float64(self.module.bias)
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
