"""Sound bounds on the logits of every quantised version of a float ReLU network.

The perturbation model (``qlib.quant.Perturbation``): inputs ``x̂ ∈ [x - eps_x, x + eps_x] ∩ [0, 1]``,
every affine layer computes ``ẑ = (W + ΔW) ĥ + (b + Δb)`` with ``|ΔW| <= eps_w``, ``|Δb| <= eps_b``
entrywise, and every hidden ReLU outputs ``ĥ = relu(ẑ) + δ >= 0`` with ``|δ| <= eps_a``.

Two ways to bound the logits ``[N, classes]``:

- ``"ibp"``: interval bound propagation with the sound rule for ``(W + ΔW) x + (b + Δb)``:
  centre ``W c + b``, radius ``|W| r + eps_w Σ_j max(|l_j|, |u_j|) + eps_b``. (The published code
  adds ``eps_w ||c||_1`` to the centre instead of the radius, which is unsound.)
- linear bounds (CROWN-style back-substitution). Every layer input ``h`` is non-negative, so for a
  fixed ``h`` the reachable ``c^T ẑ`` is exactly ``c^T (W h + b) ± ||c||_1 (eps_w 1^T h + eps_b)``;
  back-substituting a row ``c`` gives the lower bound ``(W^T c - eps_w ||c||_1 1)^T h + c^T b -
  eps_b ||c||_1``, linear in ``h``. ReLUs with activation perturbation are relaxed through
  ``relu(ẑ - eps_a) <= ĥ <= relu(ẑ) + eps_a``. ``"crown-ibp"`` takes the pre-activation bounds
  from IBP, ``"crown"`` back-substitutes for every hidden layer too (intersected with IBP).
  Only the hidden neurons whose relaxation depends on their bounds (``_unstable``: the IBP
  interval straddles 0 or ``eps_a``) are back-substituted, each sample its own rows; the others
  keep their IBP interval, and since any sub-interval gives them the same relaxation the logit
  bounds equal those of back-substituting every neuron (``unstable_only=False``).
  ``"crown-fast"`` is CROWN-IBP plus back-substituted bounds for only ``fast_rows`` (neuron, side)
  pairs per sample of the last hidden layer, the unstable neurons with the largest relaxation gap
  times logit weight, down to the input of the affine layer two before the logits (as are the
  logits): the cost-effective middle between the two on deep MLPs (see
  ``benchmarks/bench_bounds.py``). Which rows are chosen affects only tightness, never soundness.

For convolutions the weight kernel is shared across positions, but the bounds let every output
position pick its own ``ΔW``: a superset of the real networks, so sound (and only slightly loose).

Numerics: bounds are computed in float64 by default without directed (outward) rounding; the
float64 rounding error (relative ~1e-16 per operation, times the sum of absolute terms) is many
orders of magnitude below any eps of interest, but the bounds are not certified to the last ulp.

The network is an ``nn.Sequential`` of Linear, Conv2d, ReLU and Flatten; a ReLU must follow every
affine layer except the last, which gives the logits. ``layers(model, in_shape)`` turns it into
per-layer objects, each with its IBP rule (``ibp``) and back-substitution rule (``backward``), so
other encodings (e.g. a MILP) can reuse them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qlib.quant import Perturbation

Method = Literal["ibp", "crown-ibp", "crown-fast", "crown"]
METHODS: tuple[str, ...] = ("ibp", "crown-ibp", "crown-fast", "crown")

# Elements of the largest back-substitution tensor [n, S, *shape] per chunk of samples.
_CHUNK_ELEMENTS = 2**22


# ----------------------------------------------------------------------------- value types


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
    """``S`` linear lower bounds ``A · v + const`` on functions of a layer variable ``v``.

    ``A`` is ``[N, S, *shape]`` (per sample) or ``[S, *shape]`` (shared by all samples, as long as
    no ReLU has been crossed); ``const`` is ``[N, S]`` or ``[S]``.
    """

    A: Tensor
    const: Tensor


# ----------------------------------------------------------------------------- layers


class Layer(ABC):
    """One layer of the perturbation model: shapes (without the batch dim) and its two rules."""

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

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(#{self.index} {self.module}, {self.in_shape}->{self.out_shape})"
        )


class Flatten(Layer):
    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        return Interval(box.lower.flatten(1), box.upper.flatten(1))

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        lead = bound.A.shape[: bound.A.ndim - len(self.out_shape)]
        return LinearBound(bound.A.reshape(*lead, *self.in_shape), bound.const)


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

    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        W = self.weight(box.lower)
        center = self.apply(box.center, W) + self.bias_map(box.lower)
        radius = self.apply(box.radius, W.abs())
        if pert.eps_weight:
            # Σ_j max(|l_j|, |u_j|) over each output's receptive field bounds Σ_j |ΔW_ij x_j| / eps_w.
            # max(-l, u) equals max(|l|, |u|) whenever l <= u, with fewer passes over memory.
            mag = torch.maximum(-box.lower, box.upper)
            radius = radius + pert.eps_weight * self.apply_ones(mag)
        radius = radius + pert.eps_bias
        return Interval(center - radius, center + radius)

    def backward(self, bound: LinearBound, pert: Perturbation) -> LinearBound:
        A = bound.A
        lead = A.shape[: A.ndim - len(self.out_shape)]
        flat = A.reshape(-1, *self.out_shape)
        A_in = self.apply_t(flat, self.weight(A))
        l1 = None
        if pert.eps_weight:
            # Valid because the layer input is non-negative: min over ΔW of c^T ΔW h = -eps_w ||c||_1 1^T h
            # per output row, i.e. the transpose of an all-ones kernel applied to |c|.
            A_in, l1 = self.sub_weight_term(A_in, flat, pert.eps_weight)
        const = self.bias_dot(flat)
        if pert.eps_bias:
            if l1 is None:
                l1 = torch.linalg.vector_norm(flat.flatten(1), 1, dim=1)
            const = const - pert.eps_bias * l1
        return LinearBound(A_in.reshape(*lead, *self.in_shape), bound.const + const.reshape(lead))

    def sub_weight_term(
        self, A_in: Tensor, flat: Tensor, eps: float
    ) -> tuple[Tensor, Tensor | None]:
        """``A_in - eps * apply_t_ones(|flat|)`` and, when computed anyway, ``||flat||_1`` [B]."""
        return A_in - eps * self.apply_t_ones(flat.abs()), None

    def bias_dot(self, flat: Tensor) -> Tensor:
        """``A · b`` [B] for ``A`` [B, *out_shape]."""
        return (flat * self.bias_map(flat)).flatten(1).sum(1)


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


class ReLU(Layer):
    """``ĥ = relu(ẑ) + δ >= 0``, ``|δ| <= eps_a``; ``pre`` holds the bounds on ``ẑ`` once known."""

    pre: Interval | None = None

    def ibp(self, box: Interval, pert: Perturbation) -> Interval:
        lower = torch.clamp(torch.relu(box.lower) - pert.eps_act, min=0.0)
        return Interval(lower, torch.relu(box.upper) + pert.eps_act)

    def relaxation(self, pert: Perturbation) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Slopes and offsets ``(al, bl, au, bu)``, each ``[N, *shape]``, with
        ``al ẑ + bl <= ĥ <= au ẑ + bu`` for all ``ẑ`` in ``pre``."""
        if self.pre is None:
            raise RuntimeError(f"layer {self.index}: pre-activation bounds are not set")
        lo, up = self.pre.lower, self.pre.upper
        eps = pert.eps_act
        # Lower: ĥ >= relu(ẑ - eps_a) >= al (ẑ - eps_a); adaptive slope 0 or 1 (CROWN).
        ls, us = lo - eps, up - eps
        al = torch.where(ls >= 0, 1.0, torch.where(us <= 0, 0.0, (us > -ls).to(lo.dtype)))
        bl = -al * eps
        # Upper: ĥ <= relu(ẑ) + eps_a <= chord of relu over [l, u], plus eps_a.
        unstable = (lo < 0) & (up > 0)
        denom = torch.where(unstable, up - lo, torch.ones_like(up))
        au = torch.where(lo >= 0, 1.0, torch.where(unstable, up / denom, 0.0))
        bu = torch.where(unstable, -au * lo, torch.zeros_like(lo)) + eps
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
        return LinearBound(A_in, bound.const + const.squeeze(-1))


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


