"""Bounds that hold for the floating-point numbers computed: exact rational arithmetic as referee.

The reference computations here use Python's ``fractions`` on the very float values the network
holds, so they are the true values of the rules, with no rounding at all.
"""

from __future__ import annotations

import itertools
from fractions import Fraction

import pytest
import torch
from torch import nn

from qlib import attack, bounds, models
from qlib.bounds import rounding
from qlib.bounds.memo import IntervalMemo, remember_intervals
from qlib.quant import Perturbation

F = Fraction


def _mlp(weights: list[tuple[list[list[float]], list[float]]], dtype) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i, (W, b) in enumerate(weights):
        lin = nn.Linear(len(W[0]), len(W)).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.tensor(W, dtype=dtype))
            lin.bias.copy_(torch.tensor(b, dtype=dtype))
        mods += [lin] if i == len(weights) - 1 else [lin, nn.ReLU()]
    return nn.Sequential(*mods)


def _exact_params(model: nn.Sequential) -> list[tuple[list[list[F]], list[F]]]:
    out = []
    for m in model:
        if isinstance(m, nn.Linear):
            W = [[F(float(w)) for w in row] for row in m.weight.detach().double()]
            out.append((W, [F(float(v)) for v in m.bias.detach().double()]))
    return out


def _exact_ibp(model, x: list[F], pert: Perturbation) -> tuple[list[F], list[F]]:
    """The exact interval product and ReLU rule of ``qlib.bounds`` in rational arithmetic."""
    ex, ew, eb, ea = (F(pert.eps_input), F(pert.eps_weight), F(pert.eps_bias), F(pert.eps_act))
    lo = [max(F(0), v - ex) for v in x]
    hi = [min(F(1), v + ex) for v in x]
    params = _exact_params(model)
    for k, (W, b) in enumerate(params):
        nl, nh = [], []
        for row, bias in zip(W, b, strict=True):
            up = sum(
                max(w + ew, 0) * u + min(w + ew, 0) * low
                for w, u, low in zip(row, hi, lo, strict=True)
            )
            dn = sum(
                max(w - ew, 0) * low + min(w - ew, 0) * u
                for w, u, low in zip(row, hi, lo, strict=True)
            )
            nh.append(up + bias + eb)
            nl.append(dn + bias - eb)
        if k < len(params) - 1:
            lo = [max(F(0), max(v, F(0)) - ea) for v in nl]
            hi = [max(v, F(0)) + ea for v in nh]
        else:
            lo, hi = nl, nh
    return lo, hi


def _exact_crown_lower(
    model, x: list[F], pert: Perturbation, relax: list[tuple], row: list[F]
) -> F:
    """The exact minimum over the input box of the linear relaxation of ``row · logits`` that
    uses, for each ReLU, the given relaxation ``(al, bl, au, bu)`` (the float one, read exactly)."""
    ex, ew, eb = F(pert.eps_input), F(pert.eps_weight), F(pert.eps_bias)
    params = _exact_params(model)
    A, const = list(row), F(0)
    for k in range(len(params) - 1, -1, -1):
        W, b = params[k]
        l1 = sum(abs(a) for a in A)
        const += sum(a * bb for a, bb in zip(A, b, strict=True)) - eb * l1
        A = [sum(A[o] * W[o][j] for o in range(len(W))) - ew * l1 for j in range(len(W[0]))]
        if k == 0:
            break
        al, bl, au, bu = relax[k - 1]
        const += sum(a * (bl[j] if a >= 0 else bu[j]) for j, a in enumerate(A))
        A = [a * (al[j] if a >= 0 else au[j]) for j, a in enumerate(A)]
    lo = [max(F(0), v - ex) for v in x]
    hi = [min(F(1), v + ex) for v in x]
    return const + sum(a * (low if a >= 0 else up) for a, low, up in zip(A, lo, hi, strict=True))


