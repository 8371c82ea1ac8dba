"""The number converter between packed mixed-precision memory and a bfloat16 accelerator.

- ``qlib.hdl.model``: the bit-exact reference model (packing, bfloat16 arithmetic, quantiser,
  one upstream or downstream job with its status bits).
- ``qlib.hdl.sim``: Icarus Verilog compile and stream runs (``hdl/tb/tb_stream.v``).
- ``qlib.hdl.synth``: yosys synthesis and resource counts.
- ``qlib.hdl.wave``: waveform excerpts read from VCD files.
"""

from . import model, sim

__all__ = ["model", "sim"]