def input_box(X: Tensor, pert: Perturbation, dtype: torch.dtype = torch.float64) -> Interval:
    """``[clamp(x - eps_x, 0, 1), clamp(x + eps_x, 0, 1)]`` for ``X`` [N, *shape] in [0, 1]."""
    X = X.to(dtype)
    return Interval(
        torch.clamp(X - pert.eps_input, 0.0, 1.0), torch.clamp(X + pert.eps_input, 0.0, 1.0)
    )


def backsubstitute(
    net: Sequence[Layer],
    top: int,
    bound: LinearBound,
    boxes: Sequence[Interval],
    pert: Perturbation,
    stop: int = 0,
) -> Tensor:
    """Lower bounds ``[N, S]`` of ``A · out(net[top]) + const`` by back-substitution to the input of
    ``net[stop]``, whose interval ``boxes[stop]`` finishes the bound. ``boxes[i]`` is the input
    interval of layer ``i``; ReLU layers between must have ``pre`` set."""
    for layer in reversed(net[stop : top + 1]):
        bound = layer.backward(bound, pert)
    box = boxes[stop]
    A = bound.A
    n = box.lower.shape[0]
    # A⁺ l + A⁻ u = A l + A⁻ (u - l): one clamp, two matmuls.
    lo, width = box.lower.reshape(n, -1), box.width.reshape(n, -1)
    if A.ndim == box.lower.ndim:  # shared [S, *shape]: one matmul for all samples
        A2 = A.flatten(1)
        low = lo @ A2.T + width @ torch.clamp(A2, max=0.0).T
    else:
        A2 = A.reshape(n, A.shape[1], -1)
        low = torch.bmm(A2, lo.unsqueeze(2)) + torch.bmm(
            torch.clamp(A2, max=0.0), width.unsqueeze(2)
        )
        low = low.squeeze(2)
    return low + bound.const


