"""The NSGA-II driver: cached, persisted, optionally parallel (Dask) evaluation of genomes.

``explore(prepared, store)`` runs NSGA-II (integer random sampling, SBX and polynomial mutation
with rounding repair, duplicate elimination). Each genome is evaluated at most once per results
file: ``CachedEvaluation`` looks it up in the ``Store`` first and appends every new result the
moment it finishes. A rerun after an interruption replays the same seeded search, finds the
finished genomes in the store, and continues where the first run stopped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from qlib import sweep
from qlib.explore.context import Evaluator, Prepared
from qlib.explore.problems import BitWidthProblem
from qlib.explore.store import Record, Store
from qlib.explore.workload import ParallelSpec

__all__ = [
    "CachedEvaluation",
    "Exploration",
    "dask_client",
    "explore",
    "hypervolume",
    "make_problem",
    "nsga2",
    "pareto_front",
    "random_search",
]


log = logging.getLogger(__name__)
Genome = tuple[int, ...]


class CachedEvaluation:
    """``genomes -> [(accuracy, cost)]`` (plus the certified value when the evaluator returns
    one) through the store, evaluating only unseen genomes."""

    def __init__(
        self,
        evaluator: Evaluator,
        store: Store,
        min_accuracy: float,
        *,
        client=None,
        progress: bool = False,
    ) -> None:
        self.evaluator, self.store, self.min_accuracy = evaluator, store, min_accuracy
        self.client, self.progress = client, progress
        self.generation = 0
        self.evaluated = 0  # genomes evaluated by this object (cache misses)
        self._remote = None

    def __call__(self, genomes: Sequence[Genome]) -> list[tuple[float, float]]:
        todo = list(dict.fromkeys(g for g in genomes if self.store.get(g) is None))
        bar = tqdm(
            total=len(todo),
            desc=f"generation {self.generation}",
            disable=not self.progress,
            leave=False,
        )
        with bar:
            for genome, result in self._run(todo):
                acc, cost, secs = result[:3]
                # A certified objective comes as (value, status) after the first three.
                extra, status = (result[3], result[4]) if len(result) > 3 else (None, "")
                objectives = (-acc, cost) if extra is None else (-acc, cost, extra)
                rec = Record(
                    self.generation,
                    genome,
                    objectives,
                    acc,
                    self.min_accuracy - acc,
                    secs,
                    status,
                )
                self.store.add(rec)  # committed now: an interruption keeps it
                self.evaluated += 1
                bar.update()
        self.generation += 1
        return [(self.store.get(g).accuracy, *self.store.get(g).objectives[1:]) for g in genomes]

    def _run(self, todo: list[Genome]) -> Iterator[tuple[Genome, tuple]]:
        if not todo:
            return
        warm = None
        if self.client is not None and self._remote is None:
            # The model and data go to every worker once, and each worker imports ModelOpt
            # and builds its network before its first genome.
            self._remote = self.client.scatter(self.evaluator, broadcast=True)
            warm = _build
        context = self.evaluator if self.client is None else self._remote
        tasks = [(g, g) for g in todo]
        for genome, result, _ in sweep.stream(_call, tasks, context, self.client, warm=warm):
            yield genome, result


def _call(evaluator: Evaluator, genome: Genome) -> tuple:
    return evaluator(genome)


def _build(evaluator: Evaluator) -> None:
    evaluator.net  # noqa: B018 - builds the fake-quantised network in this worker


@contextlib.contextmanager
def dask_client(spec: ParallelSpec, threads_per_worker: int = 1, *, quiet: bool = False):
    """A Dask client for ``spec`` through ``qlib.sweep.dask_client``: None (serial), a
    LocalCluster of ``spec.workers`` processes, or the scheduler at ``spec.address`` (or
    ``$QLIB_DASK_SCHEDULER``). ``quiet`` keeps Dask's informational and shutdown warnings out of
    a notebook's output."""
    if spec.mode == "serial":
        yield None
        return
    if quiet:
        import distributed  # noqa: F401  (its import sets its loggers' levels; override after)

        logging.getLogger("distributed").setLevel(logging.ERROR)
    scheduler = spec.address if spec.mode == "address" else None
    with sweep.dask_client(scheduler, spec.workers, threads_per_worker) as client:
        yield client


def make_problem(prepared: Prepared, evaluation: CachedEvaluation) -> BitWidthProblem:
    w = prepared.workload
    n_layers = len(prepared.evaluator.input_amax)
    return BitWidthProblem(
        w.problem,
        n_layers,
        w.bits.lower,
        w.bits.upper,
        prepared.min_accuracy,
        evaluation,
        n_obj=3 if w.certified is not None else 2,
    )