# Weights chosen for cancellation: large terms of both signs next to small ones.
NETS = {
    "cancelling": [
        ([[1e8, -1e8, 0.1], [0.5, 0.25, -0.75], [-3e7, 3e7 + 1, 2.0]], [0.1, -0.2, 1e-3]),
        ([[1.0, -1.0, 1e-4], [2.5, -2.5, 3.0]], [0.0, -1e-7]),
    ],
    # Constants that cancel: the back-substitution adds a 3e7 bias term to small ones, and the
    # logits' rows then subtract another (each addition to the constant rounds once).
    "biases": [
        ([[0.5, -0.25, 1.0], [1.0, 0.5, -0.5], [0.25, 1.0, 0.75]], [3e7 + 0.3, 0.7, -0.1]),
        ([[1.0, -1.0, 0.5], [-0.5, 2.0, 1e-3]], [-3e7 + 0.1, 0.2]),
    ],
    "random": None,
}


def _random_net(seed: int) -> list:
    g = torch.Generator().manual_seed(seed)
    sizes = [4, 5, 4, 3]
    return [
        ((torch.randn(o, i, generator=g) * 2).tolist(), (torch.randn(o, generator=g)).tolist())
        for i, o in itertools.pairwise(sizes)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["cancelling", "biases", "random0", "random1"])
def test_float_bounds_contain_the_exact_ones(case: str, dtype):
    spec = NETS[case] if case in NETS else _random_net(int(case[-1]))
    x = torch.tensor([[0.3, 0.9, 0.55, 0.1][: len(spec[0][0][0])]], dtype=dtype)
    _check_against_exact(
        _mlp(spec, dtype), x, [Perturbation.uniform(2.0**-10), Perturbation(0.0, 1e-3, 1e-3, 0.0)]
    )


def _check_against_exact(
    model: nn.Sequential, x_t: torch.Tensor, perts: list[Perturbation], ibp: bool = True
) -> None:
    """The float IBP interval of ``model`` at ``x_t`` [1, k] contains the exact one (``ibp``),
    and the float CROWN-IBP bound of each ``±logit`` lies below the exact minimum of the same
    relaxation."""
    dtype = x_t.dtype
    x = [F(float(v)) for v in x_t[0].double()]
    for pert in perts:
        # IBP: inclusion-monotone, so the float interval must contain the exact one.
        lo, hi = bounds.logit_bounds(model, x_t, pert, "ibp", dtype=dtype)
        if ibp:
            ex_lo, ex_hi = _exact_ibp(model, x, pert)
            for j in range(len(ex_lo)):
                assert F(float(lo[0, j])) <= ex_lo[j] <= ex_hi[j] <= F(float(hi[0, j])), (pert, j)
        # Linear bounds: given the float pre-activation boxes (exact numbers), the float bound
        # must lie below the exact minimum of the same relaxation.
        net = bounds.layers(model, x_t.shape[1:])
        boxes = bounds.forward_bounds(net, x_t.to(dtype), pert, "crown-ibp")
        relax = [
            tuple([F(float(v)) for v in t[0].double()] for t in layer.relaxation(pert))
            for layer in net
            if isinstance(layer, bounds.ReLU)
        ]
        eye = torch.eye(lo.shape[1], dtype=dtype)
        # Unit rows: their first step charges the roundings of one product (``nonzeros``).
        spec_rows = bounds.LinearBound(
            torch.cat([eye, -eye]), torch.zeros(2 * len(eye), dtype=dtype), nonzeros=1
        )
        low = bounds.backsubstitute(net, len(net) - 1, spec_rows, boxes, pert)
        for s, row in enumerate(torch.cat([eye, -eye]).tolist()):
            exact = _exact_crown_lower(model, x, pert, relax, [F(r) for r in row])
            assert F(float(low[0, s])) <= exact, (pert, s)


