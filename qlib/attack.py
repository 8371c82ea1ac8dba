"""Concrete perturbed networks inside the boxes of a ``Perturbation``: lower bounds on the discrepancy.

Every value returned here is attained by one concrete network of the perturbation model (with its
own weights per sample), so the sound bounds of ``qlib.bounds`` must contain it; the tests use that.
Three searches: random vertices of the boxes, projected gradient ascent with sign steps on each
logit in both directions (from the nominal network, from the vertex that a linear bound's
relaxation names with ``guided``, and from random vertices), and real round-to-nearest
quantisation of the model when its error fits inside the boxes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from qlib import bounds
from qlib.bounds import RowDelta
from qlib.bounds.base import checked_once
from qlib.quant import LayerPerturbation, Perturbation, UniformQuantizer, symmetric_quantizer

__all__ = [
    "AttackedDiscrepancy",
    "attack_margin",
    "Deltas",
    "Perturbed",
    "RowDelta",
    "attack_discrepancy",
    "attack_logits",
    "guided_vertices",
    "perturbed_forward",
    "random_vertex",
    "rtn_deltas",
]


Deltas = list[Tensor | RowDelta | None]
AnyPerturbation = Perturbation | LayerPerturbation


@dataclass(frozen=True)
class _Radii:
    """A perturbation's radii per layer: ``weight``/``bias`` per affine layer, ``act`` and
    ``clip`` per hidden ReLU, and the input's."""

    input: float
    weight: list[float]
    bias: list[float]
    act: list[float]
    clip: list[float | None]
    input_clip: float | None


def _radii(pert: AnyPerturbation, n_affine: int, n_relu: int) -> _Radii:
    if isinstance(pert, Perturbation):
        return _Radii(
            pert.eps_input,
            [pert.eps_weight] * n_affine,
            [pert.eps_bias] * n_affine,
            [pert.eps_act] * n_relu,
            [None] * n_relu,
            None,
        )
    if not isinstance(pert, LayerPerturbation):
        raise TypeError(
            f"pert must be a Perturbation or LayerPerturbation, got {type(pert).__name__}"
        )
    if pert.n_affine != n_affine or len(pert.eps_act) != n_relu:
        raise ValueError(
            f"LayerPerturbation has radii for {pert.n_affine} affine layers and "
            f"{len(pert.eps_act)} hidden ReLUs, but the network has {n_affine} affine layers "
            f"and {n_relu} hidden ReLUs"
        )
    return _Radii(
        pert.eps_input,
        list(pert.eps_weight),
        list(pert.eps_bias),
        list(pert.eps_act),
        [pert.clip(j) for j in range(n_relu)],
        pert.input_clip,
    )


def _net_radii(model: nn.Sequential, X: Tensor, pert: AnyPerturbation) -> _Radii:
    net = bounds.layers(model, X.shape[1:])
    n_affine = sum(isinstance(layer, bounds.Affine) for layer in net)
    return _radii(pert, n_affine, sum(isinstance(layer, bounds.ReLU) for layer in net))


@dataclass
class Perturbed:
    """Deltas of one concrete perturbed network; lists follow the affine layers (``dW``, ``db``)
    and the hidden ReLUs (``dA``). A delta is shaped like its tensor, or with a leading sample
    dimension ``[N, ...]`` for a different network per sample; None means zero."""

    dW: Deltas
    db: Deltas
    dA: Deltas
    dX: Tensor | None = None


