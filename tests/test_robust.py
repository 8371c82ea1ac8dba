"""Certified robust training raises verified accuracy."""

from __future__ import annotations

import pytest

from qlib import bounds, data, models, robust
from qlib.quant import Perturbation


def test_schedule():
    assert robust.schedule(0, 10, 20, 0.5) == (1.0, 0.0)
    assert robust.schedule(9, 10, 20, 0.5) == (1.0, 0.0)
    assert robust.schedule(10, 10, 20, 0.5) == (0.5, pytest.approx(1 / 20))
    assert robust.schedule(100, 10, 20, 0.5) == (0.5, 1.0)
    assert robust.schedule(0, 0, 0, 0.3) == (0.3, 1.0)


def test_robust_training_raises_verified_accuracy():
    X, y = data.load("digits", "train")
    Xt, yt = data.load("digits", "test")
    train, val = data.train_val_split(X, y, 0.2, seed=0)
    pert = Perturbation.uniform(0.01)
    normal = models.mlp([1, 8, 8], [32, 32], 10, seed=0)
    models.train(normal, train, epochs=10, lr=1e-2, batch_size=64, progress=False)
    robust_net = models.mlp([1, 8, 8], [32, 32], 10, seed=0)
    log = robust.train(
        robust_net,
        train,
        pert,
        epochs=10,
        warmup=1,
        ramp=5,
        lr=1e-2,
        batch_size=64,
        val=val,
        progress=False,
    )
    assert log.best_epoch is not None and len(log.val_verified) == 10
    before = bounds.verified_accuracy(normal, Xt, yt, pert, "ibp", margin=True)
    after = bounds.verified_accuracy(robust_net, Xt, yt, pert, "ibp", margin=True)
    assert after.accuracy > before.accuracy + 0.3
    assert after.clean_accuracy > 0.7


def test_argument_errors():
    net = models.mlp([1, 8, 8], [8], 10)
    X, y = data.load("digits", "train", limit=20)
    with pytest.raises(ValueError, match="method"):
        robust.train(net, (X, y), Perturbation(), method="crown", progress=False)
    with pytest.raises(ValueError, match="kappa"):
        robust.train(net, (X, y), Perturbation(), kappa=1.5, progress=False)
