"""cocotb tests of nc_top through cocotbext-axi (AXI-Lite master, AXI-Stream sources and sinks),
compared value by value with qlib.hdl.model.

One file, two roles (as cocotb's examples): the ``@cocotb.test`` coroutines run inside Icarus;
``test_nc_top_cocotb`` is the pytest entry that builds one directory per parameter set and runs
them with an explicit seed. Skipped with the reason when iverilog is missing. Long random runs
execute only with ``QLIB_TEST_PROFILE=full``. Budget: about 25 s.
"""

from __future__ import annotations

import logging
import os
import shutil

import numpy as np
import pytest

from qlib.hdl import model as hm

SEED = 424242
FULL = os.environ.get("QLIB_TEST_PROFILE") == "full"
R = hm.REGISTERS


# ----------------------------------------------------------------------------- in the simulator
try:
    import cocotb
    from cocotb.clock import Clock
    from cocotb.triggers import ClockCycles, RisingEdge, SimTimeoutError, with_timeout
    from cocotbext.axi import (
        AxiLiteBus,
        AxiLiteMaster,
        AxiStreamBus,
        AxiStreamFrame,
        AxiStreamSink,
        AxiStreamSource,
    )
except ImportError:  # pragma: no cover - the pytest entry skips with the reason
    cocotb = None