def test_wide_float32_layers_sum_in_parts_and_stay_sound():
    """float32 back-substitution through a layer of 256 outputs sums ``A W`` in thirds
    (``Linear.apply_t_in_parts``), and the ReLU constants and the concretisation over 256 outputs in
    blocks (``base.split_sum``), with margins for those fewer roundings. On a 3-256-16-256-1 MLP
    whose weights carry cancelling pairs (±1e3 beside weights near 0.05), the bounds still lie
    below the exact minima of the same relaxation. (A soundness check: a priori margins are far
    from tight, so counting too few roundings would not fail here.)"""
    g = torch.Generator().manual_seed(5)

    def weights(o: int, i: int) -> list:
        w = torch.randn(o, i, generator=g) * 0.05
        w[::2, ::3] += 1e3
        w[1::2, ::3] -= 1e3
        return w.tolist()

    def bias(o: int) -> list:
        return (torch.randn(o, generator=g) * 0.1).tolist()

    spec = [
        (weights(256, 3), bias(256)),
        ((torch.randn(16, 256, generator=g) * 0.05).tolist(), bias(16)),
        (weights(256, 16), bias(256)),
        ((torch.randn(1, 256, generator=g) * 0.1).tolist(), [0.1]),
    ]
    model = _mlp(spec, torch.float32)
    net = bounds.layers(model, (3,))
    assert net[4].entry_roundings(torch.float32) == 88  # thirds: 86 + 2 additions, not 256
    assert net[4].entry_roundings(torch.float32, split=False) == 256
    assert net[4].entry_roundings(torch.float64) == 256
    x = torch.tensor([[0.3, 0.9, 0.55]])
    _check_against_exact(model, x, [Perturbation.uniform(2.0**-10)], ibp=False)


def test_float32_rises_over_784_inputs_sum_in_quarters_and_contain_the_exact_interval():
    """float32 IBP sums the rises of a layer with 784 inputs in quarters (196 terms each, then
    three additions: 199 roundings and the width's, not 785), and its interval still contains
    the exact one, on weights with cancelling ±1e3 pairs beside small ones, under weight and
    bias radii."""
    g = torch.Generator().manual_seed(3)
    W = torch.randn(3, 784, generator=g) * 0.05
    W[:, ::2] += 1e3
    W[:, 1::2] -= 1e3
    model = _mlp([(W.tolist(), [0.1, -0.2, 0.3])], torch.float32)
    layer = bounds.layers(model, (784,))[0]
    d = torch.full((1, 784), 2.0**-9)
    both = torch.cat([W.clamp(min=0), W.clamp(max=0)])
    product, roundings = layer.rises(d, both)
    assert roundings == 196 + 3 + 1
    assert torch.allclose(product, d @ both.T, rtol=1e-5)
    x = torch.rand(1, 784, generator=g)
    x[:, ::5] = 0.0  # clamped at 0: half the width
    pert = Perturbation(2.0**-10, 2.0**-12, 1e-3, 0.0)
    lo, hi = bounds.logit_bounds(model, x, pert, "ibp", dtype=torch.float32)
    ex_lo, ex_hi = _exact_ibp(model, [F(float(v)) for v in x[0].double()], pert)
    for j in range(3):
        assert F(float(lo[0, j])) <= ex_lo[j] <= ex_hi[j] <= F(float(hi[0, j])), j
    with rounding.outward(False):
        assert layer.rises(d, both)[1] == 785


def test_unit_rows_charge_the_roundings_of_their_nonzero_products():
    """A spec's unit rows ``±e_j`` select a row of the weight: every other product is an exact
    zero, and so is adding it, so the step's coefficients and constant round once or twice
    however the BLAS sums. The step's margin with ``nonzeros=1`` is that of two roundings, not
    of the layer's 256 outputs (summed in thirds); rows that are not marked keep the general
    count. (The first step of every ``crown`` and ``crown-fast`` intermediate bound starts from
    such rows.)"""
    layer = bounds.layers(nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 3)), (8,))[0]
    layer.inp = bounds.Interval(torch.zeros(2, 8), torch.ones(2, 8))
    eye = torch.eye(256)[:4]
    pert = Perturbation.uniform(2.0**-10)
    marked = layer.step_slack(bounds.LinearBound(eye, torch.zeros(4), nonzeros=1), pert)
    plain = layer.step_slack(bounds.LinearBound(eye, torch.zeros(4)), pert)
    # Against 86 + 2 (the thirds of a 256-wide product) plus the weight term's: 15x less.
    assert (marked < plain / 15).all()
    # And the unit rows' coefficients really are the weight's rows, less the weight radius.
    A_in = layer.backward(bounds.LinearBound(eye, torch.zeros(4), nonzeros=1), pert).A
    eps = rounding.ceil(pert.eps_weight, torch.float32)
    assert torch.equal(A_in, layer.module.weight[:4].detach() - eps)


