"""The bit-exact model of the number converter (qlib.hdl.model), without a simulator.

Budget: about 15 s (most of it ModelOpt's import for the fake-quantisation comparison).
"""

import ml_dtypes
import numpy as np
import pytest
import torch

from qlib import models
from qlib.hdl import model as hm

SEED = 20261130


def test_pack_unpack_round_trip_every_width():
    rng = np.random.default_rng(SEED)
    for n in range(hm.MIN_BITS, hm.MAX_BITS + 1):
        for count in (0, 1, 7, 16, 33):
            v = rng.integers(-(1 << (n - 1)), 1 << (n - 1), count)
            if count >= 2:
                v[:2] = [-(1 << (n - 1)), (1 << (n - 1)) - 1]
            w = hm.pack(v, n)
            assert len(w) == hm.words_needed(count, n) == -(-count * n // 16)
            assert np.array_equal(hm.unpack(w, n, count), v), (n, count)


def test_pack_layout_straddles_words():
    # 3-bit values 1..6: bits 0-2, 3-5, ..., the sixth value spans bits 15-17 of the stream
    w = hm.pack([1, 2, 3, -4, -3, -1], 3)
    bits = 0
    for j, v in enumerate([1, 2, 3, -4, -3, -1]):
        bits |= (v & 7) << (3 * j)
    assert w.tolist() == [bits & 0xFFFF, bits >> 16]
    assert hm.unpack(w, 3, 6).tolist() == [1, 2, 3, -4, -3, -1]


def test_short_stream_pads_with_zeros():
    w = hm.pack([5, -6, 7, 7, 1, 2], 5)  # 30 bits: two words
    # the fourth value keeps its bit 0 (stream bit 15, in w[0]); its other bits read as zeros
    assert hm.unpack(w[:1], 5, 6).tolist() == [5, -6, 7, 1, 0, 0]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: hm.pack([1, 2], 1), "bit width must be an integer in 2..16, got 1"),
        (lambda: hm.pack([1, 2], 17), "got 17"),
        (lambda: hm.pack([4], 3), "4 does not fit in 3 signed bits"),
        (lambda: hm.pack([[1]], 3), "1-D integer array"),
        (lambda: hm.lane_split(np.arange(5), 2), "5 values do not split evenly over 2 lanes"),
        (lambda: hm.upstream([], 4, 0x3F80, 3), "at least one word"),
        (lambda: hm.downstream([], 4, 0x3F800000), "at least one value"),
    ],
)
def test_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_int_to_bf16_exhaustive_ties_to_even():
    v = np.arange(-(1 << 15), 1 << 15)
    got = hm.int_to_bf16(v)
    assert np.array_equal(got, v.astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16))
    # 257 lies halfway between 256 and 258: ties to even keeps 256; 259 goes to 260
    assert hm.bits_bf16(hm.int_to_bf16([257, 259])).tolist() == [256.0, 260.0]


def test_bf16_mul_against_float64_rounding():
    rng = np.random.default_rng(SEED)
    a = rng.integers(0, 1 << 16, 20000).astype(np.uint16)
    b = rng.integers(0, 1 << 16, 20000).astype(np.uint16)
    got = hm.bf16_mul(a, b)
    fa, fb = hm.bits_bf16(a).astype(np.float64), hm.bits_bf16(b).astype(np.float64)
    normal = (
        ((a & 0x7F80) != 0)
        & ((b & 0x7F80) != 0)
        & ((a & 0x7F80) != 0x7F80)
        & ((b & 0x7F80) != 0x7F80)
    )
    with np.errstate(over="ignore", invalid="ignore"):
        p = fa * fb
        ok = normal & (np.abs(p) >= 2.0**-126)
        # independent rounding: nearest even on the exact product via float32 (exact) to bf16
        want = p[ok].astype(np.float32).astype(ml_dtypes.bfloat16).view(np.uint16)
    assert np.array_equal(got[ok], want)
    assert np.all(got[normal & (np.abs(p) < 2.0**-126)] & 0x7FFF == 0)  # flushed to zero


def test_bf16_mul_special_values():
    one, inf, nan, zero, sub = 0x3F80, 0x7F80, 0x7FC1, 0x0000, 0x0001
    assert hm.bf16_mul(np.uint16(inf), np.uint16(0xBF80)) == 0xFF80
    assert hm.bf16_mul(np.uint16(inf), np.uint16(zero)) == hm.CANONICAL_NAN
    assert hm.bf16_mul(np.uint16(nan), np.uint16(one)) == hm.CANONICAL_NAN
    assert hm.bf16_mul(np.uint16(sub), np.uint16(0x7F00)) == 0  # subnormal input flushed
    assert hm.bf16_mul(np.uint16(0x7F7F), np.uint16(0x4000)) == inf  # overflow
    assert hm.bf16_mul(np.uint16(0x8000), np.uint16(one)) == 0x8000  # signed zero


