"""The Linear layer of the bounds: ``Affine`` with a matrix product, plus the shortcuts a dense
layer allows (every output sums the whole input)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from qlib.bounds import rounding
from qlib.bounds.affine import Affine, _differentiable
from qlib.bounds.base import DERIVED, split_sum, split_terms, splits, version
from qlib.bounds.memo import memo as _memo

__all__ = ["Linear"]

# Parts of the float32 sums over 256 or more terms (``base.splits``): the back-substitution's
# ``A W`` over the outputs, IBP's rises over the inputs.
T_PARTS = 3
RISE_PARTS = 4


def _parts(n: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous slices of ``range(n)``, as equal as can be."""
    ends = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(ends[:-1], ends[1:], strict=True))


def _summed_in_parts(n: int, parts: int, product: Callable[[int, int], Tensor]) -> Tensor:
    """The sum of ``product(lo, hi)`` over ``_parts(n, parts)``, added left to right."""
    out = None
    for lo, hi in _parts(n, parts):
        part = product(lo, hi)
        out = part if out is None else out.add_(part)
    return out


def _part_roundings(n: int, parts: int) -> int:
    """Roundings per term of a sum of ``n`` terms computed in ``_parts`` (any order inside each)
    and then added left to right: part ``i``'s own terms, then ``parts - max(i, 1)`` additions."""
    return max(hi - lo + parts - max(i, 1) for i, (lo, hi) in enumerate(_parts(n, parts)))


