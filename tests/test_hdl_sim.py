"""The Verilog converter under Icarus, value by value against qlib.hdl.model.

Runs hdl/tb/tb_stream.v (plain Verilog driver) and the self-checking hdl/tb/tb_selfcheck.v.
Skipped with the reason when iverilog is missing. Budget: about 15 s.
"""

import os
import shutil
import subprocess

import numpy as np
import pytest

from qlib.hdl import model as hm
from qlib.hdl import sim

pytestmark = [
    pytest.mark.hdl,
    pytest.mark.skipif(
        shutil.which("iverilog") is None or shutil.which("vvp") is None,
        reason="iverilog/vvp not installed (Debian package iverilog)",
    ),
]
SEED = 1130
LANES = 2
FULL = os.environ.get("QLIB_TEST_PROFILE") == "full"


@pytest.fixture(scope="module")
def vvp(tmp_path_factory):
    return sim.build_stream_tb(LANES, tmp_path_factory.mktemp(f"tb_stream_l{LANES}"))


def _stimulus(rng, n, count, lanes=LANES):
    vals = rng.integers(-(1 << (n - 1)), 1 << (n - 1), (count, lanes))
    vals[: min(2, count), :] = np.array([[-(1 << (n - 1))], [(1 << (n - 1)) - 1]])[: min(2, count)]
    words = np.stack([hm.pack(vals[:, i], n) for i in range(lanes)], axis=1)
    return vals, words


def _run_and_check(
    vvp,
    *,
    n,
    words,
    count,
    scale,
    dn=None,
    inv=0x3F800000,
    narrow=False,
    ready_pct=100,
    valid_pct=100,
    seed=SEED,
):
    r = sim.run_stream(
        vvp,
        LANES,
        n=n,
        up_words=words,
        count=count,
        scale_bits=scale,
        dn_values=dn,
        inv_scale_bits=inv,
        narrow=narrow,
        ready_pct=ready_pct,
        valid_pct=valid_pct,
        seed=seed,
    )
    assert not r.timed_out
    errs = sim.check_against_model(
        r,
        n=n,
        up_words=words,
        count=count,
        scale_bits=scale,
        dn_values=dn,
        inv_scale_bits=inv,
        narrow=narrow,
    )
    assert not errs, f"n={n} count={count} scale={scale:#x} inv={inv:#x} seed={seed}: {errs}"
    return r


@pytest.mark.parametrize("n", range(2, 17))
def test_every_width_random_streams_and_back_pressure(vvp, n):
    rng = np.random.default_rng([SEED, n])
    count = 41
    _, words = _stimulus(rng, n, count)
    scale = int(hm.bf16_bits(rng.uniform(0.01, 4)))
    # downstream input: values around the quantisation grid, some beyond it (saturation)
    # even n: a power-of-two inverse scale, so the first rows are exact ties (ties to even)
    inv = np.float32(2.0 ** int(rng.integers(-3, 6)) if n % 2 == 0 else rng.uniform(0.5, 50))
    x = rng.normal(0, 0.6, (count, LANES)) * (1 << (n - 1)) / inv
    x[:4] = np.array([[0.5], [1.5], [-2.5], [-0.5]]) / inv
    dn = hm.bf16_bits(x)
    r = _run_and_check(
        vvp,
        n=n,
        words=words,
        count=count,
        scale=scale,
        dn=dn,
        inv=int(hm.f32_bits(inv)),
        narrow=bool(n % 2),
        ready_pct=100,
    )
    # with ready held high a lane moves one value per cycle after the pipeline fills
    assert r.up_counters["STALLS"] == 0 and r.up_counters["CYCLES"] <= count + 6
    assert r.up_counters["WORDS_IN"] == len(words) and r.up_counters["VALUES_OUT"] == count
    r2 = _run_and_check(
        vvp,
        n=n,
        words=words,
        count=count,
        scale=scale,
        dn=dn,
        inv=int(hm.f32_bits(inv)),
        ready_pct=50,
        valid_pct=70,
        seed=SEED + n,
    )
    assert r2.up_counters["STALLS"] > 0 and r2.up_counters["VALUES_OUT"] == count


def test_steady_state_rate_is_one_value_per_lane_per_cycle(vvp):
    rng = np.random.default_rng(SEED)
    for n in (3, 16):
        cycles = []
        for count in (64, 192):
            _, words = _stimulus(rng, n, count)
            r = _run_and_check(vvp, n=n, words=words, count=count, scale=0x3F80)
            cycles.append(r.up_counters["CYCLES"])
        assert (cycles[1] - cycles[0]) == 128, (n, cycles)


@pytest.mark.parametrize("n_reg", [0, 1, 17, 32, 0x102])
def test_bad_width_is_refused_with_a_flag(vvp, n_reg):
    words = np.ones((2, LANES), np.int64)
    r = sim.run_stream(
        vvp, LANES, n=n_reg, up_words=words, count=4, dn_values=np.full((2, LANES), 0x3F80)
    )
    assert hm.status_names(r.up_status) == ["UP_DONE", "UP_ERR_WIDTH"]
    assert set(hm.status_names(r.dn_status)) == {
        "UP_DONE",
        "UP_ERR_WIDTH",
        "DN_DONE",
        "DN_ERR_WIDTH",
    }
    assert r.up_values.size == 0 and r.dn_words.size == 0
    assert r.up_counters["WORDS_IN"] == 0 and r.dn_counters["VALUES_IN"] == 0


