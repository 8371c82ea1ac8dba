"""Exact worst-case bounds of quantised networks as mixed-integer linear programs.

One formulation (``formulation.build``: sparse matrices from ``qlib.bounds.layers`` and the
pre-activation boxes of ``qlib.bounds.forward_bounds``), thin backends (HiGHS by default, Gurobi),
witnesses replayed through the ordinary forward pass, and the published bilinear formulation
(SCIP, Gurobi NonConvex) for comparison. Exact for MLPs; for Conv2d networks a sound bound only.
``pert`` is a uniform ``Perturbation`` or a per-layer ``LayerPerturbation`` with clips (the box of
a mixed-precision genome, ``qlib.explore.certify.genome_box``); the bilinear model takes only the
former.

```python
from qlib import milp
lo, hi = milp.logit_bounds(net, X, pert)                  # 2 x classes solves per image
res = milp.verify(net, X, y, pert, time_limit=60)         # res.accuracy, res.unknown.sum()
```
"""

from qlib.milp.backends import (
    BACKENDS,
    InfeasibleModel,
    LicenceTooSmall,
    Outcome,
    SolverUnavailable,
    make_backend,
)
from qlib.milp.formulation import Program, build
from qlib.milp.solve import (
    FORMULATIONS,
    ImageMargin,
    LogitBounds,
    MarginVerification,
    Solve,
    attack_margin,
    image_logits,
    image_margin,
    logit_bounds,
    solver_for,
    verify,
)
from qlib.milp.tasks import Settings, experiment, logit_table, model_digest, sweep
from qlib.milp.witness import Witness, WitnessMismatch, rebuild, replay

__all__ = [
    "BACKENDS",
    "FORMULATIONS",
    "ImageMargin",
    "InfeasibleModel",
    "LicenceTooSmall",
    "LogitBounds",
    "MarginVerification",
    "Outcome",
    "Program",
    "Solve",
    "attack_margin",
    "SolverUnavailable",
    "Witness",
    "WitnessMismatch",
    "build",
    "image_logits",
    "image_margin",
    "logit_bounds",
    "make_backend",
    "rebuild",
    "replay",
    "solver_for",
    "Settings",
    "experiment",
    "logit_table",
    "model_digest",
    "sweep",
    "verify",
]
