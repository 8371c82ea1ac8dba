"""Exact worst-case logits and exact verification, image by image.

``logit_bounds`` minimises and maximises every logit (2 x classes solves per image);
``verify`` minimises the true-class margin ``z_y - z_j`` against each other class, stopping a solve
as soon as its dual bound proves the margin positive or a primal point proves it non-positive.
Every result carries the proven (dual) bound, the best primal value, the gap, the status and the
seconds. A time-out is reported as ``"unknown"``, never as verified. Every primal point is
replayed as a concrete network (``qlib.milp.witness``) before it is reported.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from qlib import attack, bounds
from qlib.attack import attack_margin  # re-exported: verification runs it first
from qlib.bounds.perlayer import AnyPerturbation
from qlib.milp.backends import make_backend
from qlib.milp.formulation import Program, build
from qlib.milp.witness import Witness, replay
from qlib.quant import Perturbation

__all__ = [
    "Solve",
    "ImageMargin",
    "LogitBounds",
    "MarginVerification",
    "solver_for",
    "image_logits",
    "image_margin",
    "logit_bounds",
    "verify",
    "FORMULATIONS",
    "attack_margin",
]

FORMULATIONS = ("milp", "bilinear")


@dataclass(frozen=True)
class Solve:
    """One solve of ``target`` (e.g. ``"logit 3"``, ``"margin 7-2"``) in direction ``sense``.

    ``bound`` is proven: a lower bound when minimising, an upper bound when maximising (the
    solver's dual bound, sound even after a time-out); ``primal`` the best value attained by a
    replayed witness (nan if none, and always for a Conv2d relaxation, whose points are no
    networks); ``gap`` is the solver's ``|primal - bound|``. ``status``: ``"optimal"``,
    ``"unknown"`` (time limit), or for margins ``"verified"``/``"falsified"`` when stopped early.
    """

    target: str
    sense: str
    bound: float
    primal: float
    gap: float
    status: str
    seconds: float
    nodes: int
    witness: Witness | None = field(default=None, compare=False, repr=False)

    def record(self) -> dict:
        """JSON-able fields (no witness)."""
        d = asdict(self)
        d.pop("witness")
        return d


@dataclass(frozen=True)
class ImageMargin:
    """Exact verification of one image: ``status`` ``"verified"``, ``"falsified"`` or
    ``"unknown"``; ``margin_bound``/``margin_primal`` ``[classes]`` (inf at the label) are the
    proven lower bounds and attained values of ``z_y - z_j``; ``decided_by`` says how."""

    status: str
    margin_bound: np.ndarray
    margin_primal: np.ndarray
    seconds: float
    decided_by: str
    solves: tuple[Solve, ...]

    def record(self) -> dict:
        return {
            "status": self.status,
            "margin_bound": [float(v) for v in self.margin_bound],
            "margin_primal": [float(v) for v in self.margin_primal],
            "seconds": self.seconds,
            "decided_by": self.decided_by,
            "solves": [s.record() for s in self.solves],
        }


def solver_for(
    model: nn.Sequential, program: Program, solver: str, formulation: str, threads: int = 1
):
    """The backend that minimises over ``program``'s columns: the MILP itself, or the bilinear
    formulation built beside it."""
    if formulation == "milp":
        return make_backend(solver, program, threads=threads)
    if formulation == "bilinear":
        from qlib.milp.bilinear import BILINEAR_BACKENDS

        if solver not in BILINEAR_BACKENDS:
            raise ValueError(
                f"the bilinear formulation runs on {tuple(BILINEAR_BACKENDS)}, got {solver!r}"
            )
        if not isinstance(program.pert, Perturbation):
            raise TypeError(
                "the bilinear formulation is the published model of one uniform Perturbation; "
                "a LayerPerturbation (per-layer radii, clips) needs formulation='milp'"
            )
        return BILINEAR_BACKENDS[solver](model, program, threads=threads)
    raise ValueError(f"formulation must be one of {FORMULATIONS}, got {formulation!r}")


def _check(
    model: nn.Sequential, x: Tensor, pert: AnyPerturbation, time_limit: float | None
) -> None:
    if time_limit is not None and not (time_limit > 0):
        raise ValueError(f"time_limit must be > 0 seconds or None, got {time_limit!r}")
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")


def _witness(model, program, out, c_logits, value, what, keep):
    """Replay a primal point (MLPs only; a Conv2d program's point is no real network)."""
    if out.values is None or not program.exact:
        return None
    w = replay(model, program, out.values, c_logits, value, what)
    return w if keep else None


def image_logits(
    model: nn.Sequential,
    x: Tensor,
    pert: AnyPerturbation,
    *,
    solver: str = "highs",
    formulation: str = "milp",
    method: bounds.Method = "crown",
    time_limit: float | None = None,
    classes: Sequence[int] | None = None,
    keep_witnesses: bool = False,
    threads: int = 1,
) -> tuple[Program, list[Solve]]:
    """Minimise then maximise each logit of one input ``x`` [*in_shape]: ``2 x classes`` solves,
    each within ``time_limit`` seconds. Returns the program and the solves in the order
    (min 0, max 0, min 1, ...)."""
    _check(model, x, pert, time_limit)
    program = build(model, x, pert, method)
    backend = solver_for(model, program, solver, formulation, threads)
    n_cls = len(program.logits)
    solves = []
    last = None
    for j in range(n_cls) if classes is None else classes:
        for sense, sign in (("min", 1.0), ("max", -1.0)):
            c = program.objective({int(program.logits[j]): sign})
            if last is not None and hasattr(backend, "start"):
                backend.start(last)  # every earlier solution stays feasible: a free incumbent
            out = backend.minimize(c, time_limit=time_limit)
            last = out.values if out.values is not None else last
            c_logits = np.zeros(n_cls)
            c_logits[j] = sign
            w = _witness(
                model, program, out, c_logits, out.primal, f"{sense} logit {j}", keep_witnesses
            )
            bound, primal = sign * out.bound, sign * out.primal
            # the gap is the solver's; a relaxation's (Conv2d) point is no network: no value
            gap = abs(primal - bound) if out.values is not None else math.inf
            if out.values is None or not program.exact:
                primal = math.nan
            status = "optimal" if out.status == "optimal" else "unknown"
            solves.append(
                Solve(f"logit {j}", sense, bound, primal, gap, status, out.seconds, out.nodes, w)
            )
    return program, solves


def image_margin(
    model: nn.Sequential,
    x: Tensor,
    y: int,
    pert: AnyPerturbation,
    *,
    solver: str = "highs",
    formulation: str = "milp",
    method: bounds.Method = "crown",
    time_limit: float | None = 60.0,
    keep_witnesses: bool = False,
    threads: int = 1,
    attack_steps: int = 10,
) -> ImageMargin:
    """Decide whether every perturbed network classifies ``x`` [*in_shape] as ``y``.

    Cheap steps first: a misclassifying nominal network falsifies at once; classes whose CROWN
    margin bound is already positive need no solve; then ``attack_margin`` with
    ``attack_steps`` steps (0: skip) may find a concrete misclassifying network. The other
    classes are solved hardest first (smallest CROWN bound) within ``time_limit`` seconds for
    the whole image; each solve stops once its dual bound is > 0 (that class verified) or a
    replayed witness has margin <= 0 (image falsified). Classes left when time runs out make the image ``"unknown"``.
    """
    _check(model, x, pert, time_limit)
    t0 = time.perf_counter()
    X = x.unsqueeze(0)
    with torch.no_grad():
        # The box's own nominal network (its clips applied): a member of the box.
        logits = attack.perturbed_forward(model, X, pert)[0]
        crown = bounds.margin_bounds(model, X, torch.tensor([y]), pert, method)[0].numpy()
    n_cls = len(crown)
    if not 0 <= int(y) < n_cls:
        raise ValueError(f"label y must be in [0, {n_cls}), got {y}")
    bound = crown.copy()
    primal = np.full(n_cls, math.inf)
    primal[y] = math.inf
    nominal = (logits[y] - logits).numpy()
    if (np.delete(nominal, y) <= 0).any():  # the unperturbed network is a witness itself
        primal = nominal.copy()
        return ImageMargin("falsified", bound, primal, time.perf_counter() - t0, "nominal", ())
    todo = [j for j in np.argsort(crown) if j != y and crown[j] <= 0]
    if not todo:
        return ImageMargin("verified", bound, primal, time.perf_counter() - t0, method, ())
    if attack_steps > 0 and bool(
        attack_margin(model, X, torch.tensor([y]), pert, steps=attack_steps, vertices=4)[0]
    ):
        return ImageMargin("falsified", bound, primal, time.perf_counter() - t0, "attack", ())
    program = build(model, x, pert, method)
    backend = solver_for(model, program, solver, formulation, threads)
    solves: list[Solve] = []
    status = "verified"
    for j in todo:
        left = None if time_limit is None else time_limit - (time.perf_counter() - t0)
        if left is not None and left <= 0:
            status = "unknown"
            break
        c = program.objective({int(program.logits[y]): 1.0, int(program.logits[j]): -1.0})
        out = backend.minimize(c, time_limit=left, stop_bound_above=0.0, stop_primal_below=0.0)
        c_logits = np.zeros(n_cls)
        c_logits[y], c_logits[j] = 1.0, -1.0
        w = _witness(model, program, out, c_logits, out.primal, f"margin {y}-{j}", keep_witnesses)
        bound[j] = max(bound[j], out.bound)
        # Only a replayed witness falsifies; a Conv2d relaxation's point is no real network.
        attained = out.values is not None and program.exact
        primal[j] = out.primal if attained else math.inf
        if attained and out.primal <= 0:
            s = "falsified"
        elif out.bound > 0:
            s = "verified"
        else:
            s = "optimal" if out.status == "optimal" else "unknown"
        gap = abs(out.primal - out.bound) if out.values is not None else math.inf
        solves.append(
            Solve(f"margin {y}-{j}", "min", out.bound, primal[j], gap, s, out.seconds, out.nodes, w)
        )
        if s == "falsified":
            status = "falsified"
            break
        if s != "verified":
            status = "unknown"  # an optimum of exactly 0, or a time-out: not verified
    return ImageMargin(status, bound, primal, time.perf_counter() - t0, "milp", tuple(solves))


@dataclass(frozen=True)
class LogitBounds:
    """Exact (MLP) or sound (Conv2d) logit bounds for a batch; unpacks as ``lower, upper``.

    ``lower``/``upper`` ``[N, classes]`` are proven (dual) bounds; ``attained_lower``/
    ``attained_upper`` the values replayed witnesses reached (nan if none); ``optimal``
    ``[N, classes, 2]`` (min, max) says which solves closed their gap; ``seconds`` ``[N]``.
    """

    lower: Tensor
    upper: Tensor
    attained_lower: Tensor
    attained_upper: Tensor
    optimal: Tensor
    seconds: Tensor
    kind: str
    solves: tuple[tuple[Solve, ...], ...]

    def __iter__(self):
        return iter((self.lower, self.upper))

    @property
    def unknown(self) -> int:
        """Number of solves that hit the time limit."""
        return int((~self.optimal).sum())


def logit_bounds(
    model: nn.Sequential,
    X: Tensor,
    pert: AnyPerturbation,
    *,
    solver: str = "highs",
    formulation: str = "milp",
    method: bounds.Method = "crown",
    time_limit: float | None = None,
    progress: bool = False,
    threads: int = 1,
) -> LogitBounds:
    """Bounds ``[N, classes]`` on every logit of every perturbed network for ``X`` [N, ...]."""
    rows = []
    kind = "exact"
    for x in tqdm(X, desc="MILP logit bounds", disable=not progress):
        program, solves = image_logits(
            model,
            x,
            pert,
            solver=solver,
            formulation=formulation,
            method=method,
            time_limit=time_limit,
            threads=threads,
        )
        kind = program.kind
        rows.append(solves)

    def grid(key, sense):
        return torch.tensor(
            [[getattr(s, key) for s in r if s.sense == sense] for r in rows], dtype=torch.float64
        )

    opt = torch.tensor(
        [[[s.status == "optimal" for s in r[k : k + 2]] for k in range(0, len(r), 2)] for r in rows]
    )
    return LogitBounds(
        grid("bound", "min"),
        grid("bound", "max"),
        grid("primal", "min"),
        grid("primal", "max"),
        opt,
        torch.tensor([sum(s.seconds for s in r) for r in rows]),
        kind,
        tuple(tuple(r) for r in rows),
    )


@dataclass(frozen=True)
class MarginVerification:
    """Exact verification of a batch: ``status`` per image; ``verified``/``falsified``/
    ``unknown`` ``[N]`` bool; ``accuracy`` the verified share (time-outs count as not verified);
    ``upper_accuracy`` the share not falsified (what verification could reach with more time)."""

    images: tuple[ImageMargin, ...]
    kind: str

    @property
    def status(self) -> list[str]:
        return [im.status for im in self.images]

    def _mask(self, s: str) -> Tensor:
        return torch.tensor([im.status == s for im in self.images])

    @property
    def verified(self) -> Tensor:
        return self._mask("verified")

    @property
    def falsified(self) -> Tensor:
        return self._mask("falsified")

    @property
    def unknown(self) -> Tensor:
        return self._mask("unknown")

    @property
    def accuracy(self) -> float:
        return self.verified.double().mean().item()

    @property
    def upper_accuracy(self) -> float:
        return 1.0 - self.falsified.double().mean().item()

    @property
    def seconds(self) -> Tensor:
        return torch.tensor([im.seconds for im in self.images])


def verify(
    model: nn.Sequential,
    X: Tensor,
    y: Tensor,
    pert: AnyPerturbation,
    *,
    solver: str = "highs",
    formulation: str = "milp",
    method: bounds.Method = "crown",
    time_limit: float | None = 60.0,
    progress: bool = False,
    threads: int = 1,
    attack_steps: int = 10,
) -> MarginVerification:
    """``image_margin`` for every image of ``X`` [N, ...] with labels ``y`` [N]."""
    if not isinstance(y, Tensor) or y.shape != (len(X),):
        raise ValueError(f"y must be a tensor of shape ({len(X)},), got {getattr(y, 'shape', y)}")
    images = []
    for x, t in tqdm(list(zip(X, y, strict=True)), desc="MILP verification", disable=not progress):
        images.append(
            image_margin(
                model,
                x,
                int(t),
                pert,
                solver=solver,
                formulation=formulation,
                method=method,
                time_limit=time_limit,
                threads=threads,
                attack_steps=attack_steps,
            )
        )
    net = bounds.layers(model, tuple(X.shape[1:]))
    exact = all(isinstance(la, bounds.Linear) for la in net if isinstance(la, bounds.Affine))
    return MarginVerification(
        tuple(images), "exact" if exact else "sound bound (Conv2d relaxation)"
    )
