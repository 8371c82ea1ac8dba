"""Soundness and tightness of ``qlib.bounds`` against concrete perturbed networks."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from qlib import attack, bounds, models
from qlib.quant import Perturbation, symmetric_quantizer

METHODS = ("ibp", "crown-ibp", "crown-fast", "crown")
TOL = 1e-9
EPS = (0.0, 1 / 1023, 1 / 64, 1 / 8)
KINDS = ("input", "weight", "bias", "act")


def small_net(kind: str, size: int, seed: int) -> nn.Sequential:
    if kind == "mlp":
        return models.mlp([1, size, size], [6, 5], 4, seed=seed)
    return models.cnn([1, size, size], 3, channels=(2, 3), hidden=5, seed=seed)


def pert_of(kind: str, eps: float) -> Perturbation:
    return Perturbation.uniform(eps) if kind == "all" else Perturbation.only(kind, eps)


def inside(lower: torch.Tensor, values: torch.Tensor, upper: torch.Tensor) -> bool:
    return bool((lower <= values + TOL).all() and (values <= upper + TOL).all())


# ----------------------------------------------------------------------------- soundness


@settings(max_examples=14, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["mlp", "cnn"]),
    size=st.integers(3, 7),
    seed=st.integers(0, 10_000),
    eps=st.sampled_from(EPS),
    kind=st.sampled_from(("all", *KINDS)),
)
def test_bounds_contain_attacked_networks(arch: str, size: int, seed: int, eps: float, kind: str):
    net = small_net(arch, size, seed)
    X = torch.rand(4, 1, size, size, generator=torch.Generator().manual_seed(seed))
    pert = pert_of(kind, eps)
    lo, hi = attack.attack_logits(net, X, pert, steps=4, vertices=4, bits=(4,), seed=seed)
    for method in METHODS:
        lower, upper = bounds.logit_bounds(net, X, pert, method)
        assert inside(lower, lo, upper) and inside(lower, hi, upper), method


def _vertex_logits(net: nn.Sequential, x: torch.Tensor, pert: Perturbation, gen) -> torch.Tensor:
    """Logits [M, classes] of every vertex of the weight/bias boxes of a 2-3-2 MLP for input x,
    each with a random input and activation perturbation (dense sampling of the rest)."""
    linear = [m for m in net if isinstance(m, nn.Linear)]
    shapes = [m.weight.shape for m in linear] + [m.bias.shape for m in linear]
    count = sum(s.numel() for s in shapes)
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=count)), dtype=torch.float64)
    m = len(signs)
    parts = list(torch.split(signs, [s.numel() for s in shapes], dim=1))
    dW = [p.reshape(m, *s) * pert.eps_weight for p, s in zip(parts[:2], shapes[:2], strict=True)]
    db = [p.reshape(m, *s) * pert.eps_bias for p, s in zip(parts[2:], shapes[2:], strict=True)]
    dA = [(2 * torch.rand(m, 3, generator=gen, dtype=torch.float64) - 1) * pert.eps_act]
    dX = (2 * torch.rand(m, 2, generator=gen, dtype=torch.float64) - 1) * pert.eps_input
    return attack.perturbed_forward(net, x.expand(m, 2), pert, dW=dW, db=db, dA=dA, dX=dX)


@pytest.mark.parametrize("seed, eps", [(0, 1 / 64), (1, 1 / 8), (2, 0.5)])
def test_brute_force_enumeration(seed: int, eps: float):
    """2 inputs, 3 hidden, 2 outputs: all 2^17 weight/bias vertices plus dense random samples."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2))
    gen = torch.Generator().manual_seed(seed)
    X = torch.rand(2, 2, generator=gen)
    pert = Perturbation(eps, eps, eps / 2, eps)
    y = torch.zeros(2, dtype=torch.long)
    results = {
        m: (
            *bounds.logit_bounds(net, X, pert, m),
            bounds.margin_bounds(net, X, y, pert, m),
            bounds.margin_interval(net, X, y, pert, m),
        )
        for m in METHODS
    }
    for i in range(len(X)):
        z = _vertex_logits(net, X[i], pert, gen)
        dense = attack.random_vertex(net, X[i : i + 1].expand(4096, 2), pert, gen)
        scale = torch.rand(4096, 1, generator=gen, dtype=torch.float64)
        z2 = attack.perturbed_forward(
            net,
            X[i : i + 1].expand(4096, 2),
            pert,
            dW=[d * scale[:, :, None] for d in dense.dW],
            db=[d * scale for d in dense.db],
            dA=[d * scale for d in dense.dA],
            dX=dense.dX * scale,
        )
        z = torch.cat([z, z2])
        for method, (lower, upper, margin, both) in results.items():
            assert inside(lower[i], z, upper[i]), method
            assert (z[:, 0] - z[:, 1] >= margin[i, 1] - TOL).all(), method
            assert inside(both.lower[i, 1], z[:, 0] - z[:, 1], both.upper[i, 1]), method


