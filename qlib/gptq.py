"""GPTQ on the grid that RTN and GPFQ share. The implementation lives in ``qlib.ptq.gptq``; this
module keeps ``from qlib import gptq`` short."""

from qlib.ptq.gptq import quantize, solve

__all__ = ["quantize", "solve"]