def _identity_spec(shape: tuple[int, ...], like: Tensor) -> LinearBound:
    """Rows ``[I; -I]`` over a flattened ``shape``: lower bounds of ``v`` and of ``-v``."""
    n = 1
    for s in shape:
        n *= s
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    A = torch.cat([eye, -eye]).reshape(2 * n, *shape)
    return LinearBound(A, torch.zeros(2 * n, dtype=like.dtype, device=like.device))


def _chunk(n: int, rows: int, net: Sequence[Layer]) -> int:
    widest = max(max(_numel(layer.in_shape), _numel(layer.out_shape)) for layer in net)
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, rows * widest)))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def forward_bounds(
    net: Sequence[Layer],
    X: Tensor,
    pert: Perturbation,
    method: str,
    intermediate_stop: int = 0,
    *,
    unstable_only: bool = True,
    intermediate_layers: int | None = None,
    fast_rows: int = 128,
    cache: dict | None = None,
) -> list[Interval]:
    """Input intervals of every layer plus the output interval (``len(net) + 1`` entries); sets
    ``pre`` of every ReLU.

    With ``"crown"`` the pre-activations of the last ``intermediate_layers`` hidden layers (all if
    ``None``) are back-substituted down to the input of affine layer number ``intermediate_stop``
    and intersected with the plain IBP chain. ``unstable_only`` back-substitutes only the neurons
    whose relaxation depends on their bounds (see ``_unstable``); the others keep their IBP
    interval, which gives them the same relaxation as any tighter interval would, so the
    relaxations, and hence the logit bounds, equal those of back-substituting every neuron.
    The output interval (last entry) is the plain IBP chain's, identical on both paths.
    """
    cache = {} if cache is None else cache
    boxes = [input_box(X, pert, X.dtype)]
    ibp = boxes[0]  # the IBP chain, never intersected: the same on every path
    affine = [i for i, layer in enumerate(net) if isinstance(layer, Affine)]
    stop = _fast_stop(net) if method == "crown-fast" else affine[intermediate_stop]
    hidden = [i for i in affine[:-1] if i > stop]
    if intermediate_layers is not None:
        hidden = hidden[len(hidden) - intermediate_layers :] if intermediate_layers > 0 else []
    for i, layer in enumerate(net):
        if isinstance(layer, ReLU):
            layer.pre = boxes[-1]
            box = layer.ibp(boxes[-1], pert)
            ibp = layer.ibp(ibp, pert)
        else:
            ibp = layer.ibp(ibp, pert)
            box = ibp if isinstance(layer, Affine) else layer.ibp(boxes[-1], pert)
        if method == "crown" and i in hidden:
            mask = _unstable(box, pert) if unstable_only else None
            box = _hidden_bounds(net, i, box, boxes, pert, stop, mask, mask, cache)
        elif method == "crown-fast" and len(affine) > 1 and i == affine[-2] and fast_rows > 0:
            lower, upper = _fast_rows(net, i, box, pert, fast_rows, cache)
            box = _hidden_bounds(net, i, box, boxes, pert, stop, lower, upper, cache)
        boxes.append(box)
    boxes[-1] = ibp
    return boxes


