"""GPFQ and the shared PTQ loop: quality against RTN, the two exact forms, grids, bad input."""

from __future__ import annotations

import csv
import logging

import pytest
import torch
from torch import nn

from qlib import data, gpfq, models, ptq
from qlib.ptq import make_quantizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return data.load("digits", "train"), data.load("digits", "test")


@pytest.fixture(scope="module")
def mlp(digits):
    (X, y), _ = digits
    m = models.mlp((1, 8, 8), [64, 32], 10, seed=0)
    models.train(m, (X, y), epochs=20, lr=1e-2, batch_size=64, progress=False)
    return m


@pytest.fixture(scope="module")
def cnn(digits):
    (X, y), _ = digits
    m = models.cnn((1, 8, 8), 10, channels=(8, 16), hidden=32, seed=0)
    models.train(m, (X, y), epochs=20, lr=1e-2, batch_size=64, progress=False)
    return m


def _calib(digits, n=512):
    (X, _), _ = digits
    return X[torch.randperm(len(X), generator=torch.Generator().manual_seed(1))[:n]]


def test_layer_error_below_rtn(mlp, digits):
    calib = _calib(digits)
    g = gpfq.quantize(mlp, calib, 3)
    # RTN on the same grid with its own best C: GPFQ must still beat it on every layer.
    r = ptq.rtn(mlp, 3, calib=calib, scalar="auto")
    for lg, lr in zip(g.layers, r.layers, strict=True):
        assert lg.rel_error < lr.rel_error, (lg.name, lg.rel_error, lr.rel_error)


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_accuracy_not_below_rtn(request, digits, arch, bits):
    model = request.getfixturevalue(arch)
    test = digits[1]
    calib = _calib(digits)
    g = gpfq.quantize(model, calib, bits, eval_data=test)
    r = ptq.rtn(model, bits, eval_data=test)
    assert g.accuracy >= r.accuracy - 0.01, (g.accuracy, r.accuracy)
    assert g.accuracy >= g.float_accuracy - 0.05


@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("p", [1.0, 0.5])
def test_covariance_equals_im2col(cnn, digits, stochastic, p):
    calib = _calib(digits, 256)
    kw = dict(p=p, stochastic=stochastic, per_channel=True, seed=3)
    a = gpfq.quantize(cnn, calib, 3, method="covariance", **kw)
    b = gpfq.quantize(cnn, calib, 3, method="im2col", **kw)
    for la, lb in zip(a.layers, b.layers, strict=True):
        assert torch.equal(la.codes, lb.codes), la.name
        assert la.scalar == lb.scalar
        assert la.rel_error == pytest.approx(lb.rel_error, rel=1e-9, abs=1e-12)


def test_covariance_solver_matches_path_following():
    # Random, mismatched X and X~ with more columns than rows; the im2col solver is the
    # published recursion written out, u_t = u_{t-1} + w_t X_t - q_t X~_t.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 70, generator=g, dtype=torch.float64)
    Xt = X + 0.1 * torch.randn(40, 70, generator=g, dtype=torch.float64)
    w = torch.randn(9, 70, generator=g, dtype=torch.float64)
    qz = make_quantizer(3, torch.full((9, 1), 0.4, dtype=torch.float64))
    a = gpfq.solve_covariance(w, qz, Xt.T @ Xt, Xt.T @ X, block=16)
    b = gpfq.solve_im2col(w, qz, X, Xt, max_elements=100)  # forces row chunks
    assert torch.equal(a, b)
    # The residual of the codes is u_d: check one neuron by hand.
    u = torch.zeros(40, dtype=torch.float64)
    for t in range(70):
        v = u + w[0, t] * X[:, t]
        c = torch.clamp(torch.round((Xt[:, t] @ v) / (Xt[:, t] @ Xt[:, t]) / 0.4), -4, 3)
        assert c == a[0, t]
        u = v - c * 0.4 * Xt[:, t]


@pytest.mark.parametrize("levels", ptq.LEVELS)
@pytest.mark.parametrize("per_channel", [False, True])
def test_codes_in_range_and_weights_on_grid(cnn, digits, levels, per_channel):
    bits = 3
    res = gpfq.quantize(cnn, _calib(digits, 128), bits, levels=levels, per_channel=per_channel)
    count = {"2^b": 2**bits, "2^b-1": 2**bits - 1, "2^b+1": 2**bits + 1}[levels]
    modules = dict(res.model.named_modules())
    assert [r.name for r in res.layers] == ["0", "2", "5", "7"]
    for r in res.layers:
        assert r.num_levels == count and r.codes.dtype == torch.int32
        assert r.min_int <= int(r.codes.min()) and int(r.codes.max()) <= r.max_int
        assert r.scale.ndim == (r.codes.ndim if per_channel else 0)
        assert torch.allclose(modules[r.name].weight, r.weight())


