"""Concrete perturbed networks of ``qlib.attack``."""

from __future__ import annotations

import copy

import pytest
import torch

from qlib import attack, bounds, models
from qlib.quant import Perturbation, UniformQuantizer, symmetric_quantizer


@pytest.fixture
def net() -> torch.nn.Sequential:
    return models.cnn([1, 5, 5], 3, channels=(2, 3), hidden=4, seed=1)


def test_zero_deltas_give_the_float_network(net):
    X = torch.rand(4, 1, 5, 5)
    z = attack.perturbed_forward(net, X, Perturbation.uniform(0.1))
    assert torch.allclose(z, net(X).double(), atol=1e-6)


def test_deltas_outside_their_box_are_rejected(net):
    X = torch.rand(2, 1, 5, 5)
    pert = Perturbation.uniform(0.01)
    W = net[0].weight
    with pytest.raises(ValueError, match=r"dW\[0\] leaves its box"):
        attack.perturbed_forward(net, X, pert, dW=[torch.full(W.shape, 0.02), None, None, None])
    with pytest.raises(ValueError, match="dX"):
        attack.perturbed_forward(net, X, pert, dX=torch.full(X.shape, -0.5))
    with pytest.raises(ValueError, match="dA"):
        attack.perturbed_forward(net, X, pert, dA=[None, torch.full((3, 2, 2), 0.02), None])
    with pytest.raises(ValueError, match="expected 4 entries"):
        attack.perturbed_forward(net, X, pert, dW=[None])


def test_inputs_and_activations_are_clamped(net):
    X = torch.zeros(2, 1, 5, 5)
    pert = Perturbation(0.1, 0.0, 0.0, 0.1)
    # Zero inputs moved down are clamped back to 0: the same network as without the delta.
    z = attack.perturbed_forward(net, X, pert, dX=-0.1 * torch.ones_like(X))
    assert torch.equal(z, attack.perturbed_forward(net, X, pert))
    dead = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    with torch.no_grad():
        dead[0].bias.fill_(-10.0)  # every hidden activation is 0
    x = torch.rand(4, 2)
    z = attack.perturbed_forward(dead, x, pert, dA=[torch.full((4, 3), -0.1)])
    assert torch.equal(z, attack.perturbed_forward(dead, x, pert))


def test_per_sample_and_shared_deltas_agree(net):
    X = torch.rand(3, 1, 5, 5)
    pert = Perturbation.uniform(0.05)
    gen = torch.Generator().manual_seed(0)
    p = attack.random_vertex(net, X[:1], pert, gen)
    shared = attack.perturbed_forward(
        net, X, pert, dW=[d[0] for d in p.dW], db=[d[0] for d in p.db]
    )
    per_sample = attack.perturbed_forward(
        net,
        X,
        pert,
        dW=[d.expand(3, *d.shape[1:]) for d in p.dW],
        db=[d.expand(3, *d.shape[1:]) for d in p.db],
    )
    assert torch.allclose(shared, per_sample, atol=1e-12)


def test_attack_brackets_the_float_logits_and_respects_bounds(net):
    X = torch.rand(5, 1, 5, 5)
    pert = Perturbation.for_bits(6)
    lo, hi = attack.attack_logits(net, X, pert, steps=5, bits=(6, 8), seed=1)
    f = net(X).double()
    assert (lo <= f + 1e-9).all() and (f <= hi + 1e-9).all()
    assert (hi - lo).mean() > 0
    lower, upper = bounds.logit_bounds(net, X, pert, "crown")
    assert (lower <= lo + 1e-9).all() and (hi <= upper + 1e-9).all()


def test_zero_perturbation_attack_is_the_float_network(net):
    X = torch.rand(3, 1, 5, 5)
    lo, hi = attack.attack_logits(net, X, Perturbation(), steps=2)
    assert torch.allclose(lo, hi) and torch.allclose(lo, net(X).double(), atol=1e-6)