def test_single_layer_linear_bounds_are_exact():
    """For one affine layer over a non-negative input box the linear bound is attained."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(9, 4))
    X = torch.rand(5, 1, 3, 3)
    pert = Perturbation(0.05, 0.02, 0.01, 0.0)
    lower, upper = bounds.logit_bounds(net, X, pert, "crown")
    box = bounds.input_box(X.flatten(1), pert)
    W = net[1].weight.detach().double()
    for j in range(4):
        for sign, bound in ((-1.0, lower), (1.0, upper)):
            # The optimum: every weight and the bias pushed by sign * eps, each input at the end
            # where the perturbed weight, times sign, is largest.
            w = W[j] + sign * pert.eps_weight
            x_hat = torch.where(sign * w >= 0, box.upper, box.lower)
            dW = torch.zeros(len(X), 4, 9, dtype=torch.float64)
            dW[:, j] = sign * pert.eps_weight
            db = torch.zeros(len(X), 4, dtype=torch.float64)
            db[:, j] = sign * pert.eps_bias
            z = attack.perturbed_forward(
                net,
                X,
                pert,
                dW=[dW],
                db=[db],
                dX=torch.where(x_hat > X.flatten(1), pert.eps_input, -pert.eps_input).reshape(
                    X.shape
                ),
            )
            assert torch.allclose(z[:, j], bound[:, j], atol=1e-12)


def _published_ibp_linear(layer: nn.Linear, lo: torch.Tensor, hi: torch.Tensor, pert):
    """The rule of the published code: eps_w ||c||_1 added to the centre (unsound)."""
    W, b = layer.weight.double(), layer.bias.double()
    c, r = (hi + lo) / 2, (hi - lo) / 2
    out_c = c @ W.T + b + pert.eps_weight * c.abs().sum(1, keepdim=True)
    out_r = r @ W.abs().T + pert.eps_weight * r.abs().sum(1, keepdim=True) + pert.eps_bias
    return out_c - out_r, out_c + out_r


def test_published_centre_rule_is_violated_ours_holds():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 3))
    X = torch.rand(2, 16)
    pert = Perturbation(1 / 256, 1 / 128, 1 / 128, 0.0)
    box = bounds.input_box(X, pert)
    pub_lower, _ = _published_ibp_linear(net[0], box.lower, box.upper, pert)
    # Witness: every weight and bias lowered by its eps, inputs unchanged.
    W = net[0].weight
    dW = [torch.full(W.shape, -pert.eps_weight, dtype=torch.float64)]
    db = [torch.full((3,), -pert.eps_bias, dtype=torch.float64)]
    z = attack.perturbed_forward(net, X, pert, dW=dW, db=db)
    assert (z < pub_lower - 1e-3).all(), "the published lower bound should be violated"
    for method in METHODS:
        lower, upper = bounds.logit_bounds(net, X, pert, method)
        assert inside(lower, z, upper)


# ----------------------------------------------------------------------------- tightness


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_crown_tighter_than_ibp(arch: str):
    ratios = []
    for seed in range(4):
        net = small_net(arch, 8, seed)
        X = torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        pert = Perturbation.uniform(1 / 64)
        widths = {}
        for method in METHODS:
            lower, upper = bounds.logit_bounds(net, X, pert, method)
            widths[method] = (upper - lower).mean().item()
        assert widths["crown-ibp"] <= widths["ibp"] + TOL
        # Tighter pre-activation intervals need not give tighter logits: CROWN's adaptive lower
        # slope (0 or 1) can flip. On these nets crown stays within 1 % of crown-ibp or below.
        assert widths["crown"] <= widths["crown-ibp"] * 1.01
        ratios.append(widths["ibp"] / widths["crown"])
    assert sum(ratios) / len(ratios) > 1.1


def test_intermediate_stop_between_crown_ibp_and_crown():
    net = models.mlp([1, 4, 4], [8, 8, 8], 3, seed=5)
    X = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    pert = Perturbation.uniform(1 / 32)
    w = {}
    for name, kw in {
        "crown": {"method": "crown"},
        "stop1": {"method": "crown", "options": bounds.CrownOptions(intermediate_stop=1)},
        "crown-ibp": {"method": "crown-ibp"},
    }.items():
        lower, upper = bounds.logit_bounds(net, X, pert, **kw)
        w[name] = (upper - lower).mean().item()
    assert w["crown"] - TOL <= w["stop1"] <= w["crown-ibp"] + TOL
    assert w["crown"] < w["crown-ibp"] - TOL, "the example should separate the two ends"
    with pytest.raises(ValueError, match="intermediate_stop"):
        bounds.logit_bounds(net, X, pert, "crown", options=bounds.CrownOptions(intermediate_stop=4))
    with pytest.raises(TypeError, match="takes a CrownOptions"):
        bounds.logit_bounds(net, X, pert, "crown", options=bounds.FastOptions(4))
    with pytest.raises(TypeError, match="takes no options"):
        bounds.logit_bounds(net, X, pert, "ibp", options=bounds.CrownOptions())


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_crown_ibp_stop_is_sound(arch: str):
    """``CrownIbpOptions(stop=k)`` ends the logits' back-substitution at the IBP interval of
    affine layer ``k``: still sound for logits and margins, within IBP, and ``stop=0`` is the
    default bit for bit."""
    for seed in range(3):
        net = small_net(arch, 6, seed)
        X = torch.rand(6, 1, 6, 6, generator=torch.Generator().manual_seed(seed))
        y = torch.randint(0, 3, (6,), generator=torch.Generator().manual_seed(seed))
        pert = Perturbation.uniform(1 / 64)
        lo, hi = attack.attack_logits(net, X, pert, steps=4, vertices=4, bits=(4,), seed=seed)
        ibp = bounds.logit_bounds(net, X, pert, "ibp")
        base = bounds.logit_bounds(net, X, pert, "crown-ibp")
        zero = bounds.logit_bounds(net, X, pert, "crown-ibp", options=bounds.CrownIbpOptions())
        assert torch.equal(base.lower, zero.lower) and torch.equal(base.upper, zero.upper)
        for stop in (1, 2, -1):
            opts = bounds.CrownIbpOptions(stop)
            lower, upper = bounds.logit_bounds(net, X, pert, "crown-ibp", options=opts)
            assert inside(lower, lo, upper) and inside(lower, hi, upper), stop
            assert (ibp.lower <= lower).all() and (upper <= ibp.upper).all()
            margin = bounds.margin_bounds(net, X, y, pert, "crown-ibp", options=opts)
            with torch.no_grad():
                f = net.double()(X.double())
            net.float()
            others = margin.isfinite()  # entry y is +inf
            nominal = f.gather(1, y[:, None]) - f  # the float network is one of the networks
            assert (margin[others] <= nominal[others] + TOL).all()
            falsified = attack.attack_margin(net, X, y, pert, steps=4, vertices=4, seed=seed)
            assert not (falsified & (margin > 0).all(1)).any()
    mlp = small_net("mlp", 6, 0)
    with pytest.raises(ValueError, match=r"CrownIbpOptions.stop must be in \[-3, 3\)"):
        bounds.logit_bounds(mlp, X, pert, "crown-ibp", options=bounds.CrownIbpOptions(3))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["all", "act", "weight"])
def test_unstable_only_equals_every_neuron(arch: str, kind: str):
    """Back-substituting only the neurons whose relaxation depends on their bounds gives the same
    bounds as back-substituting every hidden neuron."""
    changed = False
    for seed in range(3):
        if arch == "mlp":
            net, size = models.mlp([1, 5, 5], [9, 8, 7], 4, seed=seed), 5
        else:
            net, size = small_net("cnn", 7, seed), 7
        X = torch.rand(6, 1, size, size, generator=torch.Generator().manual_seed(seed))
        for eps in (1 / 256, 1 / 32):
            pert = pert_of(kind, eps)
            ibp_lower, _ = bounds.logit_bounds(net, X, pert, "crown-ibp")
            for kw in ({}, {"intermediate_stop": 1}, {"intermediate_layers": 1}):
                only = bounds.CrownOptions(**kw)
                every = bounds.CrownOptions(unstable_only=False, **kw)
                fast = bounds.logit_bounds(net, X, pert, "crown", options=only)
                full = bounds.logit_bounds(net, X, pert, "crown", options=every)
                for a, b in zip(fast, full, strict=True):
                    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
                changed |= not torch.allclose(fast.lower, ibp_lower)
    assert changed, "the intermediate bounds should matter somewhere"


def test_unstable_neurons_are_those_whose_relaxation_moves():
    """A neuron outside ``unstable`` has the same relaxation for every sub-interval."""
    pert = Perturbation.only("act", 0.1)
    lo = torch.tensor([[-2.0, -2.0, 0.0, 0.05, 0.1, 0.2, -1.0, 0.05, 0.02]])
    up = torch.tensor([[-0.5, 0.0, 0.1, 0.1, 0.3, 1.0, 0.05, 0.2, 0.08]])
    box = bounds.Interval(lo.double(), up.double())
    unstable = bounds.unstable(box, pert)
    assert unstable.tolist() == [[False, True, True, True, False, False, True, True, False]]
    relu = bounds.ReLU(0, torch.nn.ReLU(), (9,))
    relu.pre = box
    whole = relu.relaxation(pert)
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        t = torch.rand(2, 9, generator=gen, dtype=torch.float64).sort(0).values
        relu.pre = bounds.Interval(lo + t[0] * (up - lo), lo + t[1] * (up - lo))
        relu.pre = bounds.Interval(relu.pre.lower.double(), relu.pre.upper.double())
        for a, b in zip(whole, relu.relaxation(pert), strict=True):
            assert torch.equal(a[~unstable], b[~unstable])


def test_crown_fast_rows():
    """More rows for ``"crown-fast"`` never hurt much; with 0 rows every hidden box is IBP's, so
    on one hidden layer (where the logits are back-substituted to the input) it is CROWN-IBP."""
    net = models.mlp([1, 4, 4], [8, 8, 8], 3, seed=5)
    X = torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(5))
    pert = Perturbation.uniform(1 / 32)
    w = {}
    for rows in (0, 4, 16):
        fast = bounds.FastOptions(rows)
        lower, upper = bounds.logit_bounds(net, X, pert, "crown-fast", options=fast)
        w[rows] = (upper - lower).mean().item()
    assert w[16] <= w[0] + TOL
    net_layers = bounds.layers(net, X.shape[1:])
    ibp = bounds.forward_bounds(net_layers, X.double(), pert, "ibp")
    zero = bounds.forward_bounds(net_layers, X.double(), pert, "crown-fast", bounds.FastOptions(0))
    for a, b in zip(ibp, zero, strict=True):
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper)
    shallow = models.mlp([1, 4, 4], [8], 3, seed=5)
    fast0 = bounds.logit_bounds(shallow, X, pert, "crown-fast", options=bounds.FastOptions(0))
    crown_ibp = bounds.logit_bounds(shallow, X, pert, "crown-ibp")
    for a, b in zip(fast0, crown_ibp, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="fast_rows"):
        bounds.FastOptions(-1)


def test_margin_bounds_tighter_than_logit_difference():
    net = small_net("mlp", 5, 7)
    X = torch.rand(10, 1, 5, 5, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(8))
    pert = Perturbation.uniform(1 / 32)
    for method in METHODS:
        lower, upper = bounds.logit_bounds(net, X, pert, method)
        margin = bounds.margin_bounds(net, X, y, pert, method)
        naive = lower.gather(1, y[:, None]) - upper
        other = ~torch.nn.functional.one_hot(y, 4).bool()
        assert (margin[other] >= naive[other] - TOL).all()


def test_margin_interval_and_probability_bounds_contain_attacked_networks():
    """Both ends of every margin, and the true-class probability, hold for perturbed networks;
    each end is never looser than the logit interval's, and the margins beat the difference of
    the linear methods' logit intervals on average."""
    net = small_net("mlp", 5, 7)
    X = torch.rand(10, 1, 5, 5, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 4, (10,), generator=torch.Generator().manual_seed(8))
    pert = Perturbation.uniform(1 / 32)
    other = ~torch.nn.functional.one_hot(y, 4).bool()
    zs = [attack.perturbed_forward(net, X, pert)]  # the nominal network is one of them
    gen = torch.Generator().manual_seed(0)
    for _ in range(64):
        v = attack.random_vertex(net, X, pert, gen)
        zs.append(attack.perturbed_forward(net, X, pert, dW=v.dW, db=v.db, dA=v.dA, dX=v.dX))
    for method in METHODS:
        m = bounds.margin_interval(net, X, y, pert, method)
        p = bounds.probability_bounds(net, X, y, pert, method)
        assert (m.lower[~other] == 0).all() and (m.upper[~other] == 0).all()
        for z in zs:
            margins = z.gather(1, y[:, None]) - z
            assert inside(m.lower, margins, m.upper), method
            prob = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
            assert inside(p.lower, prob, p.upper), method
        lower, upper = bounds.logit_bounds(net, X, pert, method)
        ibp = bounds.logit_bounds(net, X, pert, "ibp")
        naive = ibp.lower.gather(1, y[:, None]) - ibp.upper
        assert (m.lower[other] >= naive[other] - TOL).all(), method
        if method != "ibp":
            linear = (upper.gather(1, y[:, None]) - lower) - (lower.gather(1, y[:, None]) - upper)
            assert m.width[other].mean() < linear[other].mean(), method
    with pytest.raises(ValueError, match=r"y must be a tensor of shape \(10,\)"):
        bounds.margin_interval(net, X, y[:3], pert, "crown")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_certified_discrepancy_is_the_two_sided_one_and_holds(dtype: torch.dtype):
    """``certified_discrepancy`` back-substitutes the upper margins only where they can decide:
    it gives the discrepancy of ``probability_bounds`` (both sides for every image), holds for
    perturbed networks, and here both kinds of image occur (the upper side deciding or not)."""
    net = small_net("mlp", 5, 7)
    X = torch.rand(40, 1, 5, 5, generator=torch.Generator().manual_seed(7))
    y = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(8))
    pert = Perturbation.uniform(1 / 64)
    f = bounds.float_logits(net, X)
    p0 = torch.softmax(f, 1).gather(1, y[:, None])[:, 0]
    gen = torch.Generator().manual_seed(0)
    zs = [f]
    for _ in range(32):
        v = attack.random_vertex(net, X, pert, gen)
        zs.append(attack.perturbed_forward(net, X, pert, dW=v.dW, db=v.db, dA=v.dA, dX=v.dX))
    for method in ("ibp", "crown-ibp", "crown"):
        p = bounds.probability_bounds(net, X, y, pert, method, dtype=dtype)
        upper_decides = p.upper - p0 > p0 - p.lower
        assert 0 < int(upper_decides.sum()) < len(X), method
        want = torch.maximum(p.upper - p0, p0 - p.lower)
        got = bounds.certified_discrepancy(net, X, y, pert, method, dtype=dtype)
        # Up to the rounding of the smaller products for the images whose upper side decides.
        tol = 1e-12 if dtype == torch.float64 else 1e-7
        assert torch.allclose(got, want, rtol=0, atol=tol), method
        # Chunks of samples (here of 7) select their own images against their own p0.
        chunked = bounds.certified_discrepancy(net, X, y, pert, method, dtype=dtype, chunk=7)
        assert torch.allclose(chunked, want, rtol=0, atol=tol), method
        for z in zs:
            prob = torch.softmax(z, 1).gather(1, y[:, None])[:, 0]
            assert ((prob - p0).abs() <= got).all(), method
    with pytest.raises(ValueError, match=r"p0 must have shape \(40,\)"):
        bounds.certified_discrepancy(net, X, y, pert, "crown", p0=p0[:3])


