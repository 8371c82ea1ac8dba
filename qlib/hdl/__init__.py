"""The number converter between packed mixed-precision memory and a bfloat16 accelerator.

- ``qlib.hdl.model``: the bit-exact reference model (packing, bfloat16 arithmetic, quantiser,
  one upstream or downstream job with its status bits) and the register map.
- ``qlib.hdl.sim``: Icarus Verilog compile and stream runs (``hdl/tb/tb_stream.v``), checked
  against the model.
- ``qlib.hdl.measure``: throughput per bit width from the converter's counters.
- ``qlib.hdl.layers``: a network's layers through the converter (memory words, RTL round trip).
- ``qlib.hdl.synth``: yosys cell counts and a nextpnr-ice40 frequency estimate.
- ``qlib.hdl.wave``: waveform excerpts from VCD files.

The Verilog lives in ``hdl/`` (see ``hdl/README.md``).
"""

# Only the light modules are imported here: cocotb imports qlib.hdl.model inside every simulator
# run, and torch (qlib.hdl.layers) would add seconds to each. The others import as submodules.
from . import model, sim

__all__ = ["model", "sim"]
