"""Propagation over the per-layer objects: intervals forward, linear bounds backward.

``forward_bounds`` computes every layer's input interval (IBP, optionally tightened by
back-substitution for hidden layers: ``"crown"`` for all of them, ``"crown-fast"`` for chosen rows
of the last one) and sets each ReLU's pre-activation box; ``backsubstitute`` turns linear bounds
on a layer's output into concrete lower bounds. ``unstable`` selects the neurons whose relaxation
depends on their bounds, the only ones worth back-substituting.

Shape letters: ``N`` samples, ``S`` spec rows, ``k`` neurons of a layer (flattened).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from qlib.bounds import memo as memos
from qlib.bounds import rounding
from qlib.bounds.base import rowdot
from qlib.bounds.layers import Affine, Clipped, Flatten, Layer, ReLU, clip_of, floor
from qlib.bounds.perlayer import AnyPerturbation, Resolved, resolve
from qlib.bounds.relu import relax_together
from qlib.bounds.values import Interval, LinearBound
from qlib.quant import LayerPerturbation, Perturbation

__all__ = [
    "CrownIbpOptions",
    "CrownOptions",
    "FastOptions",
    "backsubstitute",
    "chunk_size",
    "fast_stop",
    "forward_bounds",
    "identity_spec",
    "input_box",
    "last_affine_input",
    "numel",
    "unstable",
]

# Elements of the largest back-substitution tensor [n, S, *shape] per chunk of samples.
_CHUNK_ELEMENTS = 2**22


@dataclass(frozen=True)
class CrownOptions:
    """Options of ``"crown"``'s intermediate (hidden-layer) bounds.

    ``intermediate_stop=k`` ends the back-substitution for hidden layers at the IBP interval of
    the input of affine layer ``k`` (negative: counted from the end) instead of the network input:
    1 skips the first layer, whose bounds are nearly exact for small ``eps_input`` but whose wide
    input dominates the cost. ``intermediate_layers=k`` back-substitutes only the last ``k``
    hidden layers (``None``: all). ``unstable_only=True`` back-substitutes only the hidden neurons
    whose ReLU relaxation depends on their bounds; ``False`` does every neuron and gives the same
    bounds (up to float rounding), only slower. The logits are back-substituted to the input.
    """

    intermediate_stop: int = 0
    intermediate_layers: int | None = None
    unstable_only: bool = True

    def __post_init__(self) -> None:
        if self.intermediate_layers is not None and self.intermediate_layers < 0:
            raise ValueError(
                f"intermediate_layers must be >= 0 or None, got {self.intermediate_layers}"
            )


@dataclass(frozen=True)
class FastOptions:
    """Options of ``"crown-fast"``: ``rows`` back-substituted (neuron, side) rows per sample of
    the last hidden layer (0: CROWN-IBP, except that the logits too stop two affine layers
    before the output)."""

    rows: int = 128

    def __post_init__(self) -> None:
        if self.rows < 0:
            raise ValueError(f"fast_rows must be >= 0, got {self.rows}")


@dataclass(frozen=True)
class CrownIbpOptions:
    """Options of ``"crown-ibp"``: the logits are back-substituted to the input of affine layer
    ``stop`` (negative: counted from the end), whose IBP interval finishes the bound. 0 goes to
    the network input; 1 skips the first layer, the widest for an MLP on images: on the genome
    boxes of the Fashion-MNIST MLP it takes a fraction of the time for slightly wider bounds
    (``benchmarks/bench_certified.py`` measures both)."""

    stop: int = 0


def logit_stop(net: Sequence[Layer], method: str, options: object) -> int:
    """Index of the layer at whose input the logits' back-substitution of ``method`` ends."""
    if method == "crown-fast":
        return fast_stop(net)
    if method == "ibp":
        return last_affine_input(net)
    if not isinstance(options, CrownIbpOptions):
        return 0
    affine = [i for i, layer in enumerate(net) if isinstance(layer, Affine)]
    if not -len(affine) <= options.stop < len(affine):
        raise ValueError(
            f"CrownIbpOptions.stop must be in [-{len(affine)}, {len(affine)}) for this network "
            f"of {len(affine)} affine layers, got {options.stop}"
        )
    return affine[options.stop]