def test_selected_upper_margins_match_both_sides():
    """``margins_and_logits`` with a selector: the upper margins of every selected sample, whether
    guessed for the first pass (``upper_first``) or taken in the second, equal those of the
    two-sided pass; the unselected keep the logit interval's."""
    net = small_net("mlp", 5, 3)
    X = torch.rand(12, 1, 5, 5, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 4, (12,), generator=torch.Generator().manual_seed(4))
    pert = Perturbation.uniform(1 / 64)
    both, _ = bounds.margins_and_logits(net, X, y, pert, "crown-ibp", logits=False)
    lower_only, _ = bounds.margins_and_logits(
        net, X, y, pert, "crown-ibp", logits=False, upper=False
    )
    chosen = torch.arange(12) % 3 != 0
    guess = torch.arange(12) % 2 == 0  # right for some, wrong for others
    for chunk in (None, 5):
        got, _ = bounds.margins_and_logits(
            net, X, y, pert, "crown-ibp", logits=False, chunk=chunk,
            upper=lambda m, start: chosen[start : start + len(m.lower)], upper_first=guess,
        )  # fmt: skip
        assert torch.allclose(got.lower, both.lower, rtol=0, atol=1e-12)
        assert torch.allclose(got.upper[chosen], both.upper[chosen], rtol=0, atol=1e-12)
        # Guessed but not chosen: tightened anyway; neither: the logit interval's.
        assert torch.allclose(got.upper[guess], both.upper[guess], rtol=0, atol=1e-12)
        rest = ~chosen & ~guess
        assert torch.allclose(got.upper[rest], lower_only.upper[rest], rtol=0, atol=1e-12)
        assert (got.upper[rest] > both.upper[rest] + 1e-6).any()
    with pytest.raises(ValueError, match=r"upper_first must be a mask of shape \(12,\)"):
        bounds.margins_and_logits(
            net, X, y, pert, "crown-ibp", logits=False, upper=lambda m, s: chosen,
            upper_first=guess[:3],
        )  # fmt: skip