class Bench:
    """nc_top with its four streams and the register port."""

    def __init__(self, dut, rng: np.random.Generator):
        self.dut, self.rng = dut, rng
        self.lanes = int(dut.LANES.value)
        logging.getLogger("cocotb.nc_top").setLevel(logging.WARNING)  # bus drivers' chatter
        clk, rst = dut.clk, dut.rst
        self.axil = AxiLiteMaster(AxiLiteBus.from_prefix(dut, "s_axil"), clk, rst)
        self.up_src = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_up_axis"), clk, rst)
        self.up_snk = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_up_axis"), clk, rst)
        self.dn_src = AxiStreamSource(AxiStreamBus.from_prefix(dut, "s_dn_axis"), clk, rst)
        self.dn_snk = AxiStreamSink(AxiStreamBus.from_prefix(dut, "m_dn_axis"), clk, rst)

    async def reset(self):
        cocotb.start_soon(Clock(self.dut.clk, 10, unit="ns").start())
        self.dut.rst.value = 1
        await ClockCycles(self.dut.clk, 4)
        self.dut.rst.value = 0
        await RisingEdge(self.dut.clk)

    def pressure(self, ready_pct: int, valid_pct: int) -> None:
        """Random back-pressure on the sinks and gaps in the sources (pause generators)."""
        rng = np.random.default_rng(self.rng.integers(1 << 31))

        def gen(pct):
            while True:
                yield bool(rng.random() * 100 >= pct)

        for streams, pct in (
            ((self.up_snk, self.dn_snk), ready_pct),
            ((self.up_src, self.dn_src), valid_pct),
        ):
            for s in streams:
                s.set_pause_generator(gen(pct) if pct < 100 else None)
                if pct >= 100:
                    s.pause = False  # clearing the generator keeps its last value

    async def configure(self, n, scale_bits=0x3F80, inv_bits=0x3F800000, narrow=False, count=0):
        for name, v in (
            ("BITS", n),
            ("SCALE", scale_bits),
            ("INV_SCALE", inv_bits),
            ("NARROW", int(narrow)),
            ("NUM_VALUES", count),
        ):
            await self.axil.write_dword(R[name], v)

    async def wait_idle(self, busy: str, limit: int = 100_000) -> int:
        for _ in range(limit // 16):
            status = await self.axil.read_dword(R["STATUS"])
            if not status >> hm.STATUS_BITS[busy] & 1:
                return status
            await ClockCycles(self.dut.clk, 16)
        raise AssertionError(f"{busy} still set after {limit} cycles")

    async def counters(self, side: str) -> dict[str, int]:
        names = [k for k in R if k.startswith(side + "_")]
        return {k: await self.axil.read_dword(R[k]) for k in names}

    def _beats(self, a: np.ndarray) -> bytes:
        return np.ascontiguousarray(a, dtype="<u2").tobytes()

    def _unbeats(self, frame) -> np.ndarray:
        return np.frombuffer(bytes(frame.tdata), dtype="<u2").reshape(-1, self.lanes)

    async def _recv(self, sink, side: str, limit_us: int = 500):
        try:
            return await with_timeout(sink.recv(), limit_us, "us")
        except SimTimeoutError:
            status = await self.axil.read_dword(R["STATUS"])
            raise AssertionError(
                f"{side}: no complete packet after {limit_us} us; status "
                f"{hm.status_names(status)}, {await self.counters(side)}"
            ) from None

    async def upstream(self, words: np.ndarray, count: int):
        """Start an upstream job, send ``words`` [W, L] as one packet, collect the values."""
        await self.axil.write_dword(R["CTRL"], 1)
        if count and len(words):
            await self.up_src.send(AxiStreamFrame(self._beats(words)))
        got = (
            self._unbeats(await self._recv(self.up_snk, "UP"))
            if count
            else np.zeros((0, self.lanes))
        )
        status = await self.wait_idle("UP_BUSY")
        return got.astype(np.uint16), status, await self.counters("UP")

    async def downstream(self, values: np.ndarray):
        await self.axil.write_dword(R["CTRL"], 2)
        await self.dn_src.send(AxiStreamFrame(self._beats(values)))
        got = self._unbeats(await self._recv(self.dn_snk, "DN"))
        status = await self.wait_idle("DN_BUSY")
        return got.astype(np.uint16), status, await self.counters("DN")

    async def check_up(self, words, n, count, scale_bits=0x3F80, why=""):
        await self.configure(n, scale_bits=scale_bits, count=count)
        got, status, cnt = await self.upstream(words, count)
        refs = [hm.upstream(words[:, i], n, scale_bits, count) for i in range(self.lanes)]
        want = np.stack([r.values for r in refs], axis=1) if count else got
        assert np.array_equal(got, want), f"{why} n={n} count={count}: upstream values differ"
        assert status & 0x0F03 == refs[0].status, (
            f"{why} n={n}: status {hm.status_names(status)} vs {hm.status_names(refs[0].status)}"
        )
        assert cnt["UP_VALUES_OUT"] == count
        return status, cnt

    async def check_dn(self, values, n, inv_bits, narrow=False, why=""):
        await self.configure(n, inv_bits=inv_bits, narrow=narrow)
        got, status, cnt = await self.downstream(values)
        refs = [hm.downstream(values[:, i], n, inv_bits, narrow) for i in range(self.lanes)]
        want = np.stack([r.words for r in refs], axis=1)
        assert np.array_equal(got, want), f"{why} n={n} inv={inv_bits:#x}: packed words differ"
        ref_status = 0
        for r in refs:
            ref_status |= r.status
        assert status & 0x1F000C == ref_status, (
            f"{why} n={n}: status {hm.status_names(status)} vs {hm.status_names(ref_status)}"
        )
        assert cnt["DN_WORDS_OUT"] == len(want)
        return status, cnt


def _values(rng, n, count, lanes):
    v = rng.integers(-(1 << (n - 1)), 1 << (n - 1), (count, lanes))
    v[: min(2, count)] = np.array([[-(1 << (n - 1))], [(1 << (n - 1)) - 1]])[: min(2, count)]
    return v


def _pack(v, n):
    return np.stack([hm.pack(v[:, i], n) for i in range(v.shape[1])], axis=1)


if cocotb is not None:

    @cocotb.test(timeout_time=20, timeout_unit="ms")
    async def every_width_random_streams(dut):
        """n = 2..16: random and extreme values, random back-pressure and source gaps."""
        rng = np.random.default_rng(cocotb.RANDOM_SEED)
        tb = Bench(dut, rng)
        await tb.reset()
        for n in range(hm.MIN_BITS, hm.MAX_BITS + 1):
            tb.pressure(ready_pct=int(rng.integers(40, 101)), valid_pct=int(rng.integers(50, 101)))
            count = int(rng.integers(1, 40))
            v = _values(rng, n, count, tb.lanes)
            await tb.check_up(_pack(v, n), n, count, int(hm.bf16_bits(rng.uniform(0.01, 8))))
            inv = np.float32(2.0 ** int(rng.integers(-4, 6)))
            x = rng.normal(0, 0.7, (count, tb.lanes)) * (1 << (n - 1)) / inv
            x[: min(3, count)] = (np.array([[0.5], [1.5], [-2.5]]) / inv)[: min(3, count)]
            await tb.check_dn(hm.bf16_bits(x), n, int(hm.f32_bits(inv)), narrow=bool(n % 3 == 0))

    @cocotb.test(timeout_time=20, timeout_unit="ms")
    async def full_rate_and_back_pressure(dut):
        """Ready held high: one value per lane per cycle (from the counters); 50 % ready: about
        half a value per cycle and the stall counter counts the waiting cycles."""
        rng = np.random.default_rng(cocotb.RANDOM_SEED + 1)
        tb = Bench(dut, rng)
        await tb.reset()
        for n in (2, 7, 16):
            v = _values(rng, n, 100, tb.lanes)
            tb.pressure(100, 100)
            _, c = await tb.check_up(_pack(v, n), n, 100)
            assert c["UP_STALLS"] == 0 and c["UP_CYCLES"] <= 100 + 8, c
            tb.pressure(50, 100)
            _, c = await tb.check_up(_pack(v, n), n, 100)
            assert c["UP_STALLS"] > 20 and c["UP_CYCLES"] > 150, c

    @cocotb.test(timeout_time=20, timeout_unit="ms")
    async def bad_input(dut):
        """Width outside 2..16, zero/NaN/infinite scales, NaN and infinity in the input, short
        and long packets, zero-length and one-value jobs: as the model documents them."""
        rng = np.random.default_rng(cocotb.RANDOM_SEED + 2)
        tb = Bench(dut, rng)
        await tb.reset()
        L = tb.lanes
        for n_reg in (0, 1, 17, 0x10008):
            await tb.configure(n_reg, count=4)
            await tb.axil.write_dword(R["CTRL"], 3)
            await ClockCycles(dut.clk, 4)
            status = await tb.axil.read_dword(R["STATUS"])
            assert {"UP_ERR_WIDTH", "DN_ERR_WIDTH", "UP_DONE", "DN_DONE"} <= set(
                hm.status_names(status)
            ), (n_reg, hm.status_names(status))
            assert not status & 0b0101  # nothing runs
        v = _values(rng, 5, 12, L)
        for scale in (0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0x0003):
            status, _ = await tb.check_up(_pack(v, 5), 5, 12, scale, why="scale")
            assert "UP_ERR_SCALE" in hm.status_names(status)
        x = hm.bf16_bits(rng.normal(0, 9, (6, L)))
        x[1, 0], x[2, -1], x[3, 0], x[4, -1] = 0x7FC0, 0x7F80, 0xFF80, 0xFFFF
        for inv in (0, 0x80000000, 0x7F800000, 0x7FC00000, 1, int(hm.f32_bits(0.7))):
            status, _ = await tb.check_dn(x, 6, inv, why="nan/inf")
            assert {"DN_ERR_NAN", "DN_ERR_INF"} <= set(hm.status_names(status))
        for n, count in ((3, 11), (13, 5), (16, 4)):
            w = _pack(_values(rng, n, count, L), n)
            status, _ = await tb.check_up(w[:-1], n, count, why="short")
            assert "UP_ERR_SHORT" in hm.status_names(status)
            status, _ = await tb.check_up(np.concatenate([w, w]), n, count, why="long")
            assert "UP_ERR_LONG" in hm.status_names(status)
        status, cnt = await tb.check_up(np.zeros((1, L)), 9, 0, why="empty")
        assert cnt["UP_WORDS_IN"] == 0
        await tb.check_up(np.full((1, L), 0x1FF), 9, 1, why="one value")
        await tb.check_dn(np.full((1, L), 0xC2F6), 9, int(hm.f32_bits(1.0)), why="one value")

    @cocotb.test(timeout_time=20, timeout_unit="ms")
    async def registers(dut):
        """Read-write registers read back what was written (byte strobes honoured), LANES reads
        the parameter, counters are read-only."""
        tb = Bench(dut, np.random.default_rng(cocotb.RANDOM_SEED + 4))
        await tb.reset()
        assert await tb.axil.read_dword(R["LANES"]) == tb.lanes
        for name, v in (
            ("BITS", 0x1234_5678),
            ("NARROW", 1),
            ("SCALE", 0x0000_BF80),
            ("INV_SCALE", 0x4049_0FDB),
            ("NUM_VALUES", 0xFFFF_FFFF),
        ):
            await tb.axil.write_dword(R[name], v)
            assert await tb.axil.read_dword(R[name]) == v, name
        await tb.axil.write(R["BITS"] + 1, b"\x00")  # one byte lane: bits 15..8 only
        assert await tb.axil.read_dword(R["BITS"]) == 0x1234_0078
        await tb.axil.write_dword(R["UP_CYCLES"], 123)  # read-only: ignored
        assert await tb.axil.read_dword(R["UP_CYCLES"]) == 0

    @cocotb.test(
        skip=os.environ.get("QLIB_TEST_PROFILE") != "full", timeout_time=500, timeout_unit="ms"
    )
    async def long_random_streams(dut):
        """Full profile only: long streams per width under random back-pressure."""
        rng = np.random.default_rng(cocotb.RANDOM_SEED + 3)
        tb = Bench(dut, rng)
        await tb.reset()
        for n in range(hm.MIN_BITS, hm.MAX_BITS + 1):
            tb.pressure(int(rng.integers(20, 101)), int(rng.integers(20, 101)))
            count = int(rng.integers(200, 1500))
            await tb.check_up(
                _pack(_values(rng, n, count, tb.lanes), n),
                n,
                count,
                int(hm.bf16_bits(rng.lognormal(0, 2))),
            )
            x = hm.bf16_bits(rng.standard_cauchy((count, tb.lanes)) * (1 << (n - 1)) / 5)
            await tb.check_dn(x, n, int(hm.f32_bits(rng.lognormal(0, 1))), bool(rng.integers(2)))


# ----------------------------------------------------------------------------- pytest entry
@pytest.mark.hdl
@pytest.mark.skipif(
    shutil.which("iverilog") is None, reason="iverilog not installed (Debian package iverilog)"
)
@pytest.mark.parametrize("lanes", [1, 4])
def test_nc_top_cocotb(lanes, tmp_path):
    from cocotb_tools.runner import get_runner

    from qlib.hdl import sim

    runner = get_runner("icarus")
    build = tmp_path / f"nc_top_lanes{lanes}"  # one build directory per parameter set
    runner.build(
        sources=sim.sources(),
        hdl_toplevel="nc_top",
        parameters={"LANES": lanes},
        build_dir=build,
        build_args=["-g2005"],
        timescale=("1ns", "1ps"),
        always=True,
    )
    runner.test(
        hdl_toplevel="nc_top",
        test_module="test_hdl_cocotb",
        build_dir=build,
        test_dir=build,
        seed=SEED + lanes,
        extra_env={"QLIB_TEST_PROFILE": os.environ.get("QLIB_TEST_PROFILE", "")},
    )
