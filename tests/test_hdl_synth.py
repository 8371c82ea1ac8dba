"""yosys synthesis helper (qlib.hdl.synth) on small blocks of the converter.

Skipped with the reason when yosys is missing. Budget: about 5 s.
"""

import os
import shutil

import pytest

from qlib.hdl import sim, synth

pytestmark = [
    pytest.mark.hdl,
    pytest.mark.skipif(
        shutil.which("yosys") is None, reason="yosys not installed (Debian package yosys)"
    ),
]


def test_multiplier_maps_to_a_dsp_and_cells_are_counted():
    # synth_ice40 (about 1 s); synth_xilinx spends seconds loading its cell library first
    r = synth.synthesize("nc_bf16_mul", target="ice40")
    assert r.dsps == 1 and r.luts > 20 and r.ffs == 0  # combinational, one 8x8 product
    assert r.cells["SB_MAC16"] == 1 and r.top == "nc_bf16_mul"


def test_ice40_target_and_parameters():
    r = synth.synthesize("nc_fifo", target="ice40", params={"WIDTH": 8, "DEPTH": 4})
    assert r.params == {"WIDTH": 8, "DEPTH": 4} and r.ffs > 0 and r.luts > 0


def test_bad_target_and_missing_tool(monkeypatch):
    with pytest.raises(ValueError, match="target 'asic'; expected one of"):
        synth.synthesize("nc_lane", target="asic")
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(
        sim.ToolMissing, match="yosys not found on PATH: install the Debian package yosys"
    ):
        synth.synthesize("nc_lane")


@pytest.mark.hdl_long
@pytest.mark.skipif(
    os.environ.get("QLIB_TEST_PROFILE") != "full",
    reason="place and route takes about 20 s: set QLIB_TEST_PROFILE=full",
)
@pytest.mark.skipif(shutil.which("nextpnr-ice40") is None, reason="nextpnr-ice40 not installed")
def test_place_and_route_one_lane_gives_a_frequency():
    r = synth.place_and_route_ice40()
    assert 1 < r.fmax_mhz < 500 and r.utilisation["ICESTORM_DSP"].startswith("3/")


def test_whole_design_elaborates_as_plain_verilog_without_latches_or_loops(tmp_path):
    synth.check("nc_top", params={"LANES": 2})
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "latch.v").write_text(
        "module latch(input wire e, input wire d, output reg q);\nalways @(*) if (e) q = d;\nendmodule\n"
    )
    with pytest.raises(RuntimeError, match="yosys check of latch failed"):
        synth.check("latch", hdl_dir=tmp_path)