def test_chunking_does_not_change_bounds():
    net = small_net("cnn", 6, 1)
    X = torch.rand(7, 1, 6, 6)
    pert = Perturbation.uniform(1 / 64)
    for method in METHODS:
        a = bounds.logit_bounds(net, X, pert, method)
        b = bounds.logit_bounds(net, X, pert, method, chunk=3)
        assert torch.allclose(a.lower, b.lower) and torch.allclose(a.upper, b.upper)
        assert a.method == method and a.seconds > 0


def test_zero_perturbation_gives_the_float_logits():
    net = small_net("cnn", 7, 2)
    X = torch.rand(5, 1, 7, 7)
    f = net(X).double()
    for method in METHODS:
        lower, upper = bounds.logit_bounds(net, X, Perturbation(), method)
        assert torch.allclose(lower, f, atol=1e-5) and torch.allclose(upper, f, atol=1e-5)


# ----------------------------------------------------------------------------- data-set measures


def test_verified_never_exceeds_clean_nor_certifies_another_class():
    for seed in range(2):
        net = small_net("mlp", 4, seed)
        X = torch.rand(64, 1, 4, 4, generator=torch.Generator().manual_seed(seed))
        pred = net(X).argmax(1)
        # Half the labels agree with the nominal prediction, half are shifted.
        y = torch.where(torch.arange(64) % 2 == 0, pred, (pred + 1) % 4)
        for eps in (0.0, 1 / 1023, 1 / 64):
            pert = Perturbation.uniform(eps)
            for method in METHODS:
                for margin in (False, True):
                    v = bounds.verified_accuracy(net, X, y, pert, method, margin=margin)
                    assert v.accuracy <= v.clean_accuracy
                    assert not (v.verified & (pred != y)).any()
                    assert v.verified.shape == (64,)


