"""LSQ quantisation-aware training and KURE on the one training loop. Budget: ~6 s."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from qlib import data, models, qat, zoo


def test_lsq_forward_grid_ste_and_step_gradient():
    x = torch.tensor([-3.0, -0.26, 0.1, 0.26, 0.9, 5.0], requires_grad=True)
    step = torch.tensor(0.5, requires_grad=True)
    q = qat.lsq_quantize(x, step, qn=4, qp=3, numel=6)
    assert torch.equal(q.detach(), torch.tensor([-2.0, -0.5, 0.0, 0.5, 1.0, 1.5]))
    q.sum().backward()
    # Straight through inside the clip range, zero outside.
    assert torch.equal(x.grad, torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 0.0]))
    # LSQ: dq/ds = round(v/s) - v/s inside, -qn / qp at the clips; times g = 1/sqrt(numel qp).
    v = x.detach() / 0.5
    inner = torch.where(v <= -4, -4.0, torch.where(v >= 3, 3.0, v.round() - v))
    assert step.grad.item() == pytest.approx(inner.sum().item() / math.sqrt(6 * 3))


def test_qatnet_fake_quantises_and_exports_plain_float_weights():
    net = models.mlp([1, 8, 8], [16], 10, seed=0)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    qnet = qat.QATNet(net, bits=4, act_bits=3)
    X, _ = data.load("digits", "train", limit=32)
    out = qnet(X)  # first call initialises the steps: 2 mean|v| / sqrt(Q_p)
    w_q, a_q = qnet.weight_q["1"], qnet.input_q["1"]
    assert w_q.step.item() == pytest.approx(2 * net[1].weight.abs().mean().item() / math.sqrt(7))
    assert a_q.step.item() == pytest.approx(2 * X.abs().mean().item() / math.sqrt(7))
    # Weights lie on the learned 4-bit grid inside the forward pass.
    codes = qat.lsq_quantize(net[1].weight, w_q.step, 8, 7, 1) / w_q.step
    assert torch.allclose(codes, codes.round(), atol=1e-5) and codes.abs().max() <= 8
    assert out.shape == (32, 10)
    # The wrapped network is untouched: same keys, same float weights (the export).
    assert net.state_dict().keys() == before.keys()
    assert all(torch.equal(net.state_dict()[k], before[k]) for k in before)


def test_kurtosis_and_kure_penalty():
    gen = torch.Generator().manual_seed(0)
    assert qat.kurtosis(torch.rand(200_000, generator=gen)).item() == pytest.approx(1.8, abs=0.02)
    assert qat.kurtosis(torch.randn(200_000, generator=gen)).item() == pytest.approx(3.0, abs=0.05)
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    expected = sum((qat.kurtosis(m.weight) - 1.8) ** 2 for m in (net[0], net[2])) / 2
    assert qat.kure_penalty(net).item() == pytest.approx(expected.item())


@pytest.fixture(scope="module")
def digits_split(one_thread):
    X, y = data.load("digits", "train")
    return data.train_val_split(X, y, 0.2, seed=0)


def test_qat_and_kure_train_through_the_one_loop(digits_split, monkeypatch):
    train, val = digits_split
    calls = []
    real = models.train_epoch

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(models, "train_epoch", counting)
    net = models.mlp([1, 8, 8], [32, 32], 10, seed=0)
    # Start from a heavy-tailed (Laplace) weight distribution so KURE has work to do.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for m in net:
            if isinstance(m, nn.Linear):
                u = torch.rand(m.weight.shape, generator=gen) - 0.5
                m.weight.copy_(-0.1 * u.sign() * torch.log1p(-2 * u.abs()))
    plain = models.mlp([1, 8, 8], [32, 32], 10, seed=0)
    plain.load_state_dict(net.state_dict())
    log = qat.train(
        net, train, bits=4, kure=1.0, epochs=6, lr=1e-2, batch_size=64, val=val, progress=False
    )
    assert len(calls) == 6 and len(log.val_accuracy) == 6
    assert log.best_epoch == max(range(6), key=lambda e: (log.val_accuracy[e], -e))
    assert log.kure[-1] < 0.5 * log.kure[0]
    assert log.val_accuracy[log.best_epoch] > 0.8  # the 4-bit fake-quantised network learns
    qat.train(plain, train, bits=4, epochs=6, lr=1e-2, batch_size=64, progress=False)
    assert qat.kure_penalty(net).item() < qat.kure_penalty(plain).item()
    assert type(net) is nn.Sequential and not any("step" in k for k in net.state_dict())


def test_zoo_qat_is_cached_and_keyed_by_method():
    a = zoo.qat("digits-mlp", 8, epochs=1, train_limit=200, progress=False)
    b = zoo.qat("digits-mlp", 8, epochs=1, train_limit=200, progress=False)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    assert a.arch == zoo.recipe("digits-mlp").arch and "val_accuracy_curve" in b.meta
    c = zoo.qat("digits-mlp", 8, kure=1.0, epochs=1, train_limit=200, progress=False)
    assert c.meta["key"] != a.meta["key"] and "kure" in c.meta["name"]


def test_published_architectures_and_missing_cifar10(monkeypatch, tmp_path):
    assert zoo.recipe("fashion-mlp").arch["hidden"] == [256, 128, 64, 32, 16]
    assert zoo.recipe("mnist-mlp-4x256").arch["hidden"] == [256, 256, 256]
    assert zoo.CIFAR10_MLP.arch["in_shape"] == [3, 32, 32]
    assert zoo.CIFAR10_MLP.arch["hidden"] == [256, 128, 64, 32, 16]
    # Registered only when the data are there, so chapters that train every model still build.
    assert ("cifar10-mlp" in zoo.names()) == data.available("cifar10")
    monkeypatch.setenv("QLIB_DATA_DIR", str(tmp_path))
    assert not data.available("cifar10")
    with pytest.raises(Exception, match="CIFAR-10|cifar"):
        data.load("cifar10", "test")


def test_bad_arguments_are_refused(digits_split):
    train, _ = digits_split
    net = models.mlp([1, 8, 8], [8], 10)
    for bits in (1, 17, 2.5):
        with pytest.raises(ValueError, match=r"bits must be an integer in \[2, 16\]"):
            qat.QATNet(net, bits)
    with pytest.raises(ValueError, match="act_bits"):
        qat.QATNet(net, 8, act_bits=0)
    with pytest.raises(ValueError, match="kure"):
        qat.train(net, train, kure=-1.0, progress=False)
    with pytest.raises(ValueError, match="epochs"):
        qat.train(net, train, epochs=0, progress=False)
    with pytest.raises(TypeError, match="nn.Sequential"):
        qat.QATNet(nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"layer 1 \(Tanh\)"):
        qat.QATNet(nn.Sequential(nn.Linear(3, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="no Linear"):
        qat.kure_penalty(nn.Sequential(nn.ReLU()))
