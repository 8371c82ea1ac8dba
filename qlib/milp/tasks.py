"""Certification sweeps: one MILP task per image, stored in a ``qlib.store.ResultStore`` and
run by ``qlib.sweep.run`` (resumable, on Dask).

A task key names everything that determines its result: the model's weights (``model_digest``),
the image index, the perturbation, the objective, the bound method for big-M, the solver, the
formulation and the time limit. The store's experiment is the same without the image, so a file
only ever holds one sweep and a rerun skips every finished image.
"""

from __future__ import annotations

import dataclasses
import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from qlib.bounds.perlayer import AnyPerturbation
from qlib.milp.solve import image_logits, image_margin
from qlib.quant import LayerPerturbation
from qlib.store import ResultStore, task_key
from qlib.sweep import SweepReport, run

__all__ = ["Settings", "model_digest", "experiment", "sweep", "logit_table", "OBJECTIVES"]

OBJECTIVES = ("logits", "margin")


@dataclass(frozen=True)
class Settings:
    """Everything but the image that determines a task's result."""

    model: str  # model_digest
    pert: tuple  # the four radii of a Perturbation; ("layer", ...fields) of a LayerPerturbation
    objective: str = "logits"
    method: str = "crown"
    solver: str = "highs"
    formulation: str = "milp"
    time_limit: float | None = None
    attack_steps: int = 10  # margin only: the attack's try before the MILP
    version: int = 1  # of the formulation: a change that alters results bumps it

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")


def model_digest(model: nn.Module) -> str:
    """A hash of the model's parameters and buffers (names, shapes, values)."""
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().to(torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def pert_key(pert: AnyPerturbation) -> tuple:
    """The perturbation as plain values for a settings key (a ``Perturbation``'s as before)."""
    if isinstance(pert, LayerPerturbation):
        return ("layer", *dataclasses.astuple(pert))
    return pert.as_tuple()


def experiment(settings: Settings) -> str:
    """The store's experiment identifier for ``settings``."""
    return "milp " + task_key(**settings.__dict__)


def _solve(ctx: tuple, payload: tuple[int, Tensor, int]) -> dict:
    """One image: the JSON record of its solves (module level, so Dask workers import it)."""
    model, pert, s = ctx
    index, x, y = payload
    torch.set_num_threads(1)
    common = dict(
        solver=s.solver, formulation=s.formulation, method=s.method, time_limit=s.time_limit
    )
    if s.objective == "margin":
        return {
            "image": index,
            "label": y,
            **image_margin(model, x, y, pert, attack_steps=s.attack_steps, **common).record(),
        }
    program, solves = image_logits(model, x, pert, **common)
    return {
        "image": index,
        "label": y,
        "kind": program.kind,
        "binaries": program.n_binary,
        "solves": [sv.record() for sv in solves],
    }


def sweep(
    model: nn.Sequential,
    X: Tensor,
    y: Tensor,
    pert: AnyPerturbation,
    store: ResultStore | str | Path,
    *,
    indices: list[int] | None = None,
    objective: str = "logits",
    method: str = "crown",
    solver: str = "highs",
    formulation: str = "milp",
    time_limit: float | None = None,
    attack_steps: int = 10,
    workers: int | None = None,
    scheduler: str | None = None,
    client=None,
    progress: bool = True,
) -> tuple[SweepReport, list[dict]]:
    """Solve ``objective`` for the images ``indices`` of ``X`` [N, ...] (labels ``y`` [N]) and
    return the sweep report and the records of those images, in index order.

    ``store`` is a ``ResultStore`` opened for ``experiment(settings)``, a file path to open, or
    an existing directory, in which the file ``<objective>-<hash of the settings>.sqlite`` is
    used (so every setting gets its own file). Tasks already stored are skipped.
    ``workers=0`` solves in this process (see ``qlib.sweep.run``).
    """
    s = Settings(
        model_digest(model),
        pert_key(pert),
        objective,
        method,
        solver,
        formulation,
        time_limit,
        attack_steps,
    )
    own = not isinstance(store, ResultStore)
    if own and Path(store).is_dir():
        digest = hashlib.sha1(experiment(s).encode()).hexdigest()[:12]
        store = Path(store) / f"{objective}-{digest}.sqlite"
    st = ResultStore(store, experiment(s)) if own else store
    try:
        if st.experiment != experiment(s):
            raise ValueError(
                f"store {st.path} is for experiment {st.experiment!r}, these settings need "
                f"{experiment(s)!r}"
            )
        idx = list(range(len(X))) if indices is None else [int(i) for i in indices]
        tasks = {task_key(image=i): (i, X[i], int(y[i])) for i in idx}
        report = run(
            _solve,
            tasks,
            st,
            context=(model, pert, s),
            workers=workers,
            scheduler=scheduler,
            client=client,
            progress=progress,
            desc=f"MILP {objective}",
        )
        records = [st.get(task_key(image=i)) for i in idx]
    finally:
        if own:
            st.close()
    return report, records


def logit_table(records: list[dict]) -> dict[str, np.ndarray]:
    """Arrays from ``"logits"`` records: ``lower``/``upper``/``attained_lower``/
    ``attained_upper`` [N, classes] (proven bounds and witness values), ``optimal``
    [N, classes, 2] (min, max), ``seconds`` [N]."""
    out: dict[str, list] = {
        k: [] for k in ("lower", "upper", "attained_lower", "attained_upper", "optimal", "seconds")
    }
    for r in records:
        if r is None or "solves" not in r or r.get("status") is not None:
            raise ValueError("logit_table needs the records of a 'logits' sweep")
        mins = [s for s in r["solves"] if s["sense"] == "min"]
        maxs = [s for s in r["solves"] if s["sense"] == "max"]
        out["lower"].append([s["bound"] for s in mins])
        out["upper"].append([s["bound"] for s in maxs])
        out["attained_lower"].append([s["primal"] for s in mins])
        out["attained_upper"].append([s["primal"] for s in maxs])
        out["optimal"].append(
            [
                [a["status"] == "optimal", b["status"] == "optimal"]
                for a, b in zip(mins, maxs, strict=True)
            ]
        )
        out["seconds"].append(sum(s["seconds"] for s in r["solves"]))
    return {k: np.asarray(v) for k, v in out.items()}