def test_worst_case_discrepancy_bounds_attacked_discrepancy():
    net = small_net("mlp", 4, 11)
    X = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(11))
    y = torch.randint(0, 4, (6,), generator=torch.Generator().manual_seed(12))
    pert = Perturbation.uniform(1 / 32)
    d = bounds.worst_case_discrepancy(net, X, y, pert, "crown")
    f = net(X).double()
    p0 = torch.softmax(f, 1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(d.p0, p0)
    # Through the margins: never looser than the published bound, each logit at its own end.
    hot = torch.nn.functional.one_hot(y, 4).bool()
    best = torch.softmax(torch.where(hot, d.upper, d.lower), 1).gather(1, y[:, None])[:, 0]
    worst = torch.softmax(torch.where(hot, d.lower, d.upper), 1).gather(1, y[:, None])[:, 0]
    published = bounds.worst_case_discrepancy(net, X, y, pert, "crown", margins=False)
    assert torch.allclose(published.p_best, best) and torch.allclose(published.p_worst, worst)
    assert (d.p_best <= best + 1e-12).all() and (d.p_worst >= worst - 1e-12).all()
    assert d.d.mean() < published.d.mean()
    # The same logit bounds, up to the rounding of a different evaluation order (the logit
    # rows are per sample there, shared here).
    lo, hi = bounds.logit_bounds(net, X, pert, "crown")
    for b in (d, published):
        assert torch.allclose(b.lower, lo, rtol=0, atol=1e-14)
        assert torch.allclose(b.upper, hi, rtol=0, atol=1e-14)
    assert d.worst == pytest.approx(d.d.max().item())
    assert ((0 <= d.d) & (d.d <= 1)).all()
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        p = attack.random_vertex(net, X, pert, gen)
        z = attack.perturbed_forward(net, X, pert, dW=p.dW, db=p.db, dA=p.dA, dX=p.dX)
        pz = torch.softmax(z, 1).gather(1, y[:, None]).squeeze(1)
        assert ((pz - p0).abs() <= d.d + TOL).all()
        assert ((pz - p0).abs() <= published.d + TOL).all()
        assert ((z - f).abs().amax(1) <= d.logit_gap + TOL).all()


# ----------------------------------------------------------------------------- autograd


def test_bounds_are_differentiable():
    net = small_net("cnn", 6, 3)
    X = torch.rand(4, 1, 6, 6)
    for method in METHODS:
        net.zero_grad()
        lower, upper = bounds.logit_bounds(
            net, X, Perturbation.uniform(0.01), method, dtype=torch.float32, differentiable=True
        )
        (upper - lower).sum().backward()
        grads = [p.grad for p in net.parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        assert any(g.abs().sum() > 0 for g in grads)


def test_not_differentiable_by_default():
    net = small_net("mlp", 3, 0)
    lower, _ = bounds.logit_bounds(net, torch.rand(2, 1, 3, 3), Perturbation.uniform(0.01))
    assert not lower.requires_grad


# ----------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "module, match",
    [
        (nn.Tanh(), r"layer 2 \(Tanh\)"),
        (nn.MaxPool2d(2), r"layer 2 \(MaxPool2d\)"),
        (nn.Sigmoid(), r"layer 2 \(Sigmoid\)"),
    ],
)
def test_unsupported_layer_is_named(module: nn.Module, match: str):
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3), module, nn.Linear(3, 2))
    with pytest.raises(ValueError, match=match):
        bounds.logit_bounds(net, torch.rand(2, 1, 2, 2), Perturbation.uniform(0.01))