def test_rtn_deltas_only_where_they_fit(net):
    """Each kind is kept only if its real rounding error fits its box, and the kept deltas are
    exactly that error: the network they describe is the RTN-quantised one."""
    X = torch.rand(3, 1, 5, 5, generator=torch.Generator().manual_seed(4))
    tiny = attack.rtn_deltas(net, X, Perturbation.uniform(1e-9), 4)
    assert all(d is None for d in tiny.dW + tiny.db) and tiny.dX is None
    fit = attack.rtn_deltas(net, X, Perturbation.from_model(net, 4, X), 4)
    affine = [m for m in net if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    quantised = copy.deepcopy(net).double()
    for k, (module, dW, db) in enumerate(zip(affine, fit.dW, fit.db, strict=True)):
        W = module.weight.detach().double()
        assert torch.equal(dW, symmetric_quantizer(W, 4).fake_quant(W) - W), f"dW[{k}]"
        b = module.bias.detach().double()
        assert torch.equal(db, symmetric_quantizer(b, 4).fake_quant(b) - b), f"db[{k}]"
    x = X.double()
    assert torch.equal(fit.dX, UniformQuantizer(4, 1 / 15, signed=False).fake_quant(x) - x)
    q_affine = [m for m in quantised if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    with torch.no_grad():
        for m, dW, db in zip(q_affine, fit.dW, fit.db, strict=True):
            m.weight += dW
            m.bias += db
    z = attack.perturbed_forward(net, X, Perturbation.from_model(net, 4, X), **vars(fit))
    torch.testing.assert_close(z, quantised(x + fit.dX), rtol=0, atol=1e-12)


def test_attacked_discrepancy_is_below_the_certified_one(net):
    X = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    y = torch.arange(6) % 3
    pert = Perturbation.uniform(1 / 32)
    found = attack.attack_discrepancy(net, X, y, pert, steps=5, bits=(8,))
    for method in ("ibp", "crown"):
        bound = bounds.worst_case_discrepancy(net, X, y, pert, method)
        assert (found.d <= bound.d + 1e-9).all()
        assert (found.logit_gap <= bound.logit_gap + 1e-9).all()
    assert found.worst > 0 and found.worst == pytest.approx(found.d.max().item())


def test_bound_coefficients_follow_the_layers(net):
    X = torch.rand(3, 1, 5, 5)
    pert = Perturbation.uniform(0.01)
    rows = torch.eye(3, dtype=torch.float64)[[0, 2]]
    coeff = bounds.bound_coefficients(net, X, pert, rows, "crown-ibp")
    layers = bounds.layers(net, X.shape[1:])
    assert [tuple(c.shape) for c in coeff] == [
        (3, 2, *shape) for shape in [layer.in_shape for layer in layers] + [(3,)]
    ]
    assert torch.equal(coeff[-1], rows.expand(3, 2, 3))
    with pytest.raises(ValueError, match="linear method"):
        bounds.bound_coefficients(net, X, pert, rows, "ibp")
    with pytest.raises(ValueError, match=r"rows must be a tensor \[S, 3\]"):
        bounds.bound_coefficients(net, X, pert, torch.ones(2, 4), "crown")


@pytest.mark.parametrize("method", ["crown-ibp", "crown"])
def test_guided_attack_adds_networks_inside_the_bounds(net, method):
    """The vertices a relaxation names are real networks (in every box, inside the sound
    bounds), and the guided run only adds to what the plain attack visits."""
    X = torch.rand(5, 1, 5, 5, generator=torch.Generator().manual_seed(2))
    pert = Perturbation.for_bits(6)
    rows = torch.eye(3, dtype=torch.float64)
    lower, upper = bounds.logit_bounds(net, X, pert, "crown")
    for v in attack.guided_vertices(net, X, pert, rows, method):
        z = attack.perturbed_forward(net, X, pert, **vars(v))  # raises if a delta leaves its box
        assert (lower <= z + 1e-9).all() and (z <= upper + 1e-9).all()
        assert all(d is not None for d in v.dW + v.db + v.dA) and v.dX is not None
        assert z.shape == (5, 3)
    lo, hi = attack.attack_logits(net, X, pert, steps=4, seed=3)
    lo_g, hi_g = attack.attack_logits(net, X, pert, steps=4, seed=3, guided=method)
    assert (lo_g <= lo).all() and (hi_g >= hi).all() and (hi_g - lo_g).sum() > (hi - lo).sum()
    assert (lower <= lo_g + 1e-9).all() and (hi_g <= upper + 1e-9).all()