def nsga2(prepared: Prepared):
    """The NSGA-II algorithm that the workload describes."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.operators.crossover.sbx import SBX
    from pymoo.operators.mutation.pm import PM
    from pymoo.operators.repair.rounding import RoundingRepair
    from pymoo.operators.sampling.rnd import IntegerRandomSampling

    s = prepared.workload.nsga2
    return NSGA2(
        pop_size=s.population,
        n_offsprings=s.offspring,
        sampling=IntegerRandomSampling(),
        # Integers through float operators plus rounding (pymoo's documented recipe).
        crossover=SBX(
            prob=s.crossover_prob, eta=s.crossover_eta, vtype=float, repair=RoundingRepair()
        ),
        mutation=PM(prob=s.mutation_prob, eta=s.mutation_eta, vtype=float, repair=RoundingRepair()),
        eliminate_duplicates=True,
    )


@dataclass
class Exploration:
    """What a run produced: the pymoo result, the store and the counts."""

    result: object
    store: Store
    evaluated: int
    seconds: float
    min_accuracy: float
    baseline: float | None


def explore(
    prepared: Prepared,
    store: Store,
    *,
    client=None,
    progress: bool = False,
    verbose: bool = False,
    generations: int | None = None,
) -> Exploration:
    """Run NSGA-II; finished evaluations are in ``store`` even if this raises (Ctrl-C)."""
    from pymoo.optimize import minimize

    w = prepared.workload
    store.set_meta("min_accuracy", prepared.min_accuracy)
    store.set_meta("baseline", prepared.baseline)
    evaluation = CachedEvaluation(
        prepared.evaluator, store, prepared.min_accuracy, client=client, progress=progress
    )
    t0 = time.perf_counter()
    res = minimize(
        make_problem(prepared, evaluation),
        nsga2(prepared),
        ("n_gen", generations or w.nsga2.generations),
        seed=w.nsga2.seed,
        verbose=verbose,
    )
    return Exploration(
        res,
        store,
        evaluation.evaluated,
        time.perf_counter() - t0,
        prepared.min_accuracy,
        prepared.baseline,
    )


def random_search(
    prepared: Prepared, store: Store, n: int, *, seed: int = 0, client=None
) -> np.ndarray:
    """``n`` distinct uniformly random genomes, evaluated through the store; returns F ``[n, 2]``
    (``[n, 3]`` with a certified objective)."""
    w = prepared.workload
    rng = np.random.default_rng(seed)
    n_genes = 2 * len(prepared.evaluator.input_amax)
    space = (w.bits.upper - w.bits.lower + 1) ** n_genes
    if not 1 <= n <= space:
        raise ValueError(f"random search: n must be in [1, {space}] (distinct genomes), got {n}")
    seen: dict[Genome, None] = {}
    while len(seen) < n:
        seen[tuple(int(v) for v in rng.integers(w.bits.lower, w.bits.upper + 1, n_genes))] = None
    evaluation = CachedEvaluation(prepared.evaluator, store, prepared.min_accuracy, client=client)
    results = evaluation(list(seen))
    return np.array([[-r[0], *r[1:]] for r in results])


def pareto_front(
    store: Store,
    feasible_only: bool = True,
    *,
    until_generation: int | None = None,
    objectives: Sequence[int] | None = None,
) -> list[Record]:
    """Non-dominated stored records (minimising every objective), sorted by accuracy;
    ``until_generation``: only the records of that generation and earlier (the front then);
    ``objectives``: the indices of the objectives to sort on (default all; ``(0, 1)`` is the
    accuracy/cost front of a store that also holds a certified objective)."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    recs = [
        r
        for r in store.records()
        if (r.constraint <= 0 or not feasible_only)
        and (until_generation is None or r.generation <= until_generation)
    ]
    if not recs:
        return []
    F = np.array([r.objectives for r in recs])
    if objectives is not None:
        F = F[:, list(objectives)]
    front = NonDominatedSorting().do(F, only_non_dominated_front=True)
    return sorted((recs[i] for i in front), key=lambda r: -r.accuracy)


def hypervolume(F: np.ndarray, prepared: Prepared) -> float:
    """Hypervolume (pymoo) of the feasible points of ``F`` ``[n, 2]`` = ``(-accuracy, cost)``.

    The one definition the book and the benchmarks share: the reference point is the accuracy
    floor and the cost of the all-``bits.upper`` genome, and costs are divided by that cost, so
    the value lies in ``[0, 1 - floor]`` and does not depend on the cost's unit.
    """
    from pymoo.indicators.hv import HV

    w = prepared.workload
    worst = prepared.evaluator.cost([w.bits.upper] * 2 * len(prepared.evaluator.input_amax))
    F = np.asarray(F, float)
    if F.ndim == 2 and F.shape[1] != 2:
        raise ValueError(
            f"hypervolume takes the two objectives (-accuracy, cost), got {F.shape[1]} columns; "
            "pass F[:, :2] for a store with a certified objective"
        )
    F = F.reshape(-1, 2)
    F = F[-F[:, 0] >= prepared.min_accuracy]
    if not len(F):
        return 0.0
    return float(HV(ref_point=np.array([-prepared.min_accuracy, 1.0]))(F / [1.0, worst]))