def input_box(
    X: Tensor, pert: AnyPerturbation | Resolved, dtype: torch.dtype = torch.float64
) -> Interval:
    """``[clamp(x - eps_x, 0, 1), clamp(x + eps_x, 0, 1)]`` for ``X`` [N, *shape] in [0, 1],
    rounded outward. With an input clip ``c`` (``LayerPerturbation.input_clip``):
    ``[max(min(x, c) - eps_x, 0), min(x, c) + eps_x]``. An ``X`` finer than ``dtype`` (float64
    images bounded in float32) gives its box in its own format, converted outward: rounding the
    images to the nearest float32 first would bound other images."""
    if isinstance(pert, Resolved):
        pert = pert.input
    elif isinstance(pert, LayerPerturbation):
        pert = Clipped(eps_input=pert.eps_input, clip=pert.input_clip)
    if X.dtype.is_floating_point and torch.finfo(X.dtype).eps < torch.finfo(dtype).eps:
        box = input_box(X, pert, X.dtype)
        down, up = (
            rounding.convert(box.lower, dtype, "down"),
            rounding.convert(box.upper, dtype, "up"),
        )
        return Interval(down.clamp(min=0.0), up.clamp(max=1.0) if clip_of(pert) is None else up)
    X = X.to(dtype)
    eps = rounding.ceil(pert.eps_input, dtype)
    clip = clip_of(pert)
    if clip is not None:
        lower = torch.clamp(X, max=floor(clip, dtype))
        upper = torch.clamp(X, max=rounding.ceil(clip, dtype))
        if eps:
            lower = torch.clamp(rounding.down(lower - eps), min=0.0)
            upper = rounding.up(upper + eps)
        return Interval(lower, upper)
    if not eps:
        return Interval(X, X)
    return Interval(
        torch.clamp(rounding.down(X - eps), 0.0, 1.0), torch.clamp(rounding.up(X + eps), 0.0, 1.0)
    )


def _remembered_input_box(X: Tensor, pert: Resolved, dtype: torch.dtype) -> Interval:
    """``input_box(X, pert, dtype)``, from the memo of an enclosing ``remember_intervals`` when
    the same images met the same input radius before (it is a few passes over the whole input)."""
    memo = memos.memo()
    if memo is None or X.requires_grad:
        return input_box(X, pert, dtype)
    key = ("input", pert.input, rounding.enabled(), X.dtype, dtype, X.shape, float(X.sum()))
    return memo.recall(key, None, (X,), lambda: input_box(X, pert, dtype))


def backsubstitute(
    net: Sequence[Layer],
    top: int,
    bound: LinearBound,
    boxes: Sequence[Interval],
    pert: AnyPerturbation | Resolved,
    stop: int = 0,
) -> Tensor:
    """Lower bounds ``[N, S]`` of ``A · out(net[top]) + const`` by back-substitution to the input of
    ``net[stop]``, whose interval ``boxes[stop]`` finishes the bound. ``boxes[i]`` is the input
    interval of layer ``i``; the layers between must have their input intervals set
    (``forward_bounds``). The result is rounded outward: the slack of every step and the
    rounding of this final concretisation are subtracted. ``pert``: uniform or per layer.

    When ``net[stop]`` is an affine layer (past any Flatten, which only reshapes), its step and
    the concretisation are one (``Affine.concretise``): the bound's large term is taken from
    IBP's base product, and only the width meets the computed coefficients."""
    per = resolve(net, pert).layers
    relax_together([(net[i], per[i]) for i in range(stop, top + 1) if isinstance(net[i], ReLU)])
    end = stop
    while end < top and isinstance(net[end], Flatten):
        end += 1
    if end <= top and isinstance(net[end], Affine):
        for i in range(top, end, -1):
            bound = net[i].backward(bound, per[i])
        return net[end].concretise(bound, per[end], boxes[end])
    for i in range(top, stop - 1, -1):
        bound = net[i].backward(bound, per[i])
    box = boxes[stop]
    A = bound.A
    n = box.lower.shape[0]
    # A⁺ l + A⁻ u = A l + A⁻ (u - l): one clamp, two matmuls. The width is rounded up, so that
    # A⁻ (u - l) never comes out above its exact value.
    lo, width = box.lower.reshape(n, -1), rounding.up(box.width).reshape(n, -1)
    shared = A.ndim == box.lower.ndim  # [S, *shape]: one matmul for all samples
    if shared:
        A2 = A.flatten(1)
        low = lo @ A2.T + width @ torch.clamp(A2, max=0.0).T
    else:
        A2 = A.reshape(n, A.shape[1], -1)
        low = rowdot(A2, lo) + rowdot(torch.clamp(A2, max=0.0), width)
    low = low + bound.const
    if not rounding.enabled():
        return low
    # The layer input is non-negative, so |A| l + |A⁻| (u - l) <= |A| u.
    hi = box.upper.reshape(n, -1)
    abs_value = rowdot(A2.abs(), hi)
    slack = rounding.margin(abs_value + bound.const.abs(), A2.shape[-1] + 2)
    if bound.slack is not None:
        slack = rounding.up(slack + bound.slack)
    return rounding.down(low - slack)