def _fast_stop(net: Sequence[Layer]) -> int:
    """Index of the layer at whose input ``"crown-fast"`` back-substitution stops: the affine
    layer two before the logit layer, so the widest (first) layer of deep nets is skipped."""
    affine = [i for i, layer in enumerate(net) if isinstance(layer, Affine)]
    return affine[max(0, len(affine) - 3)]


def _unstable(box: Interval, pert: Perturbation) -> Tensor:
    """Neurons [N, k] whose ReLU relaxation may change when their interval ``box`` shrinks.

    The lower relaxation ``relu(ẑ - eps_a)`` has slope 1 for ``l >= eps_a``, 0 for ``u <= eps_a``
    and a bound-dependent one between; the upper ``relu(ẑ) + eps_a`` is fixed for ``l >= 0`` or
    ``u <= 0`` and the chord between. So the relaxation is the same for every sub-interval when
    ``l >= eps_a`` (identity), ``u < 0`` (zero) or ``0 < l <= u < eps_a`` (lower 0, upper
    identity); the strict inequalities keep a sub-interval from shrinking onto a boundary point,
    where the slope rules switch. Every other neuron counts as unstable.
    """
    lo, up = box.lower.flatten(1), box.upper.flatten(1)
    eps = pert.eps_act
    return ~((lo >= eps) | (up < 0) | ((lo > 0) & (up < eps)))


def _rows(mask: Tensor | None, n: int, k: int, device: torch.device) -> Tensor:
    """Per sample the indices of ``mask`` [n, k] (all if ``None``), padded with ``k``: [n, m]."""
    if mask is None:
        return torch.arange(k, device=device).expand(n, k)
    count = mask.sum(1, keepdim=True)
    m = int(count.max().item()) if n else 0
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :m]
    return torch.where(torch.arange(m, device=device) < count, order, k)


