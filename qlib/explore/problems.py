"""The pymoo problems: per-layer input and weight bits as integer variables.

Both problems minimise ``F = [-accuracy, cost]`` subject to ``G = min_accuracy - accuracy <= 0``;
a workload with a certified objective adds a third, ``F[2]`` (``qlib.explore.certify``).
``quantization_problem``'s cost is the weighted bit count, ``energy_aware_quant_problem``'s the
DRAM energy of one inference. Evaluations go through ``evaluate_batch`` (genomes -> list of
(accuracy, cost)), which caches, persists and parallelises (``qlib.explore.run``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from pymoo.core.problem import Problem

__all__ = [
    "BitWidthProblem",
    "COST_NAMES",
]


BatchEvaluator = Callable[[Sequence[tuple[int, ...]]], list[tuple[float, ...]]]
COST_NAMES = {
    "quantization_problem": "weighted bits",
    "energy_aware_quant_problem": "DRAM energy (uJ)",
}


class BitWidthProblem(Problem):
    """Integer genome ``[in_0, w_0, in_1, w_1, ...]`` in ``[lower, upper]``; ``n_obj`` objectives
    (2, or 3 with a certified objective): ``evaluate_batch`` returns ``(accuracy, cost, ...)``."""

    def __init__(
        self,
        kind: str,
        n_layers: int,
        lower: int,
        upper: int,
        min_accuracy: float,
        evaluate_batch: BatchEvaluator,
        n_obj: int = 2,
    ) -> None:
        if kind not in COST_NAMES:
            raise ValueError(f"unknown problem {kind!r}; expected one of {tuple(COST_NAMES)}")
        if not 2 <= lower <= upper <= 16:
            raise ValueError(f"need 2 <= lower <= upper <= 16, got {lower}, {upper}")
        if n_obj not in (2, 3):
            raise ValueError(f"n_obj must be 2 or 3, got {n_obj}")
        super().__init__(
            n_var=2 * n_layers, n_obj=n_obj, n_ieq_constr=1, xl=lower, xu=upper, vtype=int
        )
        self.kind = kind
        self.min_accuracy = min_accuracy
        self.evaluate_batch = evaluate_batch

    def _evaluate(self, x: np.ndarray, out: dict, *args, **kwargs) -> None:
        genomes = [tuple(int(round(v)) for v in row) for row in np.atleast_2d(x)]
        results = self.evaluate_batch(genomes)
        acc = np.array([r[0] for r in results])
        rest = np.array([r[1:] for r in results], dtype=float).reshape(len(results), -1)
        out["F"] = np.column_stack([-acc, rest])
        out["G"] = (self.min_accuracy - acc)[:, None]
