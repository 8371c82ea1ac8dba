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

from qlib.explore.context import Prepared, calibrate, load_data
from qlib.explore.store import Record, Store


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


def _accuracy(model: nn.Module, X, y, batch_size: int) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(X[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum().item()
                   for i in range(0, len(X), batch_size))
    return hits / len(X)


def reevaluate(prepared: Prepared, store: Store, n: int) -> list[Reevaluated]:
    """Accuracy of the ``n`` best individuals on ``datasets.reevaluation`` (or the exploration data)."""
    w = prepared.workload
    X, y = load_data(w.datasets.reevaluation or w.datasets.exploration)
    net = prepared.evaluator.net
    out = []
    for r in best(store, n):
        net.set_bits(r.genome)
        out.append(Reevaluated(r.genome, r.accuracy, _accuracy(net.model, X, y, w.batch_size),
                               r.objectives[1]))
    return out


def retrain(prepared: Prepared, store: Store, n: int, *, progress: bool = False) -> list[Reevaluated]:
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
        opt = torch.optim.SGD(qnet.model.parameters(), lr=w.retraining.lr, momentum=0.9)
        gen = torch.Generator().manual_seed(0)
        for _ in tqdm(range(w.retraining.epochs), desc="retrain", disable=not progress, leave=False):
            qnet.model.train()
            order = torch.randperm(len(Xt), generator=gen)
            for i in range(0, len(Xt), w.retraining.batch_size):
                idx = order[i : i + w.retraining.batch_size]
                loss = nn.functional.cross_entropy(qnet.model(Xt[idx]), yt[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        out.append(Reevaluated(r.genome, r.accuracy, _accuracy(qnet.model, Xe, ye, w.batch_size),
                               r.objectives[1]))
    return out
