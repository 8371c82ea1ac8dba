"""Helpers around the simulated converter: counters-based rates, layers through the RTL, results
files of the exploration, VCD waveforms. Skipped with the reason without iverilog.
Budget: about 8 s.
"""

import shutil

import numpy as np
import pytest
import torch

from qlib import models
from qlib.hdl import layers, measure, sim, wave
from qlib.hdl import model as hm

pytestmark = [
    pytest.mark.hdl,
    pytest.mark.skipif(
        shutil.which("iverilog") is None, reason="iverilog not installed (Debian package iverilog)"
    ),
]


@pytest.fixture(scope="module")
def vvp(tmp_path_factory):
    return sim.build_stream_tb(2, tmp_path_factory.mktemp("tb"))


def test_rate_is_one_value_per_lane_per_cycle_and_halves_under_back_pressure(vvp):
    full = measure.rate(vvp, 2, 7, counts=(32, 160))
    assert full.up_steady == 1.0 and full.dn_steady == 1.0 and full.up_stall_frac == 0
    half = measure.rate(vvp, 2, 16, counts=(32, 160), ready_pct=50)
    assert 0.3 < half.up_steady < 0.7 and half.up_stall_frac > 0.2


def test_layer_words_and_round_trip_through_the_rtl(vvp):
    net = models.mlp((1, 4, 4), [9], 3, seed=1)
    rows = layers.layer_words(net, [3, 16])
    assert [(r.weights, r.packed_words, r.words_16bit) for r in rows] == [
        (144, 27, 144),
        (27, 27, 27),
    ]
    with pytest.raises(ValueError, match="weight_bits has 1 entries, the network has 2"):
        layers.layer_words(net, [3])
    w = net[1].weight.detach()  # 9 x 16 = 144 weights, not a multiple of... 2 lanes: padded
    r = layers.convert_layer(vvp, 2, w, 5)
    assert not r.errors and r.weights == 144
    x = torch.from_numpy(hm.bits_bf16(hm.bf16_bits(w.numpy().ravel())))
    inv = np.array([layers.fakequant_inverse_scale(x, 5)], np.uint32).view(np.float32)[0]
    assert np.array_equal(r.codes, torch.round(x * torch.tensor(inv)).clamp(-16, 15).numpy())
    # dequantised = code * bf16(1/inv), within half a step of the weight
    assert np.abs(r.dequantised - x.numpy()).max() <= 0.51 / inv + 1e-6


def test_front_member_reads_the_cheapest_feasible_point(tmp_path):
    from qlib.explore.store import Record, Store

    assert layers.front_member("toy", folder=tmp_path) is None
    with Store(tmp_path / "toy-abc-123.sqlite", "abc", "toy") as s:
        s.add(Record(0, (8, 8, 8, 8), (-0.9, 10.0), 0.9, -0.1, 0.1))
        s.add(Record(0, (4, 3, 8, 2), (-0.8, 4.0), 0.8, -0.05, 0.1))
        s.add(Record(0, (2, 2, 2, 2), (-0.1, 1.0), 0.1, 0.5, 0.1))  # infeasible
    m = layers.front_member("toy", folder=tmp_path)
    assert m.genome == (4, 3, 8, 2) and m.weight_bits == [3, 2] and m.evaluated == 3


def test_vcd_excerpt(vvp, tmp_path):
    _, words = measure.random_job(5, 12, 2, np.random.default_rng(0))
    vcd = tmp_path / "w.vcd"
    sim.run_stream(vvp, 2, n=5, up_words=words, count=12, vcd=vcd)
    d = "tb_stream.dut."
    t0 = wave.first_time(vcd, d + "s_up_axis_tvalid")
    w = wave.read_vcd(
        vcd,
        [d + "m_up_axis_tvalid", d + "lane[0].u_lane.u_up.ptr[3:0]"],
        clock="tb_stream.clk",
        start=t0,
        cycles=20,
    )
    ptr = w.values[d + "lane[0].u_lane.u_up.ptr[3:0]"]
    assert set(np.diff(ptr) % 16) <= {0, 5} and (np.diff(ptr) % 16 == 5).sum() >= 8
    assert w.widths[d + "m_up_axis_tvalid"] == 1 and w.values[d + "m_up_axis_tvalid"].max() == 1
    with pytest.raises(KeyError, match="no signal"):
        wave.read_vcd(vcd, [d + "nope"], clock="tb_stream.clk")
    import matplotlib

    matplotlib.use("Agg")
    assert wave.plot_waves(w) is not None


def test_front_member_prefers_the_search_over_a_tagged_variant(tmp_path):
    from qlib.explore.store import Record, Store

    with Store(tmp_path / "toy-abc-123.sqlite", "abc", "toy") as s:
        s.add(Record(0, (4, 3, 8, 2), (-0.8, 4.0), 0.8, -0.05, 0.1))
    with Store(tmp_path / "toy-abc-123-random.sqlite", "abc", "toy") as s:  # written later
        s.add(Record(0, (5, 5, 5, 5), (-0.7, 5.0), 0.7, -0.05, 0.1))
    assert layers.front_member("toy", folder=tmp_path).genome == (4, 3, 8, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"up_words": np.zeros((3, 4))}, r"up_words: expected shape \[beats, 2\], got \(3, 4\)"),
        ({"dn_values": np.zeros(5)}, r"dn_values: expected shape \[beats, 2\], got \(5,\)"),
        ({"ready_pct": 0}, "ready_pct must be in 1..100, got 0"),
        ({"valid_pct": 101}, "valid_pct must be in 1..100, got 101"),
    ],
)
def test_run_stream_bad_arguments(vvp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sim.run_stream(vvp, 2, n=4, **kwargs)


def test_build_and_sources_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="lanes must be in 1..64, got 0"):
        sim.build_stream_tb(0, tmp_path)
    with pytest.raises(FileNotFoundError, match="no Verilog sources in"):
        sim.sources(tmp_path)
