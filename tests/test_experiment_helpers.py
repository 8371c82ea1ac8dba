import pytest
import torch

from qlib import bounds, data, gpfq, models, ptq
from qlib.quant import Perturbation, perturbation_between


def test_calibration_indices_are_distinct_seeded_and_checked():
    a = ptq.calibration_indices(100, 30, seed=3)
    assert len(set(a.tolist())) == 30 and a.max() < 100
    assert torch.equal(a, ptq.calibration_indices(100, 30, seed=3))
    assert not torch.equal(a, ptq.calibration_indices(100, 30, seed=4))
    with pytest.raises(ValueError, match=r"calibration size must be in \[1, 10\]"):
        ptq.calibration_indices(10, 11)


def test_single_layer_gpfq_error_decays_with_fan_in_while_rtn_does_not():
    g = torch.Generator().manual_seed(0)
    errs = {}
    for n0 in (32, 1024):
        X = torch.randn(128, n0, generator=g)
        W = torch.randn(16, n0, generator=g) / n0**0.5
        errs[n0] = ptq.single_layer_errors(W, X, 3)
    assert errs[1024]["GPFQ"] < 0.5 * errs[32]["GPFQ"]
    assert errs[1024]["RTN"] > 0.5 * errs[32]["RTN"]
    with pytest.raises(ValueError, match="X must be"):
        ptq.single_layer_errors(torch.zeros(4, 8), torch.zeros(5, 7), 3)


def test_perturbation_between_contains_the_quantised_network():
    X, y = data.load("digits", "train", limit=400)
    net = models.mlp([1, 8, 8], [16], 10)
    models.train(net, (X, y), epochs=3, progress=False)
    q = gpfq.quantize(net, X[:128], 3)
    box = perturbation_between(net, q.model)
    assert box.eps_input == 0 and box.eps_act == 0 and box.eps_weight > 0
    lower, upper = bounds.logit_bounds(net, X[:50], box, "crown")
    out = models.predict(q.model, X[:50]).double()
    assert (lower <= out + 1e-6).all() and (out <= upper + 1e-6).all()
    with pytest.raises(ValueError, match="do not match"):
        perturbation_between(net, models.mlp([1, 8, 8], [17], 10))
    assert perturbation_between(net, net) == Perturbation()