class Linear(Affine):
    def output_shape(self) -> tuple[int, ...]:
        return (self.module.out_features,)  # layers() has checked the input's length

    def apply(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight.T

    def apply_t(self, A: Tensor, weight: Tensor) -> Tensor:
        return A @ weight

    def apply_t_in_parts(self, A: Tensor, weight: Tensor, split: bool) -> Tensor:
        # Thirds of the outputs, added left to right: every term of an entry passes through at
        # most a third of the outputs' roundings plus two, whatever order the BLAS sums in.
        # Against halves this took a third off the largest margins of a float32
        # back-substitution, for one more pass over the result.
        if not split or not self._split_t(weight.dtype):
            return A @ weight
        return _summed_in_parts(len(weight), T_PARTS, lambda lo, hi: A[..., lo:hi] @ weight[lo:hi])

    def rises(self, d: Tensor, both: Tensor) -> tuple[Tensor, int]:
        # Quarters of the inputs: the rises are one-signed sums, so their relative error is
        # gamma of their roundings; in one product of the 784 MNIST pixels that alone made
        # float32 IBP 4.7e-5 looser than float64. Three additions over [N, 2 out] cost little.
        if not rounding.enabled() or not splits(self.fan_in, d.dtype):
            return super().rises(d, both)
        rises = _summed_in_parts(
            self.fan_in, RISE_PARTS, lambda lo, hi: d[:, lo:hi] @ both[:, lo:hi].T
        )
        return rises, _part_roundings(self.fan_in, RISE_PARTS) + 1

    def _split_t(self, dtype: torch.dtype) -> bool:
        """Whether ``apply_t_in_parts`` may sum in parts: with margins on, where ``base.splits``
        allows it over the outputs."""
        return rounding.enabled() and splits(self.module.out_features, dtype)

    def entry_roundings(self, dtype: torch.dtype, split: bool = True) -> int:
        if not split or not self._split_t(dtype):
            return self.fan_out
        # ``sub_weight_term``'s norm is a split sum, with fewer roundings than a third.
        return max(_part_roundings(self.fan_out, T_PARTS), split_terms(self.fan_out, dtype))

    def bias_map(self, like: Tensor) -> Tensor:
        return self.bias(like)

    def apply_ones(self, x: Tensor) -> Tensor:
        return x.sum(-1, keepdim=True).expand(*x.shape[:-1], self.module.out_features)

    def apply_t_ones(self, A: Tensor) -> Tensor:
        return A.sum(-1, keepdim=True).expand(*A.shape[:-1], self.module.in_features)

    def split_rises(self, d: Tensor, eps_w: float) -> tuple[Tensor, Tensor] | None:
        memo, w = _memo(), self.module.weight
        if not self.reads_input or memo is None or not eps_w or _differentiable(w):
            return None
        dtype = d.dtype
        near = DERIVED.get(
            w, ("near zero", eps_w, dtype, rounding.enabled()), lambda: self._near_zero(eps_w, d)
        )
        if near is None:
            return None
        signs = self.term("signs", 0.0, dtype, lambda: self._signs(d))
        key = ("widths", version(w), rounding.enabled(), dtype, d.shape, float(d.sum()))
        pos, neg, nonneg, nonpos = memo.recall(key, w, (d,), lambda: d @ signs.T).chunk(4, 1)
        up_e, down_e = near
        d_max = d.amax(1, keepdim=True)
        return (
            torch.add(pos, nonneg, alpha=eps_w).addcmul_(d_max, up_e),
            torch.add(neg, nonpos, alpha=-eps_w).addcmul_(d_max, down_e, value=-1),
        )

    def _signs(self, like: Tensor) -> Tensor:
        """``[W⁺; W⁻; [W >= 0]; [W <= 0]]`` [4 out, in] in ``like``'s dtype (exact)."""
        W = self.weight(like)
        return torch.cat([W.clamp(min=0), W.clamp(max=0), (W >= 0).to(W), (W <= 0).to(W)])

    def _near_zero(self, eps_w: float, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """Per output, ``e`` times the number of its weights in ``[-e, 0)`` and in ``(0, e]``,
        rounded up; ``None`` when those weights are more than one in 32 (where the bound below
        would be loose and two dense products cost no more).

        ``split_rises`` bounds the sparse terms by them: ``0 <= W + e < e`` on the first set, so
        ``Σ (W + e) d_j <= e count max(d)``, and ``-e < W - e <= 0`` on the second. Exact sparse
        products cost more than the dense ones they replace (a gather of ``d``'s columns), and
        the rest of the rise is some hundred times larger than these terms."""
        W = self.weight(like)
        up = ((W < 0) & (W >= -eps_w)).sum(1)
        down = ((W > 0) & (W <= eps_w)).sum(1)
        if int(up.sum()) + int(down.sum()) > W.numel() // 32:
            return None
        return rounding.up(up.to(W) * eps_w), rounding.up(down.to(W) * eps_w)

    def sub_weight_term(
        self, A_in: Tensor, abs_flat: Tensor, eps: float
    ) -> tuple[Tensor, Tensor | None]:
        # Every input gets the same term eps ||c||_1: one norm, one in-place subtraction.
        # abs().sum() rather than vector_norm(ord=1): several times faster on the CPU.
        l1 = split_sum(abs_flat) if self._split_t(abs_flat.dtype) else abs_flat.sum(-1)
        if A_in.requires_grad or l1.requires_grad:
            return A_in - eps * l1.unsqueeze(-1), l1
        return A_in.sub_(eps * l1.unsqueeze(-1)), l1

    def bias_dot(self, flat: Tensor) -> Tensor:
        return flat @ self.bias(flat)

    def abs_dot_ones(
        self, rows: Tensor, abs_flat: Tensor, l1: Tensor | None, ones: Tensor
    ) -> Tensor:
        # Every output sums the whole input: |A| · (Σl, ..., Σl) = ||A||_1 Σl.
        if l1 is None:
            l1 = abs_flat.sum(-1)
        return l1.reshape(rows.shape[:-1]) * ones[:, :1]

    def apply_per_sample(self, h: Tensor, W: Tensor, b: Tensor) -> Tensor:
        if W.ndim > self.module.weight.ndim:
            return torch.einsum("ni,noi->no", h, W) + b
        return h @ W.T + b