def test_float_model_unchanged(mlp, digits):
    before = {k: v.clone() for k, v in mlp.state_dict().items()}
    gpfq.quantize(mlp, _calib(digits, 128), 2, bias_correction=True, fresh_batches=True)
    after = mlp.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in mlp.parameters())


def test_dead_columns_fall_back_to_rtn():
    # The first 5 input coordinates are zero on every calibration sample.
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(20, 6), nn.ReLU(), nn.Linear(6, 3))
    calib = torch.rand(64, 1, 4, 5, generator=g)
    calib.view(64, -1)[:, :5] = 0
    for method in gpfq.METHODS:
        res = gpfq.quantize(model, calib, 4, scalar=1.0, method=method)
        first = res.layers[0]
        w = model[1].weight.detach()
        rtn_codes = make_quantizer(4, first.scale).to_int(w[:, :5])
        assert torch.equal(first.codes[:, :5].float(), rtn_codes)
        assert 0 <= first.rel_error < 1


def test_bits_per_layer_float_layers_and_log(mlp, digits, tmp_path):
    calib, test = _calib(digits, 128), digits[1]
    log = tmp_path / "runs.csv"
    res = gpfq.quantize(
        mlp, calib, {"1": 8, "default": 3}, float_layers=[-1], eval_data=test, log_path=log
    )
    assert [(r.name, r.bits) for r in res.layers] == [("1", 8), ("3", 3)]
    assert res.float_layers == ["5"]
    assert torch.equal(res.model[5].weight, mlp[5].weight)
    gpfq.quantize(mlp, calib, [4, 4, 4], log_path=log)
    rows = list(csv.DictReader(log.open()))
    assert len(rows) == 2 and rows[0]["bits"] == "8/3" and rows[0]["calib_size"] == "128"
    assert float(rows[0]["accuracy"]) == pytest.approx(res.accuracy)
    assert set(res.export()) == {"1", "3"}


def test_bias_correction_matches_mean_output(mlp, digits):
    calib = _calib(digits, 256)
    res = gpfq.quantize(mlp, calib, 2, bias_correction=True)
    x = calib.flatten(1)
    # First layer: X = X~, so the corrected bias makes the mean pre-activation exact.
    ref = (x @ mlp[1].weight.T + mlp[1].bias).mean(0)
    out = (x @ res.model[1].weight.T + res.model[1].bias).mean(0)
    assert torch.allclose(ref, out, atol=1e-4)


def test_retrain_and_options_run(mlp, digits):
    (X, y), test = digits
    res = gpfq.quantize(
        mlp, (X[:256], y[:256]), 3, retrain=ptq.Retrain(epochs=1), eval_data=test, levels="2^b+1"
    )
    assert res.accuracy > 0.5 and res.config["retrain"].epochs == 1


def test_bad_input(mlp, digits):
    calib = _calib(digits, 64)
    for bits in (1, 17, 2.5):
        with pytest.raises(ValueError, match="bits"):
            gpfq.quantize(mlp, calib, bits)
    with pytest.raises(ValueError, match="calibration set is empty"):
        gpfq.quantize(mlp, calib[:0], 3)
    with pytest.raises(ValueError, match="calibration set"):
        gpfq.quantize(mlp, torch.rand(8, 1, 9, 9), 3)
    with pytest.raises(ValueError, match="calibration set"):
        gpfq.quantize(mlp, (calib, torch.zeros(3, dtype=torch.long)), 3)
    with pytest.raises(ValueError, match="levels"):
        gpfq.quantize(mlp, calib, 3, levels="2^b+2")
    with pytest.raises(ValueError, match="scalar"):
        gpfq.quantize(mlp, calib, 3, scalar=-1.0)
    with pytest.raises(ValueError, match="p must"):
        gpfq.quantize(mlp, calib, 3, p=0.0)
    with pytest.raises(ValueError, match="float_layers"):
        gpfq.quantize(mlp, calib, 3, float_layers=["nope"])
    with pytest.raises(ValueError, match="method"):
        gpfq.quantize(mlp, calib, 3, method="svd")


def test_unsupported_layers_warn_or_raise(caplog):
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, groups=2), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)
    )
    calib = torch.rand(16, 2, 5, 5)
    with caplog.at_level(logging.WARNING, logger="qlib.ptq"):
        res = gpfq.quantize(model, calib, 4)
    assert [r.name for r in res.layers] == ["3"]
    assert "skipping unsupported layer '0'" in caplog.text
    assert torch.equal(res.model[0].weight, model[0].weight)
    with pytest.raises(ValueError, match="not supported"):
        gpfq.quantize(model, calib, 4, layers=["0", "3"])