def _hidden_bounds(
    net: Sequence[Layer],
    i: int,
    box: Interval,
    boxes: Sequence[Interval],
    pert: Perturbation,
    stop: int,
    lower_rows: Tensor | None,
    upper_rows: Tensor | None,
    cache: dict | None = None,
) -> Interval:
    """``box`` (the IBP interval of the output of affine layer ``net[i]``) with the lower bounds of
    the neurons in ``lower_rows`` and the upper bounds of those in ``upper_rows`` (masks [N, k],
    ``None``: all) tightened by back-substitution to the input of ``net[stop]``. ``cache`` keeps
    the sample-independent rows between chunks of one call."""
    layer = net[i]
    n, k = box.lower.shape[0], _numel(layer.out_shape)
    lo, up = box.lower.flatten(1), box.upper.flatten(1)
    idx_lo = _rows(lower_rows, n, k, lo.device)
    idx_up = _rows(upper_rows, n, k, lo.device)
    m = idx_lo.shape[1]
    if m + idx_up.shape[1] == 0:
        return box
    # The rows e_j (lower) and -e_j (upper) pass the affine layer itself the same way for every
    # sample: do that once for all neurons, then gather each sample's rows. Padding rows point at
    # a dummy neuron k whose rows are zero.
    if cache is None or ("rows", i) not in cache:
        shared = layer.backward(_identity_spec(layer.out_shape, lo), pert)
        A = shared.A.reshape(2, k, -1)
        A = torch.cat([A, A.new_zeros(2, 1, A.shape[-1])], 1)
        const = torch.cat([shared.const.reshape(2, k), shared.const.new_zeros(2, 1)], 1)
        if cache is not None:
            cache["rows", i] = A, const
    else:
        A, const = cache["rows", i]
    rows = torch.cat([A[0][idx_lo], A[1][idx_up]], 1)
    bound = LinearBound(
        rows.reshape(n, rows.shape[1], *layer.in_shape),
        torch.cat([const[0][idx_lo], const[1][idx_up]], 1),
    )
    low = backsubstitute(net, i - 1, bound, boxes, pert, stop=stop)
    pad = lo.new_zeros(n, 1)
    lo, up = torch.cat([lo, pad], 1), torch.cat([up, pad], 1)
    new_lo = lo.scatter(1, idx_lo, torch.maximum(lo.gather(1, idx_lo), low[:, :m]))
    new_up = up.scatter(1, idx_up, torch.minimum(up.gather(1, idx_up), -low[:, m:]))
    shape = (n, *layer.out_shape)
    return Interval(new_lo[:, :k].reshape(shape), new_up[:, :k].reshape(shape))


def _fast_rows(
    net: Sequence[Layer], i: int, box: Interval, pert: Perturbation, rows: int, cache: dict
) -> tuple[Tensor, Tensor]:
    """Masks ``(lower, upper)`` [N, k] of the ``rows`` (neuron, side) pairs per sample of the last
    hidden affine layer ``net[i]`` most worth back-substituting for the logit bounds.

    Only unstable neurons (``_unstable``) are candidates, scored by the largest gap of their
    upper relaxation, ``-l u / (u - l)``, times the total weight ``Σ_r |A_rj|`` of the neuron in
    the logit rows after the last affine layer; each gets the side nearer to making it stable.
    The choice only affects tightness: any rows give sound bounds.
    """
    if ("weight", i) not in cache:
        spec = _identity_spec(net[-1].out_shape, box.lower)
        for layer in reversed(net[i + 2 :]):  # past the last ReLU (net[i + 1]): shared rows
            spec = layer.backward(spec, pert)
        cache["weight", i] = spec.A.flatten(1).abs().sum(0)  # [k]
    weight = cache["weight", i]
    lo, up = box.lower.flatten(1), box.upper.flatten(1)
    unstable = _unstable(box, pert)
    gap = torch.where(unstable, -lo * up / torch.where(unstable, up - lo, 1.0), 0.0)
    score = torch.where(unstable, weight * gap.clamp(min=0), -1.0)
    k = min(rows, score.shape[1])
    chosen = torch.zeros_like(unstable).scatter_(1, score.topk(k, 1).indices, True) & unstable
    upper_side = up < pert.eps_act - lo
    return chosen & ~upper_side, chosen & upper_side