def perturbed_forward(
    model: nn.Sequential,
    X: Tensor,
    pert: AnyPerturbation,
    *,
    dW: Deltas | None = None,
    db: Deltas | None = None,
    dA: Deltas | None = None,
    dX: Tensor | None = None,
) -> Tensor:
    """Logits ``[N, classes]`` (float64) of the network perturbed by the given deltas.

    Raises ``ValueError`` unless every delta lies in its box (``|dW| <= eps_weight`` etc.). Inputs
    are clamped to [0, 1] and activations to >= 0 after adding the delta; since the nominal values
    lie there, clamping only shrinks the effective delta, so the network stays in the model.
    With a ``LayerPerturbation`` each layer has its own radii, and clips apply: a clipped ReLU
    outputs ``max(min(relu(z), c) + dA, 0)``, a clipped input ``max(min(x, c) + dX, 0)``.
    """
    net = bounds.layers(model, X.shape[1:])
    affine = [layer for layer in net if isinstance(layer, bounds.Affine)]
    relus = [layer for layer in net if isinstance(layer, bounds.ReLU)]
    r = _radii(pert, len(affine), len(relus))
    dW = _check_deltas("dW", dW, len(affine), r.weight)
    db = _check_deltas("db", db, len(affine), r.bias)
    dA = _check_deltas("dA", dA, len(relus), r.act)
    (dX,) = _check_deltas("dX", [dX], 1, [r.input])
    h = X.to(torch.float64)
    if r.input_clip is not None:
        h = torch.clamp(h, max=r.input_clip)
        if dX is not None:
            h = torch.clamp(h + dX.to(torch.float64), min=0.0)
    elif dX is not None:
        h = torch.clamp(h + dX.to(torch.float64), 0.0, 1.0)
    affine, relus = iter(zip(dW, db, strict=True)), iter(zip(dA, r.clip, strict=True))
    for layer in net:
        if isinstance(layer, bounds.Affine):
            h = layer.perturbed(h, *next(affine))
        elif isinstance(layer, bounds.ReLU):
            h = layer.perturbed(h, *next(relus))
        else:
            h = layer.perturbed(h)
    return h


def _check_deltas(
    name: str, deltas: Deltas | None, count: int, eps: float | Sequence[float]
) -> Deltas:
    if deltas is None:
        return [None] * count
    deltas = list(deltas)
    if len(deltas) != count:
        raise ValueError(f"{name}: expected {count} entries, got {len(deltas)}")
    radii = [eps] * count if isinstance(eps, float | int) else list(eps)
    for i, (d, e) in enumerate(zip(deltas, radii, strict=True)):
        if d is not None and not bool((d.abs() <= e).all()):
            raise ValueError(
                f"{name}[{i}] leaves its box: max |delta| {d.abs().max().item()} > {e}"
            )
    return deltas


def _shapes(model: nn.Sequential, X: Tensor) -> tuple[list[tuple], list[tuple], list[tuple]]:
    net = bounds.layers(model, X.shape[1:])
    w = [tuple(layer.module.weight.shape) for layer in net if isinstance(layer, bounds.Affine)]
    b = [(s[0],) for s in w]
    a = [layer.out_shape for layer in net if isinstance(layer, bounds.ReLU)]
    return w, b, a


def random_vertex(
    model: nn.Sequential,
    X: Tensor,
    pert: AnyPerturbation,
    gen: torch.Generator,
    *,
    rows: bool = False,
) -> Perturbed:
    """A random vertex of every box, drawn independently per sample; with ``rows`` the weight
    deltas are ``RowDelta`` (one sign per output row: still a vertex, far cheaper on wide layers)."""

    def sign(shape: tuple) -> Tensor:
        return 2 * torch.randint(0, 2, shape, generator=gen, dtype=torch.float64) - 1

    return _deltas(model, X, pert, sign, rows)


def _deltas(
    model: nn.Sequential, X: Tensor, pert: AnyPerturbation, draw: Callable, rows: bool
) -> Perturbed:
    """Deltas ``draw(shape) * eps`` (``draw`` in ``[-1, 1]``) in every box with a radius, per
    sample; weight deltas as ``RowDelta`` with ``rows``."""
    n = len(X)
    w, b, a = _shapes(model, X)
    r = _radii(pert, len(w), len(a))

    def delta(shape: tuple, eps: float) -> Tensor | None:
        return None if eps == 0 else draw((n, *shape)) * eps

    def weight(shape: tuple, eps: float) -> Tensor | RowDelta | None:
        if rows and eps:
            return RowDelta(draw((n, shape[0])), eps)
        return delta(shape, eps)

    return Perturbed(
        [weight(s, e) for s, e in zip(w, r.weight, strict=True)],
        [delta(s, e) for s, e in zip(b, r.bias, strict=True)],
        [delta(s, e) for s, e in zip(a, r.act, strict=True)],
        delta(tuple(X.shape[1:]), r.input),
    )