def identity_spec(shape: tuple[int, ...], like: Tensor) -> LinearBound:
    """Rows ``[I; -I]`` over a flattened ``shape``: lower bounds of ``v`` and of ``-v``."""
    n = 1
    for s in shape:
        n *= s
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    A = torch.cat([eye, -eye]).reshape(2 * n, *shape)
    return LinearBound(A, torch.zeros(2 * n, dtype=like.dtype, device=like.device), nonzeros=1)


def chunk_size(n: int, rows: int, net: Sequence[Layer]) -> int:
    widest = max(max(numel(layer.in_shape), numel(layer.out_shape)) for layer in net)
    return max(1, min(n, _CHUNK_ELEMENTS // max(1, rows * widest)))


def numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def forward_bounds(
    net: Sequence[Layer],
    X: Tensor,
    pert: AnyPerturbation | Resolved,
    method: str = "ibp",
    options: CrownOptions | FastOptions | None = None,
    *,
    cache: dict | None = None,
    dtype: torch.dtype | None = None,
) -> list[Interval]:
    """Input intervals of every layer plus the output interval (``len(net) + 1`` entries) for the
    batch ``X`` [N, *input_shape], computed in ``dtype`` (default: ``X``'s; a finer ``X`` is
    not rounded, its box is, outward); sets ``pre`` of every ReLU.

    ``method`` ``"ibp"`` or ``"crown-ibp"``: plain IBP. ``"crown"`` (``CrownOptions``): the
    pre-activations of the last ``intermediate_layers`` hidden layers (all if ``None``) are
    back-substituted down to the input of affine layer number ``intermediate_stop`` and
    intersected with the plain IBP chain. ``unstable_only`` back-substitutes only the neurons
    whose relaxation depends on their bounds (see ``unstable``); the others keep their IBP
    interval, which gives them the same relaxation as any tighter interval would, so the
    relaxations, and hence the logit bounds, equal those of back-substituting every neuron.
    ``"crown-fast"`` (``FastOptions``): the chosen rows of the last hidden layer only.
    The output interval (last entry) is the plain IBP chain's, identical on every path.
    ``cache`` keeps sample-independent rows between calls on chunks of one batch.
    ``pert``: a uniform ``Perturbation`` or a ``LayerPerturbation`` (each layer its own radii).
    """
    crown = options if isinstance(options, CrownOptions) else CrownOptions()
    fast_rows = options.rows if isinstance(options, FastOptions) else FastOptions().rows
    affine = [i for i, layer in enumerate(net) if isinstance(layer, Affine)]
    if not -len(affine) <= crown.intermediate_stop < len(affine):
        raise ValueError(
            f"intermediate_stop must be in [-{len(affine)}, {len(affine)}), "
            f"got {crown.intermediate_stop}"
        )
    intermediate_layers, unstable_only = crown.intermediate_layers, crown.unstable_only
    cache = {} if cache is None else cache
    pert = resolve(net, pert)
    per = pert.layers
    boxes = [_remembered_input_box(X, pert, dtype or X.dtype)]
    ibp = boxes[0]  # the IBP chain, never intersected: the same on every path
    stop = fast_stop(net) if method == "crown-fast" else affine[crown.intermediate_stop]
    hidden = [i for i in affine[:-1] if i > stop]
    if intermediate_layers is not None:
        hidden = hidden[len(hidden) - intermediate_layers :] if intermediate_layers > 0 else []
    for i, layer in enumerate(net):
        layer.inp = boxes[-1]
        if isinstance(layer, ReLU):
            box = layer.ibp(boxes[-1], per[i])
            ibp = box if boxes[-1] is ibp else layer.ibp(ibp, per[i])
        else:
            # The same object where the input is the chain's: an affine layer finds its IBP base
            # product again by identity (``Affine.concretise``).
            same = boxes[-1] is ibp
            ibp = layer.ibp(ibp, per[i])
            box = ibp if same or isinstance(layer, Affine) else layer.ibp(boxes[-1], per[i])
        if method == "crown" and i in hidden:
            mask = unstable(box, per[next_relu(net, i)]) if unstable_only else None
            box = _hidden_bounds(net, i, box, boxes, pert, stop, mask, mask, cache)
        elif method == "crown-fast" and len(affine) > 1 and i == affine[-2] and fast_rows > 0:
            lower, upper = _fast_rows(net, i, box, pert, fast_rows, cache)
            box = _hidden_bounds(net, i, box, boxes, pert, stop, lower, upper, cache)
        boxes.append(box)
    boxes[-1] = ibp
    return boxes


def fast_stop(net: Sequence[Layer]) -> int:
    """Index of the layer at whose input ``"crown-fast"`` back-substitution stops: the affine
    layer two before the logit layer, so the widest (first) layer of deep nets is skipped."""
    affine = [i for i, layer in enumerate(net) if isinstance(layer, Affine)]
    return affine[max(0, len(affine) - 3)]


def next_relu(net: Sequence[Layer], i: int) -> int:
    """Index of the ReLU that follows affine layer ``net[i]`` (past any Flatten)."""
    for j in range(i + 1, len(net)):
        if isinstance(net[j], ReLU):
            return j
    raise ValueError(f"layer {i} is not followed by a ReLU")


def unstable(box: Interval, pert: Perturbation) -> Tensor:
    """Neurons [N, k] whose ReLU relaxation may change when their interval ``box`` shrinks.

    The lower relaxation ``relu(ẑ - eps_a)`` has slope 1 for ``l >= eps_a``, 0 for ``u <= eps_a``
    and a bound-dependent one between; the upper ``relu(ẑ) + eps_a`` is fixed for ``l >= 0`` or
    ``u <= 0`` and the chord between. So the relaxation is the same for every sub-interval when
    ``l >= eps_a`` (identity), ``u < 0`` (zero) or ``0 < l <= u < eps_a`` (lower 0, upper
    identity); the strict inequalities keep a sub-interval from shrinking onto a boundary point,
    where the slope rules switch. Every other neuron counts as unstable. With a clip ``c``
    (``pert`` a ``Clipped``), the relaxations are fixed only inside one linear piece of both
    ``min(relu(ẑ), c)`` (kinks 0, c) and its lower envelope (kinks eps_a, c).
    """
    lo, up = box.lower.flatten(1), box.upper.flatten(1)
    eps = pert.eps_act
    clip = clip_of(pert)
    if clip is not None:
        upper_fixed = (up < 0) | ((lo > 0) & (up < clip)) | (lo > clip)
        lower_fixed = (up < eps) | ((lo > eps) & (up < clip)) | (lo > clip)
        return ~(upper_fixed & lower_fixed)
    return ~((lo >= eps) | (up < 0) | ((lo > 0) & (up < eps)))


def last_affine_input(net: Sequence[Layer]) -> int:
    """Index of the first layer of the trailing block (last affine plus any Flattens before it)."""
    i = len(net) - 1
    while i > 0 and isinstance(net[i - 1], Flatten):
        i -= 1
    return i


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
    pert: Resolved,
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
    n, k = box.lower.shape[0], numel(layer.out_shape)
    lo, up = box.lower.flatten(1), box.upper.flatten(1)
    idx_lo = _rows(lower_rows, n, k, lo.device)
    idx_up = _rows(upper_rows, n, k, lo.device)
    m = idx_lo.shape[1]
    if m + idx_up.shape[1] == 0:
        return box
    # The rows e_j (lower) and -e_j (upper) pass the affine layer itself the same way for every
    # sample: do that once for all neurons, then gather each sample's rows. Padding rows point at
    # a dummy neuron k whose rows are zero.
    spec = identity_spec(layer.out_shape, lo)
    if cache is None or ("rows", i) not in cache:
        with rounding.outward(False):  # the rows are shared; their slack is per sample, below
            shared = layer.backward(spec, pert.layers[i])
        A = shared.A.reshape(2, k, -1)
        A = torch.cat([A, A.new_zeros(2, 1, A.shape[-1])], 1)
        const = torch.cat([shared.const.reshape(2, k), shared.const.new_zeros(2, 1)], 1)
        if cache is not None:
            cache["rows", i] = A, const
    else:
        A, const = cache["rows", i]
    rows = torch.cat([A[0][idx_lo], A[1][idx_up]], 1)
    slack = None
    step = layer.step_slack(spec, pert.layers[i])  # [n, 2k] for this chunk's input intervals
    if step is not None:
        step = torch.cat([step.reshape(n, 2, k), step.new_zeros(n, 2, 1)], 2)
        slack = torch.cat([step[:, 0].gather(1, idx_lo), step[:, 1].gather(1, idx_up)], 1)
    bound = LinearBound(
        rows.reshape(n, rows.shape[1], *layer.in_shape),
        torch.cat([const[0][idx_lo], const[1][idx_up]], 1),
        slack,
    )
    low = backsubstitute(net, i - 1, bound, boxes, pert, stop=stop)
    pad = lo.new_zeros(n, 1)
    lo, up = torch.cat([lo, pad], 1), torch.cat([up, pad], 1)
    new_lo = lo.scatter(1, idx_lo, torch.maximum(lo.gather(1, idx_lo), low[:, :m]))
    new_up = up.scatter(1, idx_up, torch.minimum(up.gather(1, idx_up), -low[:, m:]))
    shape = (n, *layer.out_shape)
    return Interval(new_lo[:, :k].reshape(shape), new_up[:, :k].reshape(shape))


def _fast_rows(
    net: Sequence[Layer], i: int, box: Interval, pert: Resolved, rows: int, cache: dict
) -> tuple[Tensor, Tensor]:
    """Masks ``(lower, upper)`` [N, k] of the ``rows`` (neuron, side) pairs per sample of the last
    hidden affine layer ``net[i]`` most worth back-substituting for the logit bounds.

    Only unstable neurons (``unstable``) are candidates, scored by the largest gap of their
    upper relaxation, ``-l u / (u - l)``, times the total weight ``Σ_r |A_rj|`` of the neuron in
    the logit rows after the last affine layer; each gets the side nearer to making it stable.
    The choice only affects tightness: any rows give sound bounds.
    """
    if ("weight", i) not in cache:
        spec = identity_spec(net[-1].out_shape, box.lower)
        with rounding.outward(False):  # a score, not a bound
            for j in range(len(net) - 1, i + 1, -1):  # past the last ReLU: shared rows
                spec = net[j].backward(spec, pert.layers[j])
        cache["weight", i] = spec.A.flatten(1).abs().sum(0)  # [k]
    weight = cache["weight", i]
    lo, up = box.lower.flatten(1), box.upper.flatten(1)
    act = pert.layers[next_relu(net, i)]
    mask = unstable(box, act)
    gap = torch.where(mask, -lo * up / torch.where(mask, up - lo, 1.0), 0.0)
    score = torch.where(mask, weight * gap.clamp(min=0), -1.0)
    k = min(rows, score.shape[1])
    chosen = torch.zeros_like(mask).scatter_(1, score.topk(k, 1).indices, True) & mask
    upper_side = up < act.eps_act - lo
    return chosen & ~upper_side, chosen & upper_side