def test_structure_errors():
    x = torch.rand(2, 4)
    pert = Perturbation.uniform(0.01)
    with pytest.raises(ValueError, match="followed by a ReLU"):
        bounds.logit_bounds(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), x, pert)
    with pytest.raises(ValueError, match="must end with"):
        bounds.logit_bounds(nn.Sequential(nn.Linear(4, 3), nn.ReLU()), x, pert)
    with pytest.raises(ValueError, match="ReLU must directly follow"):
        bounds.logit_bounds(nn.Sequential(nn.ReLU(), nn.Linear(4, 2)), x, pert)
    with pytest.raises(TypeError):
        bounds.logit_bounds(nn.Linear(4, 2), x, pert)


def test_input_errors():
    net = small_net("mlp", 4, 0)
    pert = Perturbation.uniform(0.01)
    with pytest.raises(ValueError, match="sample shape"):
        bounds.logit_bounds(net, torch.rand(2, 1, 5, 5), pert)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match=r"layer 1 \(Linear\).*expects"):
        bounds.logit_bounds(plain, torch.rand(2, 1, 5, 5), pert)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bounds.logit_bounds(net, torch.rand(2, 1, 4, 4) + 1, pert)
    with pytest.raises(ValueError, match="method"):
        bounds.logit_bounds(net, torch.rand(2, 1, 4, 4), pert, "lp")
    with pytest.raises(ValueError, match="y must"):
        bounds.verified_accuracy(net, torch.rand(2, 1, 4, 4), torch.zeros(3), pert)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf"), "x"])