def rtn_deltas(model: nn.Sequential, X: Tensor, pert: AnyPerturbation, bits: int) -> Perturbed:
    """Real ``bits``-bit round-to-nearest quantisation (max-abs symmetric grid per tensor for
    weights and biases, unsigned grid over [0, 1] for inputs), each kind kept only where its error
    fits inside the perturbation (else left at zero). Activations stay unquantised."""
    net = bounds.layers(model, X.shape[1:])
    r = _net_radii(model, X, pert)
    k = 0
    dW: Deltas = []
    db: Deltas = []

    def fit(t: Tensor, eps: float) -> Tensor | None:
        return t if bool((t.abs() <= eps).all()) else None

    for layer in net:
        if isinstance(layer, bounds.Affine):
            W = layer.module.weight.detach().to(torch.float64)
            dW.append(fit(symmetric_quantizer(W, bits).fake_quant(W) - W, r.weight[k]))
            bias = layer.module.bias
            if bias is None:
                db.append(None)
            else:
                b = bias.detach().to(torch.float64)
                db.append(fit(symmetric_quantizer(b, bits).fake_quant(b) - b, r.bias[k]))
            k += 1
    x = X.to(torch.float64)
    if r.input_clip is not None:
        x = torch.clamp(x, max=r.input_clip)
    grid = UniformQuantizer(bits, 1.0 / (2**bits - 1), signed=False)
    dX = fit(grid.fake_quant(x) - x, r.input)
    relus = sum(isinstance(layer, bounds.ReLU) for layer in net)
    return Perturbed(dW, db, [None] * relus, dX)


