"""The published fixed-point PTQ simulator: its grids, saturation reports, and a certified bound
that lies above the measured quantisation error on every image. Budget: ~5 s."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from qlib import data, models
from qlib.fixedpoint import (
    FixedPoint,
    activation_maxima,
    evaluate_fixed_point,
    fixed_point,
    ptq_sweep,
)
from qlib.quant import perturbation_between


@pytest.fixture(scope="module")
def digits(one_thread):
    """A small MLP trained on 8x8 digits, and the digits test split."""
    X, y = data.load("digits", "train")
    net = models.mlp([1, 8, 8], [32, 32], 10, seed=0)
    models.train(net, (X, y), epochs=15, lr=1e-2, batch_size=64, progress=False)
    return net, data.load("digits", "test")


def published_signed(x: torch.Tensor, bits: int, r: float) -> torch.Tensor:
    """``quantizeSigned`` as written in the published scripts (top end clipped only)."""
    return r * torch.minimum(
        2.0 ** (1 - bits) * torch.round(x / r * 2.0 ** (bits - 1)),
        torch.tensor(1 - 2.0 ** (1 - bits), dtype=x.dtype),
    )


def published_unsigned(x: torch.Tensor, bits: int, r: float) -> torch.Tensor:
    """``hardtanh(x, 0, R)`` then ``quantizeUnsigned`` as published."""
    x = x.clamp(0, r)
    return (
        0.5
        * r
        * torch.minimum(
            2.0 ** (1 - bits) * torch.round(x * (2 / r) * 2.0 ** (bits - 1)),
            torch.tensor(2 - 2.0 ** (1 - bits), dtype=x.dtype),
        )
    )


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_grids_match_the_published_formulas(digits, bits):
    net, (X, _) = digits
    q = fixed_point(net, FixedPoint(weight_bits=bits, input_bits=bits, act_bits=bits))
    linears = [m for m in net if isinstance(m, nn.Linear)]
    for lin, (qW, qb), layer in zip(linears, q.params, q.layers, strict=True):
        W = lin.weight.detach().double()
        r = 2.0 ** torch.ceil(torch.log2(W.abs().max())).item()
        assert layer.weight_range == r and layer.weight_step == r * 2.0 ** (1 - bits)
        assert torch.equal(qW, published_signed(W, bits, r))
        b = lin.bias.detach().double()
        rb = 2.0 ** torch.ceil(torch.log2(b.abs().max())).item()
        assert torch.equal(qb, published_signed(b, bits, rb))
    # The first hidden activation of the simulation, rebuilt from the published formulas.
    x = X[:50].flatten(1).double()
    qx = published_signed(x, bits, 1.0)
    a = published_unsigned(torch.relu(qx @ q.params[0][0].T + q.params[0][1]), bits, 8.0)
    h = a
    for (W, b), layer in zip(q.params[1:], q.layers[1:], strict=True):
        h = h @ W.T + b
        if layer.act_range is not None:
            h = published_unsigned(torch.relu(h), bits, 8.0)
    assert torch.allclose(q.forward(X[:50]).logits, h, rtol=0, atol=1e-12)


def certified_configs():
    return [
        FixedPoint(weight_bits=4),  # the published setting: 4-bit inputs and activations
        FixedPoint(weight_bits=10, input_bits=10, act_bits=10),
        FixedPoint(weight_bits=8, input_bits=8, act_bits=6, act_range=1.0),  # activations clip
        FixedPoint(weight_bits=8, input_bits=8, act_bits=8, weight_range=0.125),  # weights clip
        FixedPoint(weight_bits=6, input_bits=8, act_bits=8, asymmetric=True),
        FixedPoint(weight_bits=12, input_bits=12, act_bits=12, act_range="pow2"),
    ]


@pytest.mark.parametrize("config", certified_configs(), ids=lambda c: repr(c)[10:60])
def test_certified_bound_is_above_the_measured_error_on_every_image(digits, config):
    net, (X, y) = digits
    calib = X[:200] if config.act_range == "pow2" else None
    res = evaluate_fixed_point(net, X, y, config, calib=calib, certify=len(X), method="crown-ibp")
    assert res.certified is not None and res.certified.shape == res.error.shape
    gap = res.certified - res.error
    assert (gap >= -1e-12).all(), f"bound below the measured error on {int((gap < -1e-12).sum())}"
    # Every quantised parameter lies in the box, and the box is at least the half step.
    q = fixed_point(net, config, calib)
    between = perturbation_between(copy.deepcopy(net).double(), q.to_module(net))
    assert between.eps_weight <= max(res.pert.eps_weight)
    assert between.eps_bias <= max(res.pert.eps_bias)
    for k, (layer, (qW, _)) in enumerate(zip(q.layers, q.params, strict=True)):
        W = [m for m in net if isinstance(m, nn.Linear)][k].weight.detach().double()
        assert (qW - W).abs().max().item() <= res.pert.eps_weight[k]
        assert res.pert.eps_weight[k] >= 0.5 * layer.weight_step


def test_certified_bound_is_informative_at_high_precision(digits):
    net, (X, y) = digits
    config = FixedPoint(weight_bits=12, input_bits=12, act_bits=12)
    res = evaluate_fixed_point(net, X, y, config, certify=100, method="crown-ibp")
    assert res.certified_mean < 0.05  # not vacuous
    assert res.accuracy == pytest.approx(res.float_accuracy, abs=0.01)


def test_saturation_is_counted_and_widens_the_box(digits):
    net, (X, y) = digits
    small = FixedPoint(weight_bits=8, input_bits=8, act_bits=8, weight_range=0.125)
    res = evaluate_fixed_point(net, X, y, small)
    expected = sum(
        int(((m.weight.detach().double() / (0.125 * 2.0**-7)).round() > 127).sum())
        + int(((m.weight.detach().double() / (0.125 * 2.0**-7)).round() < -128).sum())
        for m in net
        if isinstance(m, nn.Linear)
    )
    assert res.saturated_weights == expected > 0
    assert "weight" in res.widened and max(res.pert.eps_weight) > 0.5 * 0.125 * 2.0**-7
    assert res.row()["saturated_weights"] == expected
    # A weight exactly at the power-of-two range does not fit the signed grid: one saturation.
    lin = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    with torch.no_grad():
        lin[1].weight.fill_(0.25)
        lin[1].weight[0, 0] = 1.0
    one = evaluate_fixed_point(lin, X, y, FixedPoint(weight_bits=8))
    assert one.saturated_weights == 1 and one.layers[0].weight_error == pytest.approx(2.0**-7)
    # Activations past the clip range are counted; the box models the clip instead of widening.
    clip = evaluate_fixed_point(
        net, X, y, FixedPoint(act_range=0.5, act_bits=8, input_bits=8), certify=len(X)
    )
    assert clip.saturated_acts > 0 and clip.saturated_inputs > 0 and clip.widened == ()
    assert max(activation_maxima(net, X)) > 0.5 * (1 - 2.0**-8)  # why they saturate
    assert (clip.certified >= clip.error - 1e-12).all()


def test_box_holds_beyond_the_evaluated_images(digits):
    """The box comes from the grids, not from the data: it holds on inputs never seen."""
    net, (X, y) = digits
    config = FixedPoint(weight_bits=10, input_bits=10, act_bits=10, act_range=1.0)
    pert = fixed_point(net, config).perturbation()[0]
    gen = torch.Generator().manual_seed(0)
    Z = torch.rand(200, 1, 8, 8, generator=gen) ** 0.3  # brighter than digits: more saturation
    res = evaluate_fixed_point(net, Z, y[:200], config, certify=200, method="crown-ibp")
    assert res.pert == pert and res.saturated_inputs > 0 and res.saturated_acts > 0
    assert (res.certified >= res.error - 1e-12).all()


def test_sweep_and_bit_widths(digits):
    net, (X, y) = digits
    results = ptq_sweep({"a": net, "b": net}, X, y, [2, 8, 16], progress=False)
    assert [(r.model, r.config.weight_bits) for r in results] == [
        (m, b) for m in "ab" for b in (2, 8, 16)
    ]
    assert results[0].error_max >= results[2].error_max
    exact = evaluate_fixed_point(net, X, y, FixedPoint(32, 32, 32, act_range=64.0))
    assert exact.error_max < 1e-6 and exact.accuracy == exact.float_accuracy


@pytest.mark.parametrize("bits", [1, 33, 0, 2.5, True, "8"])
def test_bits_outside_2_to_32_are_refused(bits):
    for name in ("weight_bits", "input_bits", "act_bits", "bias_bits"):
        with pytest.raises(ValueError, match=rf"{name} must be an integer in \[2, 32\]"):
            FixedPoint(**{name: bits})


def test_bad_input_is_refused(digits):
    net, (X, y) = digits
    cnn = models.cnn([1, 8, 8], 10, channels=[4], hidden=8)
    with pytest.raises(ValueError, match=r"layer 0 \(Conv2d\).*only MLPs"):
        evaluate_fixed_point(cnn, X, y)
    with pytest.raises(TypeError, match="nn.Sequential"):
        fixed_point(nn.Linear(64, 10))
    with pytest.raises(ValueError, match="followed by a ReLU"):
        fixed_point(nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.Linear(8, 10)))
    with pytest.raises(ValueError, match="act_range='pow2' needs calibration"):
        fixed_point(net, FixedPoint(act_range="pow2"))
    with pytest.raises(ValueError, match="act_range must be"):
        FixedPoint(act_range=-1.0)
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        evaluate_fixed_point(net, X * 2, y)
    with pytest.raises(ValueError, match="certify"):
        evaluate_fixed_point(net, X, y, certify=-1)
    with pytest.raises(ValueError, match="models is empty"):
        ptq_sweep({}, X, y)


def test_simulator_is_reexported_from_qlib_quant():
    from qlib import fixedpoint, quant

    for name in fixedpoint.__all__:
        assert getattr(quant, name) is getattr(fixedpoint, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        quant.nope  # noqa: B018