def _check_inputs(model: nn.Module, X: Tensor, pert: Perturbation, method: str) -> None:
    if not isinstance(pert, Perturbation):
        raise TypeError(f"pert must be a qlib.quant.Perturbation, got {type(pert).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not isinstance(X, Tensor) or X.ndim < 2 or len(X) == 0:
        raise ValueError(
            f"X must be a non-empty batch [N, *input_shape], got {getattr(X, 'shape', X)}"
        )
    arch = getattr(model, "arch", None)
    arch_shape = arch.get("in_shape") if isinstance(arch, dict) else None
    if arch_shape is not None and tuple(X.shape[1:]) != tuple(arch_shape):
        raise ValueError(
            f"X has sample shape {tuple(X.shape[1:])}, the model expects {tuple(arch_shape)}"
        )
    if not torch.isfinite(X).all() or X.min() < 0 or X.max() > 1:
        raise ValueError("X must be finite and in [0, 1] (the nominal input must be a valid input)")


def logit_bounds(
    model: nn.Module,
    X: Tensor,
    pert: Perturbation,
    method: Method = "ibp",
    *,
    dtype: torch.dtype = torch.float64,
    differentiable: bool = False,
    chunk: int | None = None,
    intermediate_stop: int = 0,
    intermediate_layers: int | None = None,
    unstable_only: bool = True,
    fast_rows: int = 128,
) -> tuple[Tensor, Tensor]:
    """Lower and upper bounds, each ``[N, classes]``, on the logits of every perturbed network.

    ``X`` [N, *input_shape] in [0, 1]; ``method``: see the module docstring. ``differentiable=True``
    keeps the autograd graph to the model parameters (for certified training). ``chunk`` samples
    are processed at a time (default: sized to bound memory).

    ``"crown"`` only: ``intermediate_stop=k`` ends the back-substitution for hidden layers at the
    IBP interval of the input of affine layer ``k`` (negative: counted from the end) instead of
    the network input: 1 skips the first layer, whose bounds are nearly exact for small
    ``eps_input`` but whose wide input dominates the cost. ``intermediate_layers=k``
    back-substitutes only the last ``k`` hidden layers (``None``: all). ``unstable_only=True``
    back-substitutes only the hidden neurons whose ReLU relaxation depends on their bounds;
    ``False`` does every neuron and gives the same bounds (up to float rounding), only slower.
    The logits are back-substituted to the network input.

    ``"crown-fast"`` only: ``fast_rows`` back-substituted (neuron, side) rows per sample of the
    last hidden layer (0: CROWN-IBP, except that the logits too stop two affine layers before
    the output).
    """
    _check_inputs(model, X, pert, method)
    net = layers(model, X.shape[1:])
    n_affine = sum(isinstance(layer, Affine) for layer in net)
    if not -n_affine <= intermediate_stop < n_affine:
        raise ValueError(
            f"intermediate_stop must be in [-{n_affine}, {n_affine}), got {intermediate_stop}"
        )
    intermediate_stop %= n_affine
    if fast_rows < 0:
        raise ValueError(f"fast_rows must be >= 0, got {fast_rows}")
    if intermediate_layers is not None and intermediate_layers < 0:
        raise ValueError(f"intermediate_layers must be >= 0 or None, got {intermediate_layers}")
    classes = _numel(net[-1].out_shape)
    hidden = [_numel(layer.out_shape) for layer in net if isinstance(layer, ReLU)]
    rows = 2 * max([classes] + (hidden if method == "crown" else []))
    if method == "crown-fast":
        rows = max(rows, 2 * classes + fast_rows)
    step = chunk or (len(X) if method == "ibp" else _chunk(len(X), rows, net))
    lows, ups = [], []
    cache: dict = {}  # sample-independent back-substituted rows, shared by the chunks
    with torch.set_grad_enabled(differentiable and torch.is_grad_enabled()):
        for start in range(0, len(X), step):
            xs = X[start : start + step].to(dtype)
            boxes = forward_bounds(
                net,
                xs,
                pert,
                method,
                intermediate_stop,
                unstable_only=unstable_only,
                intermediate_layers=intermediate_layers,
                fast_rows=fast_rows,
                cache=cache,
            )
            out = boxes[-1]
            if method != "ibp":
                stop = _fast_stop(net) if method == "crown-fast" else 0
                low = backsubstitute(
                    net, len(net) - 1, _identity_spec(net[-1].out_shape, xs), boxes, pert, stop
                )
                low = low.reshape(len(xs), 2, -1)
                out = Interval(low[:, 0], -low[:, 1]).intersect(
                    Interval(out.lower.flatten(1), out.upper.flatten(1))
                )
            lows.append(out.lower.flatten(1))
            ups.append(out.upper.flatten(1))
    return torch.cat(lows), torch.cat(ups)


def margin_bounds(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation,
    method: Method = "ibp",
    *,
    dtype: torch.dtype = torch.float64,
    chunk: int | None = None,
) -> Tensor:
    """Lower bounds ``[N, classes]`` on ``logit_y - logit_j`` (entry ``y`` is +inf).

    The difference is bounded directly with the spec matrix ``C = e_y - e_j`` back-substituted
    through the last affine layer (``"ibp"``: then the IBP interval of its input) or the whole
    network (linear methods). The same pass bounds every logit, and the result is the larger of
    the two sound bounds ``C``-spec and ``L_y - U_j``, so it is never looser than the latter.
    """
    _check_inputs(model, X, pert, method)
    net = layers(model, X.shape[1:])
    classes = _numel(net[-1].out_shape)
    if len(net[-1].out_shape) != 1:
        raise ValueError("margin bounds need a flat logit layer [N, classes]")
    y = _check_labels(y, len(X), classes)
    step = chunk or _chunk(len(X), 3 * classes, net)
    stop = 0 if method != "ibp" else _last_affine_input(net)
    out = []
    with torch.no_grad():
        for start in range(0, len(X), step):
            xs = X[start : start + step].to(dtype)
            ys = y[start : start + step]
            n = len(xs)
            boxes = forward_bounds(net, xs, pert, method)
            eye = torch.eye(classes, dtype=dtype)
            C = eye[ys].unsqueeze(1) - eye.unsqueeze(0)  # [n, classes, classes]: row j = e_y - e_j
            rows = torch.cat([C, eye.expand(n, -1, -1), -eye.expand(n, -1, -1)], 1)
            spec = LinearBound(rows, torch.zeros(n, 3 * classes, dtype=dtype))
            low = backsubstitute(net, len(net) - 1, spec, boxes, pert, stop=stop)
            logits = Interval(low[:, classes : 2 * classes], -low[:, 2 * classes :])
            logits = logits.intersect(boxes[-1])
            naive = logits.lower.gather(1, ys[:, None]) - logits.upper
            margin = torch.maximum(low[:, :classes], naive)
            out.append(margin.masked_fill(F.one_hot(ys, classes).bool(), float("inf")))
    return torch.cat(out)


def _last_affine_input(net: Sequence[Layer]) -> int:
    """Index of the first layer of the trailing block (last affine plus any Flattens before it)."""
    i = len(net) - 1
    while i > 0 and isinstance(net[i - 1], Flatten):
        i -= 1
    return i


def _check_labels(y: Tensor, n: int, classes: int) -> Tensor:
    if not isinstance(y, Tensor) or y.shape != (n,):
        raise ValueError(f"y must be a tensor of shape ({n},), got {getattr(y, 'shape', y)}")
    y = y.long()
    if len(y) and (y.min() < 0 or y.max() >= classes):
        raise ValueError(f"labels must lie in [0, {classes}), got range [{y.min()}, {y.max()}]")
    return y


# ----------------------------------------------------------------------------- data-set measures


@dataclass(frozen=True)
class Discrepancy:
    """Worst-case discrepancy between ``f`` and every perturbed network, per sample ``[N]``.

    ``d`` is the published measure on the true-class softmax probability:
    ``max(p_best - p0, p0 - p_worst)``; ``logit_gap`` is ``max_j max(U_j - f_j, f_j - L_j)``.
    ``worst`` and ``worst_logit_gap`` are the data-set maxima.
    """

    d: Tensor
    logit_gap: Tensor
    p0: Tensor
    p_best: Tensor
    p_worst: Tensor
    lower: Tensor
    upper: Tensor
    worst: float
    worst_logit_gap: float


def worst_case_discrepancy(
    model: nn.Module, X: Tensor, y: Tensor, pert: Perturbation, method: Method = "ibp"
) -> Discrepancy:
    """Bound the published discrepancy for every sample of ``X`` [N, ...] with labels ``y`` [N]."""
    lower, upper = logit_bounds(model, X, pert, method)
    y = _check_labels(y, len(X), lower.shape[1])
    with torch.no_grad():
        f = _float_logits(model, X)
    hot = F.one_hot(y, lower.shape[1]).bool()
    p0 = torch.softmax(f, 1).gather(1, y[:, None]).squeeze(1)
    p_best = torch.softmax(torch.where(hot, upper, lower), 1).gather(1, y[:, None]).squeeze(1)
    p_worst = torch.softmax(torch.where(hot, lower, upper), 1).gather(1, y[:, None]).squeeze(1)
    d = torch.maximum(p_best - p0, p0 - p_worst)
    gap = torch.maximum(upper - f, f - lower).amax(1)
    return Discrepancy(d, gap, p0, p_best, p_worst, lower, upper, d.max().item(), gap.max().item())


def _float_logits(model: nn.Module, X: Tensor) -> Tensor:
    """The nominal network's logits ``[N, classes]`` evaluated in float64."""
    h = X.to(torch.float64)
    for module in model:
        if isinstance(module, nn.Linear):
            h = F.linear(
                h, module.weight.double(), None if module.bias is None else module.bias.double()
            )
        elif isinstance(module, nn.Conv2d):
            h = F.conv2d(
                h,
                module.weight.double(),
                None if module.bias is None else module.bias.double(),
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
            )
        else:
            h = module(h)
    return h


@dataclass(frozen=True)
class Verification:
    """Which samples ``[N]`` are certified: every perturbed network predicts the label."""

    verified: Tensor
    correct: Tensor
    accuracy: float
    clean_accuracy: float


def verified_accuracy(
    model: nn.Module,
    X: Tensor,
    y: Tensor,
    pert: Perturbation,
    method: Method = "ibp",
    *,
    margin: bool = False,
) -> Verification:
    """Fraction of samples whose true logit provably beats every other logit.

    ``margin=False``: ``L_y > max_{j != y} U_j``. ``margin=True``: bound ``logit_y - logit_j``
    directly (``margin_bounds``), which is tighter.
    """
    if margin:
        verified = (margin_bounds(model, X, y, pert, method) > 0).all(1)
        y = y.long()
    else:
        lower, upper = logit_bounds(model, X, pert, method)
        y = _check_labels(y, len(X), lower.shape[1])
        hot = F.one_hot(y, lower.shape[1]).bool()
        verified = lower.gather(1, y[:, None]).squeeze(1) > upper.masked_fill(hot, -torch.inf).amax(
            1
        )
    with torch.no_grad():
        correct = _float_logits(model, X).argmax(1) == y
    return Verification(
        verified, correct, verified.double().mean().item(), correct.double().mean().item()
    )