def test_zero_and_special_scales(vvp):
    rng = np.random.default_rng(SEED)
    _, words = _stimulus(rng, 6, 10)
    dn = hm.bf16_bits(rng.normal(0, 5, (10, LANES)))
    for scale, inv in [
        (0x0000, 0),
        (0x8000, 0x80000000),
        (0x7F80, 0x7F800000),
        (0x7FC0, 0x7FC00000),
        (0x0001, 0x00000001),
    ]:
        r = _run_and_check(vvp, n=6, words=words, count=10, scale=scale, dn=dn, inv=inv)
        assert "UP_ERR_SCALE" in hm.status_names(r.up_status)
        assert "DN_ERR_SCALE" in hm.status_names(r.dn_status)
    # the largest and smallest normal scales: products overflow to infinity, quantised codes
    # saturate or vanish
    _, words16 = _stimulus(rng, 16, 10)
    for scale, inv in [(0x7F00, 0x7F000000), (0x0080, 0x00800000), (0x7F7F, 0x7F7FFFFF)]:
        r = _run_and_check(vvp, n=16, words=words16, count=10, scale=scale, dn=dn, inv=inv)
        assert hm.status_names(r.up_status) == ["UP_DONE"]
    assert (r.up_values & 0x7FFF == 0x7F80).any()  # infinities from overflow


def test_nan_and_infinity_inputs(vvp):
    dn = np.array([[0x7FC0, 0x3F80], [0x7F80, 0xFF80], [0x4000, 0xFFC1], [0x0001, 0x8000]])
    r = _run_and_check(
        vvp,
        n=4,
        words=np.zeros((1, LANES)),
        count=1,
        scale=0x3F80,
        dn=dn,
        inv=int(hm.f32_bits(3.0)),
    )
    assert {"DN_ERR_NAN", "DN_ERR_INF", "DN_SAT"} <= set(hm.status_names(r.dn_status))


@pytest.mark.parametrize("n, count, keep", [(5, 6, 1), (3, 40, 5), (16, 9, 3), (7, 9, 3)])
def test_short_and_long_packets(vvp, n, count, keep):
    rng = np.random.default_rng([SEED, n])
    _, words = _stimulus(rng, n, count)
    short = _run_and_check(vvp, n=n, words=words[:keep], count=count, scale=0x3F80)
    assert "UP_ERR_SHORT" in hm.status_names(short.up_status)
    assert short.up_counters["VALUES_OUT"] == count
    extra = np.concatenate([words, words[:keep]])
    long = _run_and_check(vvp, n=n, words=extra, count=count, scale=0x3F80)
    assert "UP_ERR_LONG" in hm.status_names(long.up_status)
    assert long.up_counters["WORDS_IN"] == len(extra)


def test_zero_length_and_one_value_streams(vvp):
    words = np.array([[0x5A5A, 0xFFFF]])
    empty = _run_and_check(vvp, n=8, words=words, count=0, scale=0x3F80)
    assert empty.up_values.size == 0 and empty.up_counters["WORDS_IN"] == 0
    one = _run_and_check(
        vvp, n=8, words=words, count=1, scale=0x3F80, dn=np.array([[0x4040, 0xC040]])
    )  # 3.0, -3.0
    assert one.dn_words.tolist() == [[3, 0xFD]] and one.dn_last.tolist() == [True]
    assert hm.bits_bf16(one.up_values).tolist() == [[90.0, -1.0]]


def test_missing_tool_is_named(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(
        sim.ToolMissing, match="iverilog not found on PATH: install the Debian package iverilog"
    ):
        sim.build_stream_tb(1, tmp_path)


def test_compile_error_is_reported(tmp_path):
    bad = tmp_path / "bad.v"
    bad.write_text("module bad; wire [3:0] x = ; endmodule\n")
    with pytest.raises(RuntimeError, match="iverilog failed for bad"):
        sim.compile_verilog("bad", tmp_path / "bad.vvp", [bad])


def test_plain_verilog_selfcheck_bench(tmp_path):
    tb = sim.HDL_DIR / "tb"
    out = sim.compile_verilog(
        "tb_selfcheck", tmp_path / "tb.vvp", [*sim.sources(), tb / "tb_selfcheck.v"], include=[tb]
    )
    res = subprocess.run(["vvp", "-n", str(out)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "PASS" in res.stdout and "FAIL" not in res.stdout, res.stdout


@pytest.mark.hdl_long
@pytest.mark.skipif(not FULL, reason="long random run: set QLIB_TEST_PROFILE=full")
@pytest.mark.parametrize("n", range(2, 17))
def test_long_random_streams(vvp, n):
    rng = np.random.default_rng([SEED, 99, n])
    for trial in range(4):
        count = int(rng.integers(1, 3000))
        _, words = _stimulus(rng, n, count)
        scale = int(hm.bf16_bits(rng.lognormal(0, 3)))
        x = hm.bf16_bits(rng.standard_cauchy((count, LANES)) * (1 << (n - 1)) / 7)
        _run_and_check(
            vvp,
            n=n,
            words=words,
            count=count,
            scale=scale,
            dn=x,
            inv=int(hm.f32_bits(rng.lognormal(1, 1))),
            narrow=bool(trial % 2),
            ready_pct=int(rng.integers(10, 101)),
            valid_pct=int(rng.integers(10, 101)),
            seed=SEED + trial,
        )