def test_split_sums_take_fewer_roundings_and_stay_within_them():
    """A split float32 dot product of 256 terms sums blocks of 32 and then the 8 blocks: 39
    roundings per term whatever order each sum takes, and the result lies within ``gamma_39``
    of the exact value (float64 here: the products of float32 numbers are exact in it) even
    with terms over 40 binary orders of magnitude. float64, fewer than 256 terms, and lengths
    without a divisor of 8 or more do not split."""
    from qlib.bounds.base import rowdot, split_length, split_sum, split_terms

    assert (split_length(256, torch.float32), split_terms(256, torch.float32)) == (32, 39)
    assert split_terms(784, torch.float32) == 28 + 28 - 1
    assert split_terms(256, torch.float64) == 256 and split_terms(257, torch.float32) == 257
    assert split_terms(128, torch.float32) == 128
    g = torch.Generator().manual_seed(0)
    scale = 2.0 ** torch.randint(-20, 20, (3, 4, 256), generator=g).float()
    A = torch.randn(3, 4, 256, generator=g) * scale
    v = torch.randn(3, 256, generator=g) * scale[:, 0]
    gamma = rounding.gamma(39, torch.float32) + rounding.gamma(256, torch.float64)
    for rows in (A, A[0]):  # per sample and shared rows
        got = rowdot(rows, v, split=True).double()
        exact = rowdot(rows.double(), v.double())
        assert ((got - exact).abs() <= gamma * rowdot(rows.double().abs(), v.double().abs())).all()
    got = split_sum(A).double()
    assert ((got - A.double().sum(-1)).abs() <= gamma * A.double().abs().sum(-1)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_step_margin_covers_its_constant(dtype):
    """A ReLU step's constant sums the upper offsets ``bu`` of a row's unstable neurons: one
    offset of ``2/eps`` and 511 of 0.95, each lost against it in some summation order, which
    puts the computed constant above the exact one. The slack of the step must cover the exact
    difference, which the entries' part of the margin alone (``gamma_3``, exact entries here)
    does not."""
    k, big = 512, 2 / torch.finfo(dtype).eps
    half = torch.full((1, k), 1.9, dtype=dtype)  # offsets 0.95: lost against 2/eps
    rows = []
    for p in (0, 1, k // 2, k - 1):  # the large offset at several places of the sum
        half_p = half.clone()
        half_p[0, p] = 2 * big
        rows.append(half_p)
    A = -torch.ones(1, len(rows), k, dtype=dtype)
    for s, half_p in enumerate(rows):
        relu = bounds.ReLU(0, nn.ReLU(), (k,))
        relu.pre = bounds.Interval(-half_p, half_p)  # bu = u/2 for every neuron (eps_act 0)
        out = relu.backward(
            bounds.LinearBound(A[:, s : s + 1], torch.zeros(1, 1, dtype=dtype)), Perturbation()
        )
        al, bl, au, bu = (
            [F(float(v)) for v in t[0].double()] for t in relu.relaxation(Perturbation())
        )
        coef = [-(au[j]) for j in range(k)]  # A = -1 takes the upper relaxation
        exact_const = -sum(bu)
        lo, up = (
            [F(float(v)) for v in -half_p[0].double()],
            [F(float(v)) for v in half_p[0].double()],
        )
        computed = [F(float(v)) for v in out.A[0, 0].double()]
        # Over the box, exact - computed >= -slack at the worst z.
        gap = (
            exact_const
            - F(float(out.const[0, 0]))
            + sum(
                min((c - a) * lo[j], (c - a) * up[j])
                for j, (c, a) in enumerate(zip(coef, computed, strict=True))
            )
        )
        assert gap >= -F(float(out.slack[0, 0])), (s, float(gap), float(out.slack[0, 0]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_split_rises_contain_the_exact_interval(dtype):
    """Inside ``remember_intervals`` the layer that reads the input splits its rises into
    products that do not depend on the weight radius plus sparse terms for the weights within
    that radius of zero (``Linear.split_rises``). Weights at 0, inside, at and just outside
    ``±eps_w``, tiny and huge ones: the float interval must contain the exact one, for a first
    radius and for a second one that reuses the remembered products; the split must be taken."""
    e = 2.0**-6
    g = torch.Generator().manual_seed(0)
    special = [0.0] * 20  # pruned weights: each takes e in the rise and -e in the fall
    special += [-e, e, -e / 2, e / 3, -e * 1.5, e * 1.25, 1e4, -1e4, 2.0**-20, -(2.0**-30)]
    rows = []
    for sign in (1.0, -1.0, 0.5):
        far = (torch.rand(256 - len(special), generator=g) * 2 + 2 * e) * torch.where(
            torch.rand(256 - len(special), generator=g) < 0.5, -1.0, 1.0
        )
        rows.append([sign * v for v in special] + far.tolist())
    model = _mlp([(rows, [0.1, -0.2, 0.0])], dtype)
    x_t = torch.rand(2, 256, generator=g, dtype=dtype)
    x_t[:, ::7] = 0.0  # inputs clamped at 0 have half the width
    memo = IntervalMemo()
    for eps_w in (e, e / 2):
        pert = Perturbation(eps_input=2.0**-9, eps_weight=eps_w, eps_bias=1e-3)
        with remember_intervals(memo), torch.no_grad():
            net = bounds.layers(model, x_t.shape[1:])
            d = torch.ones(2, 256, dtype=dtype)
            assert net[0].reads_input and net[0].split_rises(d, eps_w) is not None
            lo, hi = bounds.logit_bounds(model, x_t, pert, "ibp", dtype=dtype)
        for i in range(2):
            ex_lo, ex_hi = _exact_ibp(model, [F(float(v)) for v in x_t[i].double()], pert)
            for j in range(3):
                assert F(float(lo[i, j])) <= ex_lo[j] and ex_hi[j] <= F(float(hi[i, j])), (i, j)
    assert sum(k[0] == "widths" for k in memo.entries) == 2  # d of ones, and the box's width


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["ibp", "crown-ibp"])
def test_without_the_margin_a_bound_is_wrong(method: str, dtype):
    """``1 + 2^p - 2^p`` sums to 0 or 1 depending on the order; with every eps zero the bounds
    collapse onto the computed logits, so without margins some logit's interval misses its
    exact value (1), whatever order the BLAS sums in. With margins none does."""
    big = 2 / torch.finfo(dtype).eps  # 2^24 or 2^53: 1 + big rounds to big
    rows = [list(p) for p in itertools.permutations([1.0, big, -big])]
    model = _mlp([(rows, [0.0] * len(rows))], dtype)
    x = torch.ones(1, 3, dtype=dtype)
    pert = Perturbation()
    with rounding.outward(False):
        lo, hi = bounds.logit_bounds(model, x, pert, method, dtype=dtype)
    assert ((lo > 1) | (hi < 1)).any(), "no permutation exposed the rounding: test is vacuous"
    lo, hi = bounds.logit_bounds(model, x, pert, method, dtype=dtype)
    assert (lo <= 1).all() and (hi >= 1).all()


def test_float32_back_substitution_of_a_cancelling_layer_keeps_its_width():
    """The last step of a back-substitution takes ``A W l`` as ``A (W l)`` with IBP's float64
    base (``Affine.concretise``), so the rounding of the float32 coefficients ``A W`` meets only
    the box's width: on a layer whose weights ``±1e4`` cancel on ``l``, the float32 bounds of
    ``±logit`` lie within 1e-4 (relative to the width) of the exact extremes over the same input
    box, where a margin on ``|A W| u`` made them 30 % wider; and they contain them."""
    model = _mlp([([[1e4, -1e4], [-1e4, 1e4]], [0.5, -0.25])], torch.float32)
    x = torch.tensor([[0.5, 0.5]])
    pert = Perturbation(eps_input=2.0**-20)
    net = bounds.layers(model, x.shape[1:])
    boxes = bounds.forward_bounds(net, x, pert, "crown-ibp")
    eye = torch.eye(2)
    spec = bounds.LinearBound(torch.cat([eye, -eye]), torch.zeros(4))
    with torch.no_grad():
        low = bounds.backsubstitute(net, len(net) - 1, spec, boxes, pert)
    ((W, b),) = _exact_params(model)
    lo = [F(float(v)) for v in boxes[0].lower[0]]
    hi = [F(float(v)) for v in boxes[0].upper[0]]
    for j in range(2):
        terms = [(w * a, w * c) for w, a, c in zip(W[j], lo, hi, strict=True)]
        ex_lo, ex_hi = b[j] + sum(map(min, terms)), b[j] + sum(map(max, terms))
        assert F(float(low[0, j])) <= ex_lo and ex_hi <= F(float(-low[0, 2 + j]))
        width = -low[0, 2 + j].double() - low[0, j].double()
        assert float(width) <= float(ex_hi - ex_lo) * (1 + 1e-4), j


@pytest.mark.parametrize("seed", [0, 1])
def test_float32_bounds_of_a_wide_mlp_contain_attacked_networks(seed: int):
    """On 256-wide layers float32 bounds sum in parts (thirds of ``A W``, quartered rises, split
    constants and concretisation, unit rows): every linear method, stopped at the input or at
    the hidden layer, must still contain the logits of attacked networks, computed in float64,
    at a radius where the bounds are narrow enough for the attack to come close (eps 2^-12 on
    every kind)."""
    net = models.mlp([1, 8, 8], [256, 256], 10, seed=seed)
    X = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    pert = Perturbation.uniform(2.0**-12)
    lo, hi = attack.attack_logits(net, X, pert, steps=4, vertices=4, seed=seed)
    # Stopping at the hidden layer: its concretisation sums A W in thirds, the input layer's not.
    for method, options in (
        ("crown-ibp", None),
        ("crown-fast", None),
        ("crown", None),
        ("crown", bounds.CrownOptions(1)),
        ("crown-ibp", bounds.CrownIbpOptions(1)),
    ):
        lower, upper = bounds.logit_bounds(
            net, X, pert, method, options=options, dtype=torch.float32
        )
        lower, upper = lower.double(), upper.double()
        assert (lower <= lo).all() and (hi <= upper).all(), (method, options)
        assert ((upper - lower) < 4 * (hi - lo) + 1e-3).all(), (method, options)  # not vacuous


def test_float32_is_a_sound_and_close_bound():
    """float32 bounds carry float32 margins (gamma_n with u = 2^-24): never tighter than the
    float64 ones by more than float64's own margin, and looser by a small relative amount."""
    torch.manual_seed(0)
    model = _mlp(_random_net(3), torch.float32)
    X = torch.rand(16, 4)
    pert = Perturbation.uniform(2.0**-8)
    for method in bounds.METHODS:
        b32 = bounds.logit_bounds(model, X, pert, method, dtype=torch.float32)
        b64 = bounds.logit_bounds(model, X, pert, method, dtype=torch.float64)
        assert b32.lower.dtype == torch.float32
        width = (b64.upper - b64.lower).mean()
        looser = (b32.upper - b32.lower).double().mean() / width - 1
        assert -1e-9 <= looser <= 1e-3, (method, looser.item())


def test_bad_models_and_overflow():
    X = torch.rand(2, 4)
    pert = Perturbation.uniform(1e-3)
    model = _mlp(_random_net(0), torch.float32)
    bounds.logit_bounds(model, X, pert)  # finite: remembered until the weight changes
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"parameter '0.weight' of the model is not finite"):
        bounds.logit_bounds(model, X, pert)
    model[0].weight.data = torch.full_like(model[0].weight, float("inf"))  # the same version
    with pytest.raises(ValueError, match=r"parameter '0.weight' of the model is not finite"):
        bounds.logit_bounds(model, X, pert)
    # A float64 model is bounded in float64 even when float32 is asked for.
    m64 = _mlp(_random_net(0), torch.float64)
    assert bounds.logit_bounds(m64, X, pert, dtype=torch.float32).lower.dtype == torch.float64
    # Half-precision weights convert exactly: bounded as they are.
    half = _mlp(_random_net(0), torch.float32).to(torch.bfloat16)
    lo, hi = bounds.logit_bounds(half, X.to(torch.bfloat16), pert, "crown")
    assert lo.dtype == torch.float64 and (lo <= hi).all()
    # An eps that overflows float32 falls back to float64 with a warning.
    deep = _mlp([([[1e5] * 4] * 4, [0.0] * 4)] * 6 + [([[1e5] * 4], [0.0])], torch.float32)
    with pytest.warns(RuntimeWarning, match="overflowed float32"):
        res = bounds.logit_bounds(deep, X, Perturbation.uniform(0.5), "ibp", dtype=torch.float32)
    assert res.lower.dtype == torch.float64 and res.upper.isfinite().all()
    two = _mlp(
        [([[1e5] * 4] * 4, [0.0] * 4)] * 6 + [([[1e5] * 4, [-1e5] * 4], [0.0] * 2)], torch.float32
    )
    y = torch.zeros(2, dtype=torch.long)
    with pytest.warns(RuntimeWarning, match="overflowed float32"):
        m = bounds.margin_interval(two, X, y, Perturbation.uniform(0.5), dtype=torch.float32)
    assert m.lower.dtype == torch.float64 and m.upper.isfinite().all()
    one = bounds.margin_interval(deep, X, y, pert)  # one class: no margin, every bound 0
    assert one.lower.shape == (2, 1) and (one.lower == 0).all() and (one.upper == 0).all()
    with pytest.raises(ValueError, match="float32 or float64"):
        bounds.logit_bounds(model, X, pert, dtype=torch.float16)


def test_float32_ibp_keeps_float64_tightness():
    """IBP's base product ``W l`` is computed in float64 even for a float32 box: its rounding
    scales with ``|W| l``, far larger than a narrow box's width, so a float32 base would make
    the bounds of a wide first layer about 1e-3 looser; with it they stay within 1e-4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(400, 64), nn.ReLU(), nn.Linear(64, 10))
    X = torch.rand(32, 400)
    pert = Perturbation.uniform(2.0**-10)
    b32 = bounds.logit_bounds(model, X, pert, "ibp", dtype=torch.float32)
    b64 = bounds.logit_bounds(model, X, pert, "ibp")
    assert (b32.lower.double() <= b64.lower + 1e-12).all()
    looser = (b32.upper - b32.lower).double().mean() / (b64.upper - b64.lower).mean() - 1
    assert 0 <= looser <= 1e-4, looser.item()


@pytest.mark.parametrize("side", [8, 16])
def test_float32_convolution_bounds_are_sound_and_close(side: int):
    """A convolution's float32 paths (its base product stays float32, its back-substitution
    coefficients take gamma of the outputs one input reaches; at 16x16 the first feature map
    has 256 elements, so its ReLU constants and concretisation are split sums): every float32
    bound contains the attacked networks and the float64 bound, up to float64's own margin,
    and is close."""
    net = models.cnn([1, side, side], 3, channels=(4, 6), hidden=8, seed=3)
    X = torch.rand(6, 1, side, side, generator=torch.Generator().manual_seed(3))
    pert = Perturbation.uniform(2.0**-9)
    lo, hi = attack.attack_logits(net, X, pert, steps=4, vertices=8, bits=(4,), seed=3)
    for method in bounds.METHODS:
        b32 = bounds.logit_bounds(net, X, pert, method, dtype=torch.float32)
        b64 = bounds.logit_bounds(net, X, pert, method)
        assert b32.lower.dtype == torch.float32
        assert (b32.lower.double() <= lo).all() and (hi <= b32.upper.double()).all(), method
        assert (b32.lower.double() <= b64.lower + 1e-12).all(), method
        assert (b64.upper - 1e-12 <= b32.upper.double()).all(), method
        looser = (b32.upper - b32.lower).double().mean() / (b64.upper - b64.lower).mean() - 1
        assert 0 <= looser <= 1e-2, (method, looser.item())


@pytest.mark.parametrize(
    "change",
    ["in place", "assigned data", "new parameter", "weight through data", "bias through data"],
)
def test_remembered_weight_terms_follow_the_weights(change: str):
    """Weight-sized terms (``Affine.term``) and, inside ``remember_intervals``, whole intervals
    are remembered across calls, since an exploration bounds many boxes of one model; once a
    weight or bias changes, in place, by assigning ``.data``, as a new parameter, or in place
    through ``.data`` (which keeps the version, the storage and the identity, as in-place
    quantisation does), the bounds are those of a fresh copy of the model in a fresh memo, bit
    for bit."""
    import copy

    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 12), nn.ReLU(), nn.Linear(12, 5))
    X = torch.rand(6, 20)
    pert = Perturbation.uniform(2.0**-8)
    memo = IntervalMemo()
    with remember_intervals(memo):
        for method in ("ibp", "crown-ibp"):
            for dtype in (torch.float32, torch.float64):
                bounds.logit_bounds(model, X, pert, method, dtype=dtype)  # remember the terms
    new = torch.randn(12, 20) * 0.3
    with torch.no_grad():
        if change == "in place":
            model[0].weight.copy_(new)
        elif change == "assigned data":
            model[0].weight.data = new
        elif change == "new parameter":
            model[0].weight = nn.Parameter(new)
        elif change == "weight through data":
            model[0].weight.data.mul_(0.5)
        else:
            model[0].bias.data.add_(0.25)
    fresh = copy.deepcopy(model)
    for method in ("ibp", "crown-ibp"):
        for dtype in (torch.float32, torch.float64):
            with remember_intervals(memo):
                got = bounds.logit_bounds(model, X, pert, method, dtype=dtype)
            with remember_intervals(IntervalMemo()):  # the rules a memo's first call takes
                want = bounds.logit_bounds(fresh, X, pert, method, dtype=dtype)
            assert torch.equal(got.lower, want.lower) and torch.equal(got.upper, want.upper)


def test_version_follows_values_and_is_checked_once_inside_a_block():
    """``version`` names a tensor's values: a change through ``.data`` gives a new one, equal
    values keep it, and a NaN is never equal to itself; inside ``checked_once`` the caller
    promises no change, so a tensor is compared once."""
    from qlib.bounds.base import checked_once, version

    p = nn.Parameter(torch.rand(4, 3))
    first = version(p)
    assert version(p) == first
    p.data.add_(1.0)
    second = version(p)
    assert second != first and second[0] == first[0]
    p.data = p.data.clone()  # new storage, same values
    assert version(p) == second
    with checked_once():
        inside = version(p)
        p.data.mul_(2.0)
        assert version(p) == inside  # compared once: the block's promise
    assert version(p) != inside
    nan = torch.full((2,), float("nan"))
    assert version(nan) != version(nan)


@pytest.mark.parametrize("method", ["ibp", "crown"])
def test_bounds_follow_weights_changed_in_place_through_data(method: str):
    """Weights changed through ``.data`` (as in-place quantisation does) must be bounded as they
    are now, not as they were when a cache first saw them (the sibling of the test above, for
    the change that keeps the version, data pointer and identity all three)."""
    X = torch.rand(3, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    pert = Perturbation(0.01, 0.01, 0.01, 0.01)
    net = models.mlp([1, 3, 3], [5, 4], 3, seed=1)
    with remember_intervals(IntervalMemo()):
        bounds.logit_bounds(net, X, pert, method)  # fills the caches
        net[1].bias.data.add_(1.0)
        lower, upper = bounds.logit_bounds(net, X, pert, method)
    z = attack.perturbed_forward(net, X, pert)  # the nominal network as it is now
    assert (lower <= z).all() and (z <= upper).all()


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown-fast", "crown"])
def test_float32_bounds_of_float64_images_contain_the_images_themselves(method: str):
    """Images finer than the format the bounds are computed in are not rounded to it: their box
    is, outward. Rounding x = 0.1 to float32 moves it by 1.5e-9, which a first weight of 1e5
    makes 1.5e-4 at the logit, outside bounds of width 1e-10 (found by fuzzing against MILP
    witnesses)."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(1, 2), nn.ReLU(), nn.Linear(2, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[1e5], [0.0]]))
        net[1].bias.copy_(torch.tensor([-1e4, 0.0]))
        net[3].weight.copy_(torch.tensor([[1.0, 0.0]]))
        net[3].bias.zero_()
    X = torch.tensor([[[0.1]], [[0.3]]], dtype=torch.float64)
    y = torch.zeros(2, dtype=torch.long)
    for pert in (Perturbation(), Perturbation(1e-9, 0.0, 0.0, 0.0)):
        z = attack.perturbed_forward(net, X, pert)  # the float64 images' true logits
        lower, upper = bounds.logit_bounds(net, X, pert, method, dtype=torch.float32)
        assert lower.dtype == torch.float32
        assert (lower.double() <= z).all() and (z <= upper.double()).all(), (pert, lower, z)
        _, logits = bounds.margins_and_logits(net, X, y, pert, method, dtype=torch.float32)
        assert (logits.lower.double() <= z).all() and (z <= logits.upper.double()).all()
