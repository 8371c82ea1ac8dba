"""Certification sweeps through the store: resumable, keyed by every setting. Budget: ~3 s."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qlib import milp
from qlib.quant import Perturbation
from qlib.store import ResultStore


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 3))


def test_sweep_stores_and_resumes(tmp_path):
    net = _net()
    X = torch.rand(3, 1, 5, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0, 1, 2])
    pert = Perturbation.uniform(0.02)
    path = tmp_path / "cert.sqlite"
    report, recs = milp.sweep(net, X, y, pert, path, indices=[0, 2], workers=0, progress=False)
    assert report.solved == 2 and [r["image"] for r in recs] == [0, 2]
    table = milp.logit_table(recs)
    direct = milp.logit_bounds(net, X[[0, 2]], pert)
    assert np.allclose(table["lower"], direct.lower.numpy(), atol=1e-7)
    assert table["optimal"].all() and table["lower"].shape == (2, 3)
    report, recs = milp.sweep(net, X, y, pert, path, workers=0, progress=False)
    assert (report.solved, report.skipped) == (1, 2) and len(recs) == 3
    # other settings are another experiment: the file refuses them
    from qlib.store import StoreMismatch

    with pytest.raises(StoreMismatch):
        milp.sweep(net, X, y, pert, path, objective="margin", workers=0, progress=False)
    s = milp.Settings(milp.model_digest(net), pert.as_tuple(), "margin")
    with ResultStore(tmp_path / "m.sqlite", milp.experiment(s)) as store:
        _, recs = milp.sweep(net, X, y, pert, store, objective="margin", workers=0, progress=False)
    assert all(r["status"] in ("verified", "falsified", "unknown") for r in recs)
    # a directory: one file per setting, named by the settings' hash
    _, recs_dir = milp.sweep(net, X, y, pert, tmp_path, indices=[1], workers=0, progress=False)
    _, recs_m = milp.sweep(
        net, X, y, pert, tmp_path, indices=[1], objective="margin", workers=0, progress=False
    )
    assert recs_dir[0]["image"] == 1 and recs_m[0]["status"] in ("verified", "falsified")
    assert len(list(tmp_path.glob("logits-*.sqlite"))) == 1
    assert len(list(tmp_path.glob("margin-*.sqlite"))) == 1
    with pytest.raises(ValueError, match="objective must be one of"):
        milp.Settings("x", pert.as_tuple(), "entropy")


def test_model_digest_follows_the_weights():
    a, b = _net(), _net()
    assert milp.model_digest(a) == milp.model_digest(b)
    with torch.no_grad():
        b[1].weight[0, 0] += 1e-6
    assert milp.model_digest(a) != milp.model_digest(b)