def test_quantize_matches_torch_round_half_even_and_clamp():
    rng = np.random.default_rng(SEED)
    x = hm.bf16_bits(rng.normal(0, 40, 5000))
    x[:6] = hm.bf16_bits([0.5, 1.5, 2.5, -0.5, -1.5, -2.5])
    s = np.float32(0.75)
    for n in (2, 4, 8, 16):
        for narrow in (False, True):
            codes, _ = hm.quantize_bf16(x, s, n, narrow)
            hi = 2 ** (n - 1) - 1
            lo = -hi if narrow else -hi - 1
            t = torch.from_numpy(hm.bits_bf16(x)).mul(torch.tensor(s)).round().clamp(lo, hi)
            assert np.array_equal(codes, t.numpy().astype(np.int64)), (n, narrow)
    codes, _ = hm.quantize_bf16(x[:6], np.float32(1.0), 8)
    assert codes.tolist() == [0, 2, 2, 0, -2, -2]


def test_quantize_bad_inputs_flags():
    x = np.array([0x7FC0, 0x7F80, 0xFF80, 0x3F80], np.uint16)  # NaN, +inf, -inf, 1.0
    codes, flags = hm.quantize_bf16(x, np.float32(1.0), 4)
    assert codes.tolist() == [0, 7, -8, 1]
    assert flags == {"nan": True, "inf": True, "sat": True}
    r = hm.downstream(x, 4, int(hm.f32_bits(1.0)), narrow=True)
    assert r.codes.tolist() == [0, 7, -7, 1]
    assert set(hm.status_names(r.status)) == {"DN_DONE", "DN_ERR_NAN", "DN_ERR_INF", "DN_SAT"}
    zero = hm.downstream(hm.bf16_bits([1.0, -3.0]), 4, 0)
    assert zero.codes.tolist() == [0, 0] and "DN_ERR_SCALE" in hm.status_names(zero.status)


def test_upstream_bad_inputs_flags():
    w = hm.pack(np.arange(-4, 4), 4)  # 8 values, 2 words
    ok = hm.upstream(w, 4, 0x3F80, 8)
    assert hm.status_names(ok.status) == ["UP_DONE"]
    assert hm.bits_bf16(ok.values).tolist() == list(range(-4, 4))
    assert "UP_ERR_WIDTH" in hm.status_names(hm.upstream(w, 17, 0x3F80, 8).status)
    assert len(hm.upstream(w, 1, 0x3F80, 8).values) == 0
    assert "UP_ERR_SCALE" in hm.status_names(hm.upstream(w, 4, 0x0000, 8).status)
    assert "UP_ERR_SCALE" in hm.status_names(hm.upstream(w, 4, 0x7FC0, 8).status)
    short = hm.upstream(w[:1], 4, 0x3F80, 8)
    assert "UP_ERR_SHORT" in hm.status_names(short.status)
    assert short.ints.tolist() == [-4, -3, -2, -1, 0, 0, 0, 0]
    long = hm.upstream(np.concatenate([w, w]), 4, 0x3F80, 8)
    assert "UP_ERR_LONG" in hm.status_names(long.status) and long.ints.tolist() == ok.ints.tolist()
    empty = hm.upstream(w, 4, 0x3F80, 0)
    assert empty.words_read == 0 and hm.status_names(empty.status) == ["UP_DONE"]


def test_fakequant_codes_equal_hardware_codes_on_a_real_layer():
    """The exploration's fake quantisation and the converter's quantiser give the same integer
    codes for every weight of a small CNN's layers at every bit width (full range, as the
    exploration configures ModelOpt), once the weights are in the accelerator's bfloat16."""
    from qlib.explore import fakequant

    net = models.cnn((1, 12, 12), 10, channels=(4, 8), hidden=16, seed=3)
    with torch.no_grad():
        for p in net.parameters():  # the accelerator holds bfloat16 weights
            p.copy_(p.to(torch.bfloat16).float())
    calib = torch.randn(8, 1, 12, 12, generator=torch.Generator().manual_seed(SEED))
    q = fakequant.quantize(net, calib, method="max")
    mods = dict(q.model.named_modules())
    checked = 0
    for n in range(hm.MIN_BITS, hm.MAX_BITS + 1):
        q.set_bits([8, n] * len(q.layers))
        for name in q.layers:
            m = mods[name]
            w = m.weight.detach()
            with torch.no_grad():
                fq = m.weight_quantizer(w)  # ModelOpt quantiser on the qlib backend
            assert not m.weight_quantizer.narrow_range
            amax = w.abs().amax().float()
            scale = torch.tensor(2.0 ** (n - 1) - 1.0) / amax  # fakequant's float32 scale
            want = torch.round(fq.float() * scale).to(torch.int64).numpy().ravel()
            x = hm.bf16_bits(w.numpy().ravel())
            inv_bits = int(hm.f32_bits(scale.numpy()))
            got = hm.downstream(x, n, inv_bits).codes
            assert np.array_equal(got, want), (name, n, np.flatnonzero(got != want)[:5])
            checked += got.size
    assert checked > 15 * 1000
