"""Exact MILP bounds: exactness against the bilinear formulation, the sandwich attack <= MILP <=
CROWN <= IBP, witnesses, backends, error messages, and per-layer boxes with clips
(``LayerPerturbation``). Budget: about 30 s on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from qlib import attack, bounds, milp
from qlib.milp import backends, formulation, witness
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


def inputs(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, d, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sandwich_attack_milp_crown_ibp(seed):
    net, X = mlp([6, 8, 6, 3], seed), inputs(2, 6, seed)
    pert = Perturbation.uniform(0.04)
    res = milp.logit_bounds(net, X, pert)
    assert res.kind == "exact" and bool(res.optimal.all())
    lo_c, hi_c = bounds.logit_bounds(net, X, pert, "crown")
    lo_i, hi_i = bounds.logit_bounds(net, X, pert, "ibp")
    lo_a, hi_a = attack.attack_logits(net, X, pert, steps=30, restarts=2, seed=seed)
    # attack <= attained (witness) <= proven MILP bound <= CROWN <= IBP, per logit and side
    assert (hi_a <= res.attained_upper + TOL).all() and (lo_a >= res.attained_lower - TOL).all()
    assert (res.attained_upper <= res.upper + 1e-6).all()
    assert (res.lower <= res.attained_lower + 1e-6).all()
    assert (res.upper <= hi_c + TOL).all() and (res.lower >= lo_c - TOL).all()
    assert (hi_c <= hi_i + TOL).all() and (lo_c >= lo_i - TOL).all()
    lo, hi = res  # unpacks like bounds.logit_bounds
    assert torch.equal(lo, res.lower) and torch.equal(hi, res.upper)


def test_box_is_exact_for_one_layer():
    """One affine layer, no ReLU: the reachable logit range is the box, computed in closed form."""
    net = mlp([5, 4], 3)
    x = inputs(1, 5, 3)
    pert = Perturbation(0.0, 0.02, 0.01, 0.0)
    _, solves = milp.image_logits(net, x[0], pert)
    W, b = net[1].weight.double(), net[1].bias.double()
    h = x[0, 0].double()
    centre, radius = W @ h + b, pert.eps_weight * h.sum() + pert.eps_bias
    got_min = torch.tensor([s.bound for s in solves if s.sense == "min"], dtype=torch.float64)
    got_max = torch.tensor([s.bound for s in solves if s.sense == "max"], dtype=torch.float64)
    assert torch.allclose(got_min, centre - radius, atol=1e-7)
    assert torch.allclose(got_max, centre + radius, atol=1e-7)


@pytest.mark.scip
@pytest.mark.parametrize("seed", [0, 1])
def test_milp_equals_bilinear_scip(seed):
    pytest.importorskip("pyscipopt")
    net, X = mlp([4, 5, 4, 3], seed), inputs(1, 4, seed + 10)
    pert = Perturbation.uniform(0.05)
    a = milp.logit_bounds(net, X, pert)
    b = milp.logit_bounds(net, X, pert, formulation="bilinear", solver="scip", time_limit=20)
    assert bool(b.optimal.all())
    assert torch.allclose(a.lower, b.lower, atol=1e-5, rtol=1e-5)
    assert torch.allclose(a.upper, b.upper, atol=1e-5, rtol=1e-5)


def _gurobi_or_skip():
    try:
        import gurobipy as gp

        m = gp.Model(env=gp.Env(params={"OutputFlag": 0}))
        m.addVar()
        m.optimize()
    except Exception as e:  # no package, no licence: skip with the reason
        pytest.skip(f"gurobipy unusable here: {e}")


@pytest.mark.gurobi
def test_highs_and_gurobi_agree():
    _gurobi_or_skip()
    net, X = mlp([6, 8, 6, 3], 5), inputs(2, 6, 5)
    pert = Perturbation.uniform(0.04)
    a = milp.logit_bounds(net, X, pert)
    g = milp.logit_bounds(net, X, pert, solver="gurobi")
    assert torch.allclose(a.lower, g.lower, atol=1e-6) and torch.allclose(
        a.upper, g.upper, atol=1e-6
    )
    gb = milp.logit_bounds(net, X[:1], pert, solver="gurobi", formulation="bilinear")
    assert torch.allclose(a.upper[:1], gb.upper, atol=1e-5)


@pytest.mark.gurobi
def test_gurobi_licence_too_small_names_highs():
    _gurobi_or_skip()
    net, X = mlp([2100, 4, 3], 0), inputs(1, 2100, 0)
    program = milp.build(net, X[0], Perturbation.uniform(0.01))
    if program.n_vars <= 2000:
        pytest.skip("program fits the licence")
    b = milp.make_backend("gurobi", program)
    try:
        b.minimize(program.objective({int(program.logits[0]): 1.0}))
    except milp.LicenceTooSmall as e:
        assert "HiGHS" in str(e) and "2,000" in str(e)
    else:
        pytest.skip("this Gurobi licence is not size-limited")


def test_witness_replays_and_stays_in_box():
    net, X = mlp([6, 8, 6, 3], 7), inputs(1, 6, 7)
    pert = Perturbation.uniform(0.05)
    _, solves = milp.image_logits(net, X[0], pert, classes=[1], keep_witnesses=True)
    for s in solves:
        w = s.witness
        assert w is not None and abs(float(w.logits[1]) - s.primal) <= witness.TOLERANCE
        assert float(w.dX.abs().max()) <= pert.eps_input
        assert all(d is None or float(d.abs().max()) <= pert.eps_act for d in w.dA)
        # the witness is an ordinary network: a full weight delta gives the same logits
        dW = [
            d.t[0, :, None].expand(-1, lin.in_features) * d.eps
            for d, lin in zip(w.dW, [net[1], net[3], net[5]], strict=True)
        ]
        z = attack.perturbed_forward(
            net, X, pert, dW=dW, db=[d[0] for d in w.db], dA=[d[0] for d in w.dA], dX=w.dX[None]
        )
        assert abs(float(z[0, 1]) - s.primal) <= 1e-6


def test_witness_mismatch_is_rejected():
    net, X = mlp([6, 8, 3], 8), inputs(1, 6, 8)
    pert = Perturbation.uniform(0.05)
    program = milp.build(net, X[0], pert)
    out = milp.make_backend("highs", program).minimize(
        program.objective({int(program.logits[0]): 1.0})
    )
    c = np.zeros(3)
    c[0] = 1.0
    with pytest.raises(milp.WitnessMismatch, match="rejected"):
        witness.replay(net, program, out.values, c, out.primal + 1e-3, "min logit 0")


def test_stable_neurons_get_no_binary():
    net, X = mlp([6, 8, 6, 3], 9), inputs(1, 6, 9)
    program = milp.build(net, X[0], Perturbation.uniform(1e-4))
    for r in program.relus:
        assert ((r.binary >= 0) == (r.phase == 0)).all()
    assert program.n_binary == sum(int((r.phase == 0).sum()) for r in program.relus)
    assert program.n_binary < 14  # tiny eps: most neurons are stable


def test_margin_verification_statuses():
    net, X = mlp([6, 8, 6, 3], 11), inputs(4, 6, 11)
    with torch.no_grad():
        y = attack.perturbed_forward(net, X, Perturbation()).argmax(1)
    small = milp.verify(net, X, y, Perturbation.uniform(1e-4))
    assert small.status == ["verified"] * 4 or small.accuracy >= 0.5
    big = milp.verify(net, X, y, Perturbation.uniform(0.3), time_limit=20, attack_steps=0)
    quick = milp.verify(net, X, y, Perturbation.uniform(0.3), time_limit=20)  # attack first
    assert quick.status == big.status
    for im, t in zip(big.images, y, strict=True):
        assert im.status in ("verified", "falsified")
        # a decision is backed by a replayed witness or by positive proven margins
        if im.status == "falsified":
            assert any(s.status == "falsified" and s.primal <= 0 for s in im.solves) or (
                im.decided_by == "nominal"
            )
        else:
            assert (np.delete(im.margin_bound, int(t)) > 0).all()
    wrong = milp.verify(net, X[:1], (y[:1] + 1) % 3, Perturbation.uniform(1e-4))
    assert wrong.status == ["falsified"] and wrong.images[0].decided_by == "nominal"


def test_time_limit_gives_unknown_with_sound_bound():
    net, X = mlp([6, 16, 16, 3], 12), inputs(1, 6, 12)
    pert = Perturbation.uniform(0.2)
    program = milp.build(net, X[0], pert)
    b = milp.make_backend("highs", program)
    c = program.objective({int(program.logits[0]): -1.0})
    out = b.minimize(c, time_limit=1e-3)
    assert out.status in ("time_limit", "optimal")
    exact = b.minimize(c)
    assert out.bound <= exact.bound + 1e-9  # the dual bound after a time-out is still sound
    _, solves = milp.image_logits(net, X[0], pert, classes=[0], time_limit=1e-3)
    assert all(s.status in ("unknown", "optimal") for s in solves)


def test_conv_is_labelled_a_sound_bound():
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 2 * 2, 3)
    )
    X = torch.rand(1, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    pert = Perturbation.uniform(0.02)
    res = milp.logit_bounds(net, X, pert)
    assert res.kind == "sound bound (Conv2d relaxation)" and "exact" not in res.kind.replace(
        "inexact", ""
    )
    lo_c, hi_c = bounds.logit_bounds(net, X, pert, "crown")
    lo_a, hi_a = attack.attack_logits(net, X, pert, steps=20, seed=0)
    assert (res.upper <= hi_c + TOL).all() and (res.upper >= hi_a - TOL).all()
    assert (res.lower >= lo_c - TOL).all() and (res.lower <= lo_a + TOL).all()
    assert torch.isnan(res.attained_upper).all()  # relaxation points are no networks
    y = attack.perturbed_forward(net, X, Perturbation()).argmax(1)
    ver = milp.verify(net, X, y, Perturbation.uniform(0.3), time_limit=10)
    assert ver.kind != "exact" and all(
        s.status != "falsified" for im in ver.images for s in im.solves
    )
    with pytest.raises(ValueError, match="exact programs"):
        witness.rebuild(net, milp.build(net, X[0], pert), np.zeros(10))


def test_bad_input_messages():
    net, X = mlp([6, 8, 3], 0), inputs(1, 6, 0)
    pert = Perturbation.uniform(0.01)
    with pytest.raises(ValueError, match="solver must be one of"):
        milp.make_backend("cplex", milp.build(net, X[0], pert))
    with pytest.raises(ValueError, match="formulation must be one of"):
        milp.image_logits(net, X[0], pert, formulation="quadratic")
    with pytest.raises(ValueError, match="time_limit"):
        milp.image_logits(net, X[0], pert, time_limit=0)
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        milp.build(net, X[0] + 2, pert)
    odd = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="layer 2 \\(Tanh\\)"):
        milp.build(odd, X[0], pert)
    with pytest.raises(ValueError, match="bilinear formulation runs on"):
        milp.image_logits(net, X[0], pert, formulation="bilinear", solver="highs")


def test_infeasible_program_is_called_a_bug():
    net, X = mlp([6, 8, 3], 0), inputs(1, 6, 0)
    program = milp.build(net, X[0], Perturbation.uniform(0.01))
    # Corrupt the bounds the way a wrong pre-activation box would: no point fits any more.
    hi = program.col_hi.copy()
    hi[program.logits[0]] = program.col_lo[program.logits[0]] - 1.0
    broken = formulation.Program(**{**program.__dict__, "col_hi": hi})
    with pytest.raises(backends.InfeasibleModel, match="bug"):
        milp.make_backend("highs", broken).minimize(broken.objective({}))


def test_missing_solver_is_named(monkeypatch):
    import sys

    net, X = mlp([6, 8, 3], 0), inputs(1, 6, 0)
    program = milp.build(net, X[0], Perturbation.uniform(0.01))
    monkeypatch.setitem(sys.modules, "gurobipy", None)  # what an absent package looks like
    with pytest.raises(milp.SolverUnavailable, match="pip install gurobipy"):
        milp.make_backend("gurobi", program)
    monkeypatch.setitem(sys.modules, "pyscipopt", None)
    with pytest.raises(milp.SolverUnavailable, match="pyscipopt"):
        milp.image_logits(
            net, X[0], Perturbation.uniform(0.01), formulation="bilinear", solver="scip"
        )


@pytest.mark.slow
def test_digits_network_sandwich_and_witnesses():
    from qlib import data, zoo

    net = zoo.get("digits-mlp", progress=False)
    X, _ = data.load("digits", "test", limit=1)
    pert = Perturbation.for_bits(8)
    res = milp.logit_bounds(net, X, pert, time_limit=20)
    lo_c, hi_c = bounds.logit_bounds(net, X, pert, "crown")
    lo_a, hi_a = attack.attack_logits(net, X, pert, steps=20, seed=0)
    assert res.kind == "exact"
    assert (hi_a <= res.attained_upper + TOL).all() and (res.upper <= hi_c + TOL).all()
    assert (lo_a >= res.attained_lower - TOL).all() and (res.lower >= lo_c - TOL).all()


def test_attack_margin_never_contradicts_verification():
    net, X = mlp([6, 8, 6, 3], 13), inputs(6, 6, 13)
    with torch.no_grad():
        y = attack.perturbed_forward(net, X, Perturbation()).argmax(1)
    pert = Perturbation.uniform(0.15)
    found = milp.attack_margin(net, X, y, pert, steps=10, seed=0)
    res = milp.verify(net, X, y, pert, time_limit=20)
    assert not (found & res.verified).any()  # an attacked image can never be verified
    assert (found <= res.falsified | res.unknown).all()


@pytest.mark.slow
@pytest.mark.scip
def test_digits_network_milp_equals_bilinear():
    pytest.importorskip("pyscipopt")
    from qlib import data, zoo

    net = zoo.get("digits-mlp", progress=False)
    X, _ = data.load("digits", "test", limit=1)
    pert = Perturbation.uniform(1e-4)  # small enough for SCIP's spatial search to close in ~5 s
    _, a = milp.image_logits(net, X[0], pert, classes=[0])
    _, b = milp.image_logits(
        net, X[0], pert, classes=[0], formulation="bilinear", solver="scip", time_limit=60
    )
    assert all(s.status == "optimal" for s in b)
    for u, v in zip(a, b, strict=True):
        assert abs(u.bound - v.bound) <= 1e-5 * (1 + abs(u.bound))


# ------------------------------------------------- per-layer boxes with clips (LayerPerturbation)


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
