"""GPTQ on the shared grid: never worse than RTN per layer, options, bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qlib import data, gptq, models, ptq
from qlib.ptq import make_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    X, y = data.load("digits", "train")
    m = models.mlp((1, 8, 8), [64, 32], 10, seed=0)
    models.train(m, (X, y), epochs=10, lr=1e-2, batch_size=64, progress=False)
    return m, X[:512], data.load("digits", "test")


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [3, 4])
def test_layer_error_not_above_rtn(setup, bits, per_channel):
    model, calib, _ = setup
    q = gptq.quantize(model, calib, bits, scalar="max", per_channel=per_channel)
    r = ptq.rtn(model, bits, calib=calib, scalar="max", per_channel=per_channel)
    for lq, lr in zip(q.layers, r.layers, strict=True):
        assert lq.rel_error <= lr.rel_error, (lq.name, lq.rel_error, lr.rel_error)


def test_accuracy_and_act_order(setup):
    model, calib, test = setup
    r = ptq.rtn(model, 3, eval_data=test)
    for act_order in (False, True):
        q = gptq.quantize(model, calib, 3, act_order=act_order, block_size=16, eval_data=test)
        assert q.accuracy >= r.accuracy - 0.01
        for lay in q.layers:
            assert lay.min_int <= int(lay.codes.min()) and int(lay.codes.max()) <= lay.max_int


def test_block_size_does_not_change_codes():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(200, 50, generator=g, dtype=torch.float64)
    w = torch.randn(7, 50, generator=g, dtype=torch.float64)
    qz = make_quantizer(3, torch.full((7, 1), 0.5, dtype=torch.float64))
    H = X.T @ X
    a = gptq.solve(w, qz, H, block_size=50)
    b = gptq.solve(w, qz, H, block_size=8)
    assert torch.equal(a, b)
    # The lazy-batch algorithm never does worse than rounding on its own objective.
    q_rtn = qz.to_int(w) * 0.5
    err = lambda q: ((w - q) @ H * (w - q)).sum()  # noqa: E731
    assert err(a * 0.5) <= err(q_rtn)


def test_dead_columns_are_rounded_to_nearest():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 4))
    calib = torch.rand(32, 1, 3, 4)
    calib.view(32, -1)[:, 3:6] = 0
    res = gptq.quantize(model, calib, 4, scalar=1.0)
    w = model[1].weight.detach()
    assert torch.equal(
        res.layers[0].codes[:, 3:6].float(),
        make_quantizer(4, res.layers[0].scale).to_int(w[:, 3:6]),
    )


def test_bad_input(setup):
    model, calib, _ = setup
    with pytest.raises(ValueError, match="bits"):
        gptq.quantize(model, calib, 1)
    with pytest.raises(ValueError, match="calibration set is empty"):
        gptq.quantize(model, calib[:0], 4)
    with pytest.raises(ValueError, match="damp"):
        gptq.quantize(model, calib, 4, damp=-1.0)
    with pytest.raises(ValueError, match="block_size"):
        gptq.quantize(model, calib, 4, block_size=0)