@pytest.mark.parametrize("name", ["eps_input", "eps_weight", "eps_bias", "eps_act"])
def test_perturbation_validation(name: str, bad):
    with pytest.raises(ValueError, match=name):
        Perturbation(**{name: bad})


# ----------------------------------------------------------------------------- Perturbation


def test_for_bits_published_convention():
    assert Perturbation.for_bits(8).as_tuple() == (2**-8, 2**-7, 2**-7, 2**-7)
    assert Perturbation.for_bits(6).as_tuple() == (1 / 64, 1 / 32, 1 / 32, 1 / 32)
    assert Perturbation.for_bits(10).as_tuple() == (1 / 1024, 1 / 512, 1 / 512, 1 / 512)
    assert Perturbation.for_bits(16).as_tuple() == (0.0, 2**-15, 2**-15, 0.0)
    with pytest.raises(ValueError, match="published convention"):
        Perturbation.for_bits(4)


def test_from_model_covers_real_rounding_errors():
    net = small_net("cnn", 6, 4)
    X = torch.rand(20, 1, 6, 6)
    for bits in (4, 8):
        pert = Perturbation.from_model(net, bits, X)
        for m in net:
            if isinstance(m, nn.Linear | nn.Conv2d):
                for t in (m.weight, m.bias):
                    q = symmetric_quantizer(t.detach(), bits)
                    err = (q.fake_quant(t.detach()) - t.detach()).abs().max().item()
                    eps = pert.eps_weight if t is m.weight else pert.eps_bias
                    assert err <= eps * (1 + 1e-6)
        deltas = attack.rtn_deltas(net, X, pert, bits)
        assert all(d is not None for d in deltas.dW) and deltas.dX is not None
    assert Perturbation.from_model(net, 8).eps_act == 0.0
    with pytest.raises(ValueError, match="bits"):
        Perturbation.from_model(net, 1)


def test_helpers():
    assert Perturbation.only("weight", 0.1) == Perturbation(0.0, 0.1, 0.0, 0.0)
    assert Perturbation.uniform(0.2).scaled(0.5) == Perturbation.uniform(0.1)
    assert Perturbation().is_zero and not Perturbation.only("act", 1e-3).is_zero
    with pytest.raises(ValueError, match="kind"):
        Perturbation.only("weights", 0.1)
