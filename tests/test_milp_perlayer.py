"""The MILP under per-layer boxes with clips (``qlib.quant.LayerPerturbation``): exact, sandwiched
between the attack and the linear bounds, witnesses replayed through the clipped forward pass, and
a uniform box building the uniform program. Budget: a few seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qlib import attack, bounds, milp
from qlib.milp import formulation
from qlib.quant import LayerPerturbation, Perturbation

TOL = 1e-6


def mlp(sizes: list[int], seed: int) -> nn.Sequential:
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = [nn.Flatten()]
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=gen) / a**0.5)
            lin.bias.copy_(0.1 * torch.randn(b, generator=gen))
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def clipped_box(net: nn.Sequential, X: torch.Tensor) -> LayerPerturbation:
    """Radii that differ per layer, and clips at 60 % of each hidden layer's largest nominal
    activation (so they bind on some neurons) and at 0.8 for the input."""
    clips, h = [], X.flatten(1).clamp(max=0.8).detach()
    for m in net[1:]:
        with torch.no_grad():
            h = m(h)
        if isinstance(m, nn.ReLU):
            clips.append(0.6 * float(h.max()))
            h = h.clamp(max=clips[-1])
    return LayerPerturbation(
        eps_input=0.03,
        eps_weight=(0.02, 0.04, 0.01),
        eps_bias=(0.01, 0.0, 0.02),
        eps_act=(0.02, 0.01),
        input_clip=0.8,
        act_clip=tuple(clips),
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clipped_box_sandwich_and_witnesses(seed):
    """attack <= replayed witness <= MILP <= CROWN, per logit and side, with the clips binding."""
    net = mlp([6, 8, 6, 3], seed)
    X = torch.rand(2, 1, 6, generator=torch.Generator().manual_seed(seed))
    box = clipped_box(net, X)
    res = milp.logit_bounds(net, X, box)
    assert res.kind == "exact" and bool(res.optimal.all())
    assert (res.attained_upper <= res.upper + TOL).all()
    assert (res.lower <= res.attained_lower + TOL).all()
    assert (res.upper - res.attained_upper).abs().max() < 1e-5  # exact: a network attains it
    lo_c, hi_c = bounds.logit_bounds(net, X, box, "crown")
    assert (res.upper <= hi_c + TOL).all() and (res.lower >= lo_c - TOL).all()
    lo_a, hi_a = attack.attack_logits(net, X, box, steps=30, restarts=2, seed=seed)
    assert (hi_a <= res.attained_upper + TOL).all() and (lo_a >= res.attained_lower - TOL).all()
    # Random members of the box, through the ordinary (clipped) forward pass, stay inside.
    gen = torch.Generator().manual_seed(seed)
    n = 256
    Xs = X.repeat(n, 1, 1)
    lin = [m for m in net if isinstance(m, nn.Linear)]

    def uniform(shape, eps):
        return (2 * torch.rand(shape, generator=gen, dtype=torch.float64) - 1) * eps

    z = attack.perturbed_forward(
        net,
        Xs,
        box,
        dW=[
            uniform((len(Xs), *m.weight.shape), e) for m, e in zip(lin, box.eps_weight, strict=True)
        ],
        db=[uniform((len(Xs), m.out_features), e) for m, e in zip(lin, box.eps_bias, strict=True)],
        dA=[
            uniform((len(Xs), m.out_features), e)
            for m, e in zip(lin[:-1], box.eps_act, strict=True)
        ],
        dX=uniform(Xs.shape, box.eps_input),
    ).reshape(n, len(X), -1)
    assert (z >= res.lower - TOL).all() and (z <= res.upper + TOL).all()
    straddled = [(r.clip_binary >= 0).any() for x in X for r in milp.build(net, x, box).relus]
    assert any(straddled), "no clip was straddled: the test would not exercise the clip"


def test_uniform_layer_box_builds_the_uniform_program():
    net = mlp([6, 8, 6, 3], 4)
    x = torch.rand(1, 6, generator=torch.Generator().manual_seed(4))
    pert = Perturbation.uniform(0.03)
    a = milp.build(net, x, pert)
    b = milp.build(net, x, LayerPerturbation.uniform(pert, 3))
    assert (a.A != b.A).nnz == 0 and a.A.shape == b.A.shape
    for name in ("row_lo", "row_hi", "col_lo", "col_hi", "integer"):
        assert np.array_equal(getattr(a, name), getattr(b, name)), name


def test_clipped_verification_and_refusals():
    net = mlp([6, 8, 6, 3], 5)
    X = torch.rand(3, 1, 6, generator=torch.Generator().manual_seed(5))
    box = clipped_box(net, X)
    with torch.no_grad():
        y = attack.perturbed_forward(net, X, box).argmax(1)  # the box's own nominal network
    ver = milp.verify(net, X, y, box, time_limit=30)
    low = bounds.margin_bounds(net, X, y, box, "crown")
    falsified = attack.attack_margin(net, X, y, box, steps=20, seed=5)
    for img, lo, fals in zip(ver.images, low, falsified, strict=True):
        assert img.status in ("verified", "falsified")
        if (lo > 0).all():
            assert img.status == "verified"
        if fals:
            assert img.status == "falsified"
    program = milp.build(net, X[0], box)
    with pytest.raises(TypeError, match="needs formulation='milp'"):
        milp.solver_for(net, program, "scip", "bilinear")
    with pytest.raises(ValueError, match="eps_act has 1 entries"):
        formulation.build(
            net, X[0], LayerPerturbation(0.0, (0.01,) * 3, (0.0,) * 3, (0.01,), None, None)
        )
