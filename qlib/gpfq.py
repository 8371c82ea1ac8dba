"""GPFQ: greedy path-following quantisation. The implementation lives in ``qlib.ptq.gpfq``; this
module keeps ``from qlib import gpfq`` short."""

from qlib.ptq.gpfq import METHODS, quantize, solve_covariance, solve_im2col

__all__ = ["METHODS", "quantize", "solve_covariance", "solve_im2col"]