@checked_once()
def attack_logits(
    model: nn.Sequential,
    X: Tensor,
    pert: AnyPerturbation,
    *,
    steps: int = 20,
    restarts: int = 1,
    vertices: int = 8,
    bits: Sequence[int] = (),
    seed: int = 0,
    guided: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Smallest and largest value, each ``[N, classes]`` float64, that each logit was driven to by
    some concrete perturbed network: inner bounds on the true logit range.

    ``guided``: a linear bound method (``"crown"``, ``"crown-ibp"``, ``"crown-fast"``) whose
    relaxation of each objective names a vertex (``guided_vertices``) from which one more PGD run
    starts. On the MNIST 4x256 MLP at eps = 1/1023, ``"crown"`` widened the ranges by about 1.5 %
    over the nominal start alone, for one CROWN pass."""
    with torch.no_grad():
        f = perturbed_forward(model, X, pert)
    lo, hi = f.clone(), f.clone()

    def record(z: Tensor) -> None:
        nonlocal lo, hi
        lo, hi = torch.minimum(lo, z), torch.maximum(hi, z)

    classes = f.shape[1]
    objectives = _logit_objectives(classes)
    starts = None
    if guided is not None and steps > 0:
        # Objective s * z_j is raised by lowering the relaxation of -s * z_j.
        eye = torch.eye(classes, dtype=torch.float64)
        rows = torch.stack([-s * eye[j] for j in range(classes) for s in (1.0, -1.0)])
        starts = guided_vertices(model, X, pert, rows, guided)
    _search(model, X, pert, objectives, record, steps, restarts, vertices, bits, seed, starts)
    return lo, hi


def guided_vertices(
    model: nn.Sequential, X: Tensor, pert: AnyPerturbation, rows: Tensor, method: str = "crown"
) -> list[Perturbed]:
    """Per row of ``rows`` [S, classes], the vertex of every box that lowers the linear lower
    bound of ``rows[s] · logits`` from ``method`` (``bounds.bound_coefficients``): each delta at
    the end of its box against the coefficient of the value it perturbs (a convolution's kernel
    row against the coefficients summed over its positions). The relaxation's minimiser, not the
    network's: a start for a search, often better than the nominal network."""
    coeff = bounds.bound_coefficients(model, X, pert, rows, method)
    net = bounds.layers(model, X.shape[1:])
    r = _net_radii(model, X, pert)
    n = len(X)
    out = []
    for s in range(len(rows)):
        dW: Deltas = []
        db: Deltas = []
        dA: Deltas = []
        for i, layer in enumerate(net):
            c = coeff[i + 1][:, s]  # on the output of layer i
            if isinstance(layer, bounds.Affine):
                k = len(dW)
                per_row = -torch.sign(c.reshape(n, c.shape[1], -1).sum(2))  # [N, out]
                dW.append(RowDelta(per_row, r.weight[k]) if r.weight[k] else None)
                db.append(per_row * r.bias[k] if r.bias[k] else None)
            elif isinstance(layer, bounds.ReLU):
                eps = r.act[len(dA)]
                dA.append(-torch.sign(c) * eps if eps else None)
        dX = -torch.sign(coeff[0][:, s]).reshape(X.shape) * r.input if r.input else None
        out.append(Perturbed(dW, db, dA, dX))
    return out


def _logit_objectives(classes: int) -> list[Callable[[Tensor], Tensor]]:
    """``±logit_j`` for every class ``j``."""
    return [lambda z, j=j, s=s: s * z[:, j] for j in range(classes) for s in (1.0, -1.0)]


def _search(
    model: nn.Sequential,
    X: Tensor,
    pert: AnyPerturbation,
    objectives: Sequence[Callable[[Tensor], Tensor]],
    record: Callable[[Tensor], None],
    steps: int,
    restarts: int,
    vertices: int,
    bits: Sequence[int],
    seed: int,
    starts: Sequence[Perturbed] | None = None,
) -> None:
    """Visit RTN-quantised networks, random vertices and PGD on each objective (from the nominal
    network, from ``starts[k]`` for objective ``k`` if given, then ``restarts - 1`` random
    vertices); every visited network's logits ``[N, classes]`` go to ``record``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for b in bits:
            p = rtn_deltas(model, X, pert, b)
            record(perturbed_forward(model, X, pert, dW=p.dW, db=p.db, dA=p.dA, dX=p.dX))
        for _ in range(vertices):
            p = random_vertex(model, X, pert, gen, rows=True)
            record(perturbed_forward(model, X, pert, dW=p.dW, db=p.db, dA=p.dA, dX=p.dX))
    if steps <= 0:
        return
    nominal = _deltas(model, X, pert, lambda shape: torch.zeros(shape, dtype=torch.float64), True)
    for k, objective in enumerate(objectives):
        runs = [nominal] + ([starts[k]] if starts is not None else [])
        runs += [random_vertex(model, X, pert, gen, rows=True) for _ in range(restarts - 1)]
        for start in runs:
            _pgd(model, X, pert, objective, record, steps, start)


def _pgd(
    model: nn.Sequential,
    X: Tensor,
    pert: AnyPerturbation,
    objective: Callable[[Tensor], Tensor],
    record: Callable[[Tensor], None],
    steps: int,
    start: Perturbed,
) -> None:
    """Sign-gradient ascent on ``objective(logits) -> [N]`` from ``start``, projected onto the
    boxes; the logits ``[N, classes]`` of every network visited go to ``record``. From the
    nominal network (every delta zero) the first steps follow the gradient where the network is
    nearly linear, which on the book's MNIST 4x256 MLP reached logit ranges about 3 % wider than
    from a random vertex."""
    r = _net_radii(model, X, pert)
    # Weights are searched through their row parametrisation t in [-1, 1] (see RowDelta).
    rows = [(d.t, 1.0, d.eps) for d in start.dW if d is not None]
    groups = [(start.db, r.bias), (start.dA, r.act), ([start.dX], [r.input])]
    params = [(d.clone().requires_grad_(True), eps) for d, eps, _ in rows] + [
        (d.clone().requires_grad_(True), eps)
        for ds, radii in groups
        for d, eps in zip(ds, radii, strict=True)
        if d is not None
    ]
    row_eps = [e for _, _, e in rows]
    n_rows = len(rows)
    step = 2.5 / max(steps, 1)  # Madry et al.'s step: the box can be crossed in 40 % of the steps
    for t in range(steps + 1):
        flat = [p for p, _ in params]
        weights = iter(RowDelta(p, e) for p, e in zip(flat[:n_rows], row_eps, strict=True))
        deltas = _unflatten(start, [next(weights) for _ in range(n_rows)] + flat[n_rows:])
        z = perturbed_forward(model, X, pert, **deltas)
        record(z.detach())
        if t == steps or not params:
            break
        grads = torch.autograd.grad(objective(z).sum(), [p for p, _ in params], allow_unused=True)
        with torch.no_grad():
            for (p, eps), g in zip(params, grads, strict=True):
                if g is not None:
                    p.add_(step * eps * torch.sign(g)).clamp_(-eps, eps)


@dataclass(frozen=True)
class AttackedDiscrepancy:
    """Discrepancies ``[N]`` attained by concrete perturbed networks (lower bounds on the truth):
    ``d`` = max found ``|p_y - p0|`` on the true-class probability, ``logit_gap`` = max found
    ``max_j |z_j - f_j|``; ``worst`` and ``worst_logit_gap`` are the data-set maxima. ``lower``
    and ``upper`` ``[N, classes]`` are the smallest and largest value each logit reached: the
    inner bounds that a sound bound's width is measured against."""

    d: Tensor
    logit_gap: Tensor
    worst: float
    worst_logit_gap: float
    lower: Tensor
    upper: Tensor


@checked_once()
def attack_discrepancy(
    model: nn.Sequential,
    X: Tensor,
    y: Tensor,
    pert: AnyPerturbation,
    *,
    steps: int = 20,
    restarts: int = 1,
    vertices: int = 8,
    bits: Sequence[int] = (),
    seed: int = 0,
) -> AttackedDiscrepancy:
    """Search concrete networks that move the true-class probability of ``X`` [N, ...] with labels
    ``y`` [N] up and down, and every logit up and down."""
    y = y.long()
    with torch.no_grad():
        f = perturbed_forward(model, X, pert)
    p0 = torch.softmax(f, 1).gather(1, y[:, None]).squeeze(1)
    d = torch.zeros_like(p0)
    gap = torch.zeros_like(p0)
    lo, hi = f.clone(), f.clone()

    def record(z: Tensor) -> None:
        nonlocal d, gap, lo, hi
        p = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
        d = torch.maximum(d, (p - p0).abs())
        gap = torch.maximum(gap, (z - f).abs().amax(1))
        lo, hi = torch.minimum(lo, z), torch.maximum(hi, z)

    def log_p(z: Tensor) -> Tensor:
        return torch.log_softmax(z, 1).gather(1, y[:, None]).squeeze(1)

    objectives = [log_p, lambda z: -log_p(z), *_logit_objectives(f.shape[1])]
    _search(model, X, pert, objectives, record, steps, restarts, vertices, bits, seed)
    return AttackedDiscrepancy(d, gap, d.max().item(), gap.max().item(), lo, hi)


@checked_once()
def attack_margin(
    model: nn.Sequential,
    X: Tensor,
    y: Tensor,
    pert: Perturbation,
    *,
    steps: int = 20,
    restarts: int = 1,
    vertices: int = 8,
    seed: int = 0,
) -> Tensor:
    """``[N]`` bool: some concrete perturbed network found by the search (random vertices, then
    sign-gradient ascent on ``z_j - z_y`` for every class ``j``) gives image ``n`` a margin
    ``<= 0``: a falsified certificate. Its complement bounds verified accuracy from above."""
    y = y.long()
    with torch.no_grad():
        f = perturbed_forward(model, X, pert)
    hot = torch.nn.functional.one_hot(y, f.shape[1]).bool()

    def margin(z: Tensor) -> Tensor:
        return z.gather(1, y[:, None]).squeeze(1) - z.masked_fill(hot, -torch.inf).amax(1)

    found = margin(f) <= 0

    def record(z: Tensor) -> None:
        nonlocal found
        found = found | (margin(z.detach()) <= 0)

    objectives = [
        (lambda z, j=j: z[:, j] - z.gather(1, y[:, None]).squeeze(1)) for j in range(f.shape[1])
    ]
    _search(model, X, pert, objectives, record, steps, restarts, vertices, (), seed)
    return found


def _unflatten(template: Perturbed, flat: list[Tensor]) -> dict[str, Deltas | Tensor | None]:
    """Put optimised tensors back into the slots that are not None in ``template``."""
    it = iter(flat)
    out: dict[str, Deltas | Tensor | None] = {}
    for name in ("dW", "db", "dA"):
        out[name] = [None if d is None else next(it) for d in getattr(template, name)]
    out["dX"] = None if template.dX is None else next(it)
    return out
