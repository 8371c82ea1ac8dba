"""After an exploration: re-evaluate the best individuals on more data, or fine-tune them.

Fine-tuning is short quantisation-aware training: the fake-quantised network is trained with
its quantisers active; ModelOpt's fake quantisation passes gradients straight through
(straight-through estimator), so float weights learn to sit well on the quantisation grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from qlib import models
from qlib.explore.context import Prepared, calibrate, load_data
from qlib.explore.store import Record, Store

__all__ = [
    "Reevaluated",
    "best",
    "reevaluate",
    "retrain",
]


@dataclass(frozen=True)
class Reevaluated:
    """One individual: its exploration accuracy and its accuracy on the re-evaluation data."""

    genome: tuple[int, ...]
    exploration_accuracy: float
    accuracy: float
    cost: float


def best(store: Store, n: int) -> list[Record]:
    """The ``n`` feasible records with the highest accuracy (ties: lower cost first)."""
    recs = [r for r in store.records() if r.constraint <= 0]
    return sorted(recs, key=lambda r: (-r.accuracy, r.objectives[1]))[:n]


def reevaluate(prepared: Prepared, store: Store, n: int) -> list[Reevaluated]:
    """Accuracy of the ``n`` best individuals on ``datasets.reevaluation`` (or the exploration data)."""
    w = prepared.workload
    X, y = load_data(w.datasets.reevaluation or w.datasets.exploration)
    net = prepared.evaluator.net
    out = []
    for r in best(store, n):
        net.set_bits(r.genome)
        accuracy = models.evaluate(net.model, (X, y), w.batch_size)
        out.append(Reevaluated(r.genome, r.accuracy, accuracy, r.objectives[1]))
    return out


def retrain(
    prepared: Prepared, store: Store, n: int, *, progress: bool = False
) -> list[Reevaluated]:
    """Fine-tune a fresh quantised copy for each of the ``n`` best individuals; re-evaluate it."""
    w = prepared.workload
    spec = w.datasets.train
    if spec is None:
        raise ValueError("retraining needs datasets.train in the workload")
    Xt, yt = load_data(spec)
    Xe, ye = load_data(w.datasets.reevaluation or w.datasets.exploration)
    out = []
    for r in best(store, n):
        qnet = calibrate(w, prepared.model)
        qnet.set_bits(r.genome)
        net = qnet.model
        opt = torch.optim.SGD(net.parameters(), lr=w.retraining.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(0)

        def loss_fn(xb: torch.Tensor, yb: torch.Tensor, net: nn.Module = net) -> torch.Tensor:
            return nn.functional.cross_entropy(net(xb), yb)

        for _ in tqdm(
            range(w.retraining.epochs), desc="retrain", disable=not progress, leave=False
        ):
            models.train_epoch(net, (Xt, yt), opt, gen, w.retraining.batch_size, loss_fn)
        accuracy = models.evaluate(net, (Xe, ye), w.batch_size)
        out.append(Reevaluated(r.genome, r.accuracy, accuracy, r.objectives[1]))
    return out
