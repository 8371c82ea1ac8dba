"""Per-layer perturbations and clipped activations in ``qlib.bounds`` (budget: ~10 s)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn

from qlib import attack, bounds, models
from qlib.bounds.layers import clip_relaxation
from qlib.bounds.relu import relax_together
from qlib.quant import LayerPerturbation, Perturbation

METHODS = ("ibp", "crown-ibp", "crown-fast", "crown")
TOL = 1e-9


def small_net(kind: str, size: int, seed: int) -> nn.Sequential:
    if kind == "mlp":
        return models.mlp([1, size, size], [6, 5], 4, seed=seed)
    return models.cnn([1, size, size], 3, channels=(2, 3), hidden=5, seed=seed)


def inside(lower: torch.Tensor, values: torch.Tensor, upper: torch.Tensor) -> bool:
    return bool((lower <= values + TOL).all() and (values <= upper + TOL).all())


def random_box(net: nn.Sequential, seed: int, clips: bool) -> LayerPerturbation:
    """Radii in [0, 1/16) per layer; with ``clips`` a clip per ReLU in [0.05, 1] and on the input."""
    g = torch.Generator().manual_seed(seed)
    n = sum(isinstance(m, nn.Linear | nn.Conv2d) for m in net)

    def radii(k: int) -> tuple[float, ...]:
        return tuple((torch.rand(k, generator=g) / 16).tolist())

    clip = tuple((0.05 + torch.rand(n - 1, generator=g)).clamp(max=1).tolist()) if clips else None
    return LayerPerturbation(
        radii(1)[0],
        radii(n),
        radii(n),
        radii(n - 1),
        input_clip=0.7 if clips else None,
        act_clip=clip,
    )


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_uniform_box_is_bit_for_bit_the_uniform_perturbation(arch: str):
    net = small_net(arch, 6, 3)
    X = torch.rand(5, 1, 6, 6, generator=torch.Generator().manual_seed(1))
    y = torch.arange(5) % 3
    pert = Perturbation(1 / 255, 1 / 64, 1 / 128, 1 / 32)
    per = LayerPerturbation.uniform(pert, sum(isinstance(m, nn.Linear | nn.Conv2d) for m in net))
    for method in METHODS:
        a, b = bounds.logit_bounds(net, X, pert, method), bounds.logit_bounds(net, X, per, method)
        assert torch.equal(a.lower, b.lower) and torch.equal(a.upper, b.upper), method
        ma = bounds.margin_bounds(net, X, y, pert, method)
        assert torch.equal(ma, bounds.margin_bounds(net, X, y, per, method)), method


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    arch=st.sampled_from(["mlp", "cnn"]),
    seed=st.integers(0, 10_000),
    clips=st.booleans(),
)
def test_per_layer_bounds_contain_attacked_networks(arch: str, seed: int, clips: bool):
    net = small_net(arch, 5, seed)
    X = torch.rand(4, 1, 5, 5, generator=torch.Generator().manual_seed(seed))
    pert = random_box(net, seed, clips)
    lo, hi = attack.attack_logits(net, X, pert, steps=4, vertices=6, seed=seed)
    for method in METHODS:
        lower, upper = bounds.logit_bounds(net, X, pert, method)
        assert inside(lower, lo, upper) and inside(lower, hi, upper), method


def test_clipped_network_leaves_the_unclipped_box():
    """The clip is modelled, not ignored: a clip far below the activations moves the logits out of
    the unclipped bounds, and the clipped bounds contain the clipped network."""
    net = small_net("mlp", 5, 7)
    X = torch.rand(6, 1, 5, 5, generator=torch.Generator().manual_seed(7))
    free = LayerPerturbation(0.0, (0.0,) * 3, (0.0,) * 3, (0.01, 0.01))
    clipped = LayerPerturbation(0.0, (0.0,) * 3, (0.0,) * 3, (0.01, 0.01), act_clip=(0.02, 0.02))
    z = attack.perturbed_forward(net, X, clipped)
    lower, upper = bounds.logit_bounds(net, X, free, "crown")
    assert not inside(lower, z, upper)
    for method in METHODS:
        lower, upper = bounds.logit_bounds(net, X, clipped, method)
        assert inside(lower, z, upper), method


@settings(max_examples=60, deadline=None)
@given(
    lo=st.floats(-3, 3),
    width=st.floats(0, 4),
    clip=st.floats(0, 2),
    eps=st.sampled_from([0.0, 0.01, 0.3]),
)
# A subnormal width: a slope of a branch not taken overflows to infinity.
@example(lo=0.0, width=5e-324, clip=1.0, eps=0.0)
@example(lo=0.0, width=5e-324, clip=1.0, eps=0.01)
def test_clip_relaxation_holds_on_a_dense_grid(lo: float, width: float, clip: float, eps: float):
    """al z + bl <= max(min(relu z, c) - eps, 0) and au z + bu >= min(relu z, c) + eps on [l, u]."""
    lo_t = torch.tensor([lo], dtype=torch.float64)
    up_t = torch.tensor([lo + width], dtype=torch.float64)
    al, bl, au, bu = clip_relaxation(lo_t, up_t, clip, eps)
    z = torch.linspace(lo, lo + width, 2001, dtype=torch.float64)
    g = torch.clamp(torch.relu(z), max=clip)
    assert bool((al * z + bl <= torch.clamp(g - eps, min=0) + 1e-12).all())
    assert bool((au * z + bu >= g + eps - 1e-12).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_clip_offsets_are_the_tightest_for_any_slope_in_0_1(dtype: torch.dtype):
    """The offsets evaluate two candidates each, which must hold for any slope in [0, 1] (rounding
    may move a computed slope off the line through two points): without margins each offset is
    the extreme of ``G(p) - a p`` over the ends and all kinks; with them the lines hold on a
    dense grid of every interval."""
    from qlib.bounds import rounding
    from qlib.bounds.relu import _offsets

    g = torch.Generator().manual_seed(5)
    lo = torch.rand(600, generator=g, dtype=torch.float64) * 6 - 3
    up = lo + torch.rand(600, generator=g, dtype=torch.float64) * 4
    al, au = torch.rand(2, 600, generator=g, dtype=torch.float64)
    lo, up, al, au = (t.to(dtype) for t in (lo, up, al, au))
    clip, eps = 1.25, 0.1  # exact in both dtypes

    def envelopes(p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.clamp(torch.relu(p), max=clip)
        return (h - eps).clamp(min=0), h + eps

    with rounding.outward(False):
        bl, bu = _offsets(lo, up, al, au, clip, clip, eps)
    kinks = [torch.full_like(lo, k).clamp(lo, up) for k in (0.0, eps, clip)]
    p = torch.stack([lo, up, *kinks]).double()
    low, high = envelopes(p)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert torch.allclose(bu.double(), (high - au.double() * p).amax(0), rtol=0, atol=tol)
    assert torch.allclose(bl.double(), (low - al.double() * p).amin(0), rtol=0, atol=tol)

    bl, bu = (t.double() for t in _offsets(lo, up, al, au, clip, clip, eps))
    z = torch.linspace(0, 1, 4001, dtype=torch.float64)[:, None] * (up - lo).double() + lo.double()
    low, high = envelopes(z)
    assert bool((al.double() * z + bl <= low).all())
    assert bool((au.double() * z + bu >= high).all())


def test_clipped_relaxation_is_exact_inside_one_piece():
    lo = torch.tensor([0.2, -2.0, 3.0], dtype=torch.float64)
    up = torch.tensor([0.8, -1.0, 4.0], dtype=torch.float64)
    al, bl, au, bu = clip_relaxation(lo, up, 1.0, 0.0)
    assert torch.allclose(al, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    assert torch.allclose(au, al) and torch.allclose(bl, bu, atol=1e-12)
    assert torch.allclose(bu, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_stable_neurons_take_their_exact_relaxation(dtype: torch.dtype):
    """Inside one linear piece of both envelopes a neuron's relaxation is exact, with no rounding
    margin: ``(0, 0, 0, eps)`` where ``up < 0`` and ``(1, -eps, 1, eps)`` where ``eps < lo`` and
    ``up < clip``; every other neuron gets the general rule, bit for bit."""
    from qlib.bounds.relu import _piecewise_relaxation

    g = torch.Generator().manual_seed(0)
    lo = (torch.rand(64, 50, generator=g, dtype=torch.float64) * 6 - 3).to(dtype)
    up = lo + torch.rand(64, 50, generator=g, dtype=torch.float64).to(dtype) * 2
    clip, eps = 1.5, 0.25
    al, bl, au, bu = clip_relaxation(lo, up, clip, eps)
    inactive, linear = up < 0, (lo > eps) & (up < clip)
    assert inactive.any() and linear.any() and (~inactive & ~linear).any()
    for t, want in ((al, 0.0), (bl, 0.0), (au, 0.0), (bu, eps)):
        assert (t[inactive] == want).all()
    for t, want in ((al, 1.0), (bl, -eps), (au, 1.0), (bu, eps)):
        assert (t[linear] == want).all()
    other = ~inactive & ~linear
    general = _piecewise_relaxation(lo[other], up[other], clip, clip, eps)
    for t, want in zip((al, bl, au, bu), general, strict=True):
        assert torch.equal(t[other], want)


def test_count_errors_name_the_layer():
    net = small_net("mlp", 4, 0)
    X = torch.rand(2, 1, 4, 4)
    short = LayerPerturbation(0.0, (0.1, 0.1), (0.0, 0.0), (0.0,))
    with pytest.raises(ValueError, match=r"eps_weight has 2 entries .* 3 affine layers.*Linear"):
        bounds.logit_bounds(net, X, short)
    with pytest.raises(ValueError, match="the network has 3 affine layers"):
        attack.perturbed_forward(net, X, short)
    with pytest.raises(ValueError, match="eps_bias has 1 entries, eps_weight 2"):
        LayerPerturbation(0.0, (0.1, 0.1), (0.0,), (0.0,))
    with pytest.raises(ValueError, match="2 affine layers have 1 hidden ReLUs"):
        LayerPerturbation(0.0, (0.1, 0.1), (0.0, 0.0), ())
    with pytest.raises(ValueError, match="act_clip has 2 entries"):
        LayerPerturbation(0.0, (0.1, 0.1), (0.0, 0.0), (0.0,), act_clip=(1.0, 1.0))
    with pytest.raises(ValueError, match=r"eps_weight\[1\] must be finite"):
        LayerPerturbation(0.0, (0.1, float("nan")), (0.0, 0.0), (0.0,))
    with pytest.raises(ValueError, match="act_clip.0. must be finite and >= 0"):
        LayerPerturbation(0.0, (0.1, 0.1), (0.0, 0.0), (0.0,), act_clip=(-1.0,))
    with pytest.raises(TypeError, match="LayerPerturbation"):
        bounds.logit_bounds(net, X, (0.1, 0.1))
    with pytest.raises(ValueError, match="n_affine"):
        LayerPerturbation.uniform(Perturbation(), 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relaxing_clipped_layers_together_matches_one_by_one(dtype: torch.dtype):
    """``relax_together`` puts several layers' neurons side by side, each with its own clip and
    eps (here also eps 0 and a clip below eps): bit for bit the relaxations of one layer at a time."""
    g = torch.Generator().manual_seed(3)
    specs = [((7,), 0.5, 0.01), ((2, 3, 3), 1.0, 0.0), ((5,), 0.004, 0.01), ((4,), 2.0, 0.3)]
    pairs = []
    for k, (shape, clip, eps) in enumerate(specs):
        relu = bounds.ReLU(k, nn.ReLU(), shape)
        lo = (torch.randn(6, *shape, generator=g) * clip).to(dtype)
        up = lo + (torch.rand(6, *shape, generator=g) * clip).to(dtype)
        relu.pre = bounds.Interval(lo, up)
        pairs.append((relu, bounds.Clipped(eps_act=eps, clip=clip)))
    alone = []
    for relu, pert in pairs:
        alone.append(relu.relaxation(pert))
        relu._relaxed = None
    relax_together(pairs)
    for (relu, pert), expected in zip(pairs, alone, strict=True):
        hit = relu._relaxed
        assert hit is not None and hit[0] is relu.pre, "the relaxation is remembered for its box"
        for got, want in zip(relu.relaxation(pert), expected, strict=True):
            assert got.shape == want.shape and got.dtype == dtype
            assert torch.equal(got, want)


def test_remembered_intervals_are_exact_reuses():
    """``remember_intervals``: an affine layer's IBP interval is reused only for the same
    weights, radii and input interval; every bound is bit for bit the one computed afresh (in a
    memo of its own: inside one, the first layer splits its rises, ``Affine.split_rises``)."""
    from qlib.bounds.memo import IntervalMemo, remember_intervals

    net = small_net("mlp", 4, 0)
    X = torch.rand(5, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3, 0])
    boxes = [random_box(net, seed, clips=True) for seed in (1, 2)]
    # Same first layer, different later radii: the first layer's interval is reused.
    boxes.append(LayerPerturbation(**{**boxes[0].__dict__, "eps_act": (0.01, 0.02)}))
    memo = IntervalMemo()
    for box in boxes + boxes:
        for Xs in (X, X[:3]):
            with remember_intervals(IntervalMemo()):
                fresh = bounds.margin_interval(net, Xs, y[: len(Xs)], box, "crown-ibp")
            with remember_intervals(memo):
                got = bounds.margin_interval(net, Xs, y[: len(Xs)], box, "crown-ibp")
            assert torch.equal(got.lower, fresh.lower) and torch.equal(got.upper, fresh.upper)
    first_pass = 3 * 2 * 3  # boxes x batches x affine layers
    assert memo.misses == first_pass - 2  # the third box reuses the first layer, twice
    assert memo.hits == first_pass + 2
    for change in ("weight", "bias"):  # a changed layer is never served from the memo
        with torch.no_grad():
            getattr(net[1], change).mul_(0.5)
        with remember_intervals(memo):
            got = bounds.margin_interval(net, X, y, boxes[0], "crown-ibp")
        with remember_intervals(IntervalMemo()):
            fresh = bounds.margin_interval(net, X, y, boxes[0], "crown-ibp")
        assert torch.equal(got.lower, fresh.lower) and torch.equal(got.upper, fresh.upper)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_remembered_input_terms_are_exact_reuses(arch: str, dtype: torch.dtype):
    """Inside ``remember_intervals`` the input box and the parts of an affine layer's interval
    that depend on the lower end of its input alone are reused when only the layer's radii
    change: every bound stays bit for bit the one computed afresh in a new memo, also for other
    images of the same shape and sum, and after a weight changes."""
    from qlib.bounds.base import version
    from qlib.bounds.memo import IntervalMemo, remember_intervals

    net = small_net(arch, 6, 3)
    X = torch.rand(4, 1, 6, 6, generator=torch.Generator().manual_seed(3))
    y = torch.tensor([0, 1, 2, 0])
    first = random_box(net, 5, clips=True)
    # The same input radius and clip, other weight and bias radii for the first layer.
    other = LayerPerturbation(
        **{
            **first.__dict__,
            "eps_weight": (first.eps_weight[0] / 3, *first.eps_weight[1:]),
            "eps_bias": (first.eps_bias[0] * 2, *first.eps_bias[1:]),
        }
    )
    memo = IntervalMemo()
    first_affine = next(m for m in net if isinstance(m, nn.Linear | nn.Conv2d))
    for Xs, ys, box in [(X, y, first), (X, y, other), (X.flip(0), y.flip(0), other)]:
        with remember_intervals(memo):
            got = bounds.margin_interval(net, Xs, ys, box, "crown-ibp", dtype=dtype)
        with remember_intervals(IntervalMemo()):
            fresh = bounds.margin_interval(net, Xs, ys, box, "crown-ibp", dtype=dtype)
        assert torch.equal(got.lower, fresh.lower) and torch.equal(got.upper, fresh.upper)
        if box is other and Xs is X:  # the radii are not in the key of the lower terms
            assert [k[0] for k in memo.entries].count("input") == 1
            assert sum(k[:2] == ("lower", version(first_affine.weight)) for k in memo.entries) == 1
    with torch.no_grad():
        first_affine.weight.mul_(0.5)
    with remember_intervals(memo):
        got = bounds.margin_interval(net, X, y, other, "crown-ibp", dtype=dtype)
    with remember_intervals(IntervalMemo()):
        fresh = bounds.margin_interval(net, X, y, other, "crown-ibp", dtype=dtype)
    assert torch.equal(got.lower, fresh.lower) and torch.equal(got.upper, fresh.upper)
