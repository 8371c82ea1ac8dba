"""Bit-exact reference model of the number converter in ``hdl/src``.

The converter sits between memory and a bfloat16 accelerator:

- **upstream** (memory -> accelerator): signed n-bit integers, packed densely into 16-bit words
  (value ``j`` occupies bits ``j*n .. j*n+n-1`` of the little-endian bit stream, so a value may
  straddle two words), are unpacked, converted to bfloat16 and multiplied by the bfloat16
  ``scale`` register;
- **downstream** (accelerator -> memory): bfloat16 values are multiplied by the float32
  ``inv_scale`` register, rounded to an integer, saturated to n bits and packed again.

Arithmetic, written where the RTL implements it (``hdl/src/nc_*.v``):

- integer -> bfloat16 rounds to nearest, ties to even (as ``ml_dtypes`` casts);
- bfloat16 x bfloat16 rounds the exact product to nearest even. Subnormal inputs and results
  whose exact magnitude is below 2^-126 are flushed to a signed zero (the RTL has no subnormal
  path); a result that rounds past the largest bfloat16 is infinity; NaN results are the
  canonical quiet NaN ``0x7FC0``;
- the quantiser computes the float32 product ``x * inv_scale`` rounded to nearest even (as
  torch does on the CPU), then rounds that to an integer with ties to even (``torch.round``),
  then saturates to ``[-2^(n-1), 2^(n-1)-1]`` (``[-(2^(n-1)-1), ...]`` in narrow mode). This is
  exactly ``qlib.explore.fakequant``'s ``round_().clamp_()``, so the converter reproduces the
  exploration's integer codes. The inverse scale is float32 because a bfloat16 one would move
  the rounding thresholds by up to 2^-9 and change codes. Subnormal bfloat16 inputs and a
  subnormal inverse scale are flushed to zero: with fakequant's scales (< 2^39, since it zeroes
  ranges below 2^-24) a subnormal input can only give the code 0 anyway.

Documented behaviour on bad input (identical in the RTL, tested in both):

- bit width outside 2..16: the job is refused at once; ``ERR_WIDTH`` and ``DONE`` are set, no
  word is read and no value written;
- zero, subnormal, infinite or NaN scale (or inverse scale): ``ERR_SCALE`` is set and the job
  runs with the arithmetic above (a zero scale gives zeros);
- NaN input to the quantiser: code 0 and ``DN_ERR_NAN``; infinite input: saturated code and
  ``DN_ERR_INF``; any saturated code sets ``DN_SAT`` (information, not an error);
- upstream packet shorter than ``ceil(num_values * n / 16)`` words (it ends mid-value): the
  missing bits read as zeros, all ``num_values`` values are still delivered and ``UP_ERR_SHORT``
  is set; longer: the extra words up to ``tlast`` are read and dropped and ``UP_ERR_LONG`` is set;
- downstream packet ending mid-word: the last word is padded with zero bits (normal, no flag).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import ml_dtypes
import numpy as np

__all__ = [
    "MIN_BITS",
    "MAX_BITS",
    "WORD_BITS",
    "CANONICAL_NAN",
    "STATUS_BITS",
    "REGISTERS",
    "UpResult",
    "DownResult",
    "check_bits",
    "words_needed",
    "pack",
    "unpack",
    "lane_split",
    "lane_join",
    "bf16_bits",
    "bits_bf16",
    "f32_bits",
    "int_to_bf16",
    "bf16_mul",
    "quantize_bf16",
    "upstream",
    "downstream",
    "status_names",
]

MIN_BITS, MAX_BITS, WORD_BITS = 2, 16, 16
CANONICAL_NAN = 0x7FC0
BF16 = ml_dtypes.bfloat16

# Status register bits (hdl/src/nc_top.v); the model returns the same bits for one job.
STATUS_BITS = {
    "UP_BUSY": 0,
    "UP_DONE": 1,
    "DN_BUSY": 2,
    "DN_DONE": 3,
    "UP_ERR_WIDTH": 8,
    "UP_ERR_SCALE": 9,
    "UP_ERR_SHORT": 10,
    "UP_ERR_LONG": 11,
    "DN_ERR_WIDTH": 16,
    "DN_ERR_SCALE": 17,
    "DN_ERR_NAN": 18,
    "DN_ERR_INF": 19,
    "DN_SAT": 20,
}

# AXI-Lite register map (byte addresses of 32-bit registers).
REGISTERS = {
    "CTRL": 0x00,  # write 1 to bit 0: start upstream job; bit 1: start downstream job
    "STATUS": 0x04,
    "BITS": 0x08,  # bit width n, checked 2..16 on the whole 32-bit value at each start
    "NARROW": 0x0C,  # bit 0: saturate to +-(2^(n-1)-1) instead of [-2^(n-1), 2^(n-1)-1]
    "SCALE": 0x10,  # bfloat16 in bits 15:0 (upstream: value = int * scale)
    "INV_SCALE": 0x14,  # float32 (downstream: code = sat(round(x * inv_scale)))
    "NUM_VALUES": 0x18,  # values per lane of the next upstream job
    "LANES": 0x1C,  # read only: the LANES parameter
    "UP_WORDS_IN": 0x20,  # counters: beats (one word or value per lane each)
    "UP_VALUES_OUT": 0x24,
    "UP_CYCLES": 0x28,
    "UP_STALLS": 0x2C,  # cycles an output value waited for tready
    "DN_VALUES_IN": 0x30,
    "DN_WORDS_OUT": 0x34,
    "DN_CYCLES": 0x38,
    "DN_STALLS": 0x3C,
}


def status_names(status: int) -> list[str]:
    """Names of the bits set in a status word."""
    return [k for k, b in STATUS_BITS.items() if status >> b & 1]


def check_bits(n: int, where: str = "n") -> int:
    """Validate a bit width for the software API (the hardware flags it instead)."""
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or not MIN_BITS <= n <= MAX_BITS:
        raise ValueError(
            f"{where}: bit width must be an integer in {MIN_BITS}..{MAX_BITS}, got {n!r}"
        )
    return int(n)


def words_needed(num_values: int, n: int) -> int:
    """16-bit memory words that ``num_values`` packed n-bit values occupy."""
    return math.ceil(num_values * check_bits(n) / WORD_BITS)


def _as_ints(values, n: int) -> np.ndarray:
    v = np.asarray(values)
    if v.ndim != 1 or not np.issubdtype(v.dtype, np.integer) and v.size:
        raise ValueError(f"values: expected a 1-D integer array, got shape {v.shape} {v.dtype}")
    v = v.astype(np.int64)
    lo, hi = -(1 << (n - 1)), (1 << (n - 1)) - 1
    if v.size and (v.min() < lo or v.max() > hi):
        bad = v[(v < lo) | (v > hi)][0]
        raise ValueError(f"values: {bad} does not fit in {n} signed bits [{lo}, {hi}]")
    return v


def pack(values, n: int) -> np.ndarray:
    """Pack signed n-bit integers ``[V]`` densely into 16-bit words ``[ceil(V*n/16)]`` (uint16).

    Value j occupies stream bits j*n .. j*n+n-1, bit k of the stream is bit k%16 of word k//16;
    the bits after the last value are zero.
    """
    n = check_bits(n)
    v = _as_ints(values, n)
    nbits = len(v) * n
    bits = ((v[:, None] >> np.arange(n)) & 1).astype(np.uint8).ravel()
    bits = np.concatenate([bits, np.zeros(-nbits % WORD_BITS, np.uint8)])
    words = bits.reshape(-1, WORD_BITS).astype(np.uint32) << np.arange(WORD_BITS, dtype=np.uint32)
    return words.sum(axis=1).astype(np.uint16)


def unpack(words, n: int, num_values: int) -> np.ndarray:
    """Inverse of ``pack``: the first ``num_values`` signed n-bit values ``[V]`` (int64).

    Missing words (a short stream) read as zeros, as the hardware pads them.
    """
    n = check_bits(n)
    w = np.asarray(words, dtype=np.int64).ravel() & 0xFFFF
    need = math.ceil(num_values * n / WORD_BITS)
    w = np.concatenate([w[:need], np.zeros(max(0, need - len(w)), np.int64)])
    bits = ((w[:, None] >> np.arange(WORD_BITS)) & 1).ravel()[: num_values * n]
    raw = (bits.reshape(num_values, n) << np.arange(n)).sum(axis=1) if num_values else bits[:0]
    return np.where(raw >> (n - 1) & 1, raw - (1 << n), raw).astype(np.int64)


def lane_split(values, lanes: int) -> list[np.ndarray]:
    """Deal ``V`` values to ``lanes`` lanes round robin (value j to lane j % lanes); the hardware
    needs equal lengths, so ``V`` must be a multiple of ``lanes`` (pad with zeros first)."""
    v = np.asarray(values)
    if lanes < 1 or len(v) % lanes:
        raise ValueError(f"{len(v)} values do not split evenly over {lanes} lanes")
    return [v[i::lanes] for i in range(lanes)]


def lane_join(per_lane: list[np.ndarray]) -> np.ndarray:
    """Inverse of ``lane_split``: ``[V]`` from ``lanes`` arrays of equal length."""
    return np.stack([np.asarray(a) for a in per_lane], axis=1).ravel()


# ----------------------------------------------------------------------------- bfloat16 helpers
def bf16_bits(x) -> np.ndarray:
    """bfloat16 bit patterns (uint16) of ``x``, rounded to nearest even by ``ml_dtypes``."""
    return np.asarray(x, dtype=np.float32).astype(BF16).view(np.uint16)


def bits_bf16(bits) -> np.ndarray:
    """float32 values of bfloat16 bit patterns."""
    with np.errstate(invalid="ignore"):  # NaN patterns stay NaN
        return np.asarray(bits, dtype=np.uint16).view(BF16).astype(np.float32)


def f32_bits(x) -> np.ndarray:
    """float32 bit patterns (uint32) of ``x``."""
    return np.asarray(x, dtype=np.float32).view(np.uint32)


def _flush_bf16(bits: np.ndarray) -> np.ndarray:
    """Subnormal bfloat16 patterns -> signed zero (the RTL has no subnormal path)."""
    b = np.asarray(bits, dtype=np.uint16)
    return np.where((b & 0x7F80) == 0, b & 0x8000, b).astype(np.uint16)


def int_to_bf16(values) -> np.ndarray:
    """Signed integers ``[V]`` (|v| <= 2^15) to bfloat16 bit patterns, ties to even."""
    v = np.asarray(values, dtype=np.int64)
    return bf16_bits(v.astype(np.float32))  # exact in float32, one rounding to bfloat16


def bf16_mul(a, b) -> np.ndarray:
    """Product of bfloat16 bit patterns ``a`` and ``b`` (broadcast), as the RTL computes it."""
    fa = bits_bf16(_flush_bf16(a)).astype(np.float64)
    fb = bits_bf16(_flush_bf16(b)).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        p = fa * fb  # exact: two 8-bit significands
        tiny = (p != 0) & (np.abs(p) < 2.0**-126)
        p = np.where(tiny, np.copysign(0.0, p), p)
        out = bf16_bits(p.astype(np.float32))  # exact in float32, one rounding to bfloat16
    return np.where(np.isnan(p), CANONICAL_NAN, out).astype(np.uint16)


def quantize_bf16(x, inv_scale: float | np.floating, n: int, narrow: bool = False):
    """Quantiser: bfloat16 patterns ``[V]`` -> (codes ``[V]`` int64, flags dict).

    ``code = clamp(round_half_even(float32(x * inv_scale)), lo, hi)``; NaN -> 0.
    """
    x = _flush_bf16(np.asarray(x, dtype=np.uint16))
    s = np.float32(inv_scale)
    if s != 0 and abs(s) < np.finfo(np.float32).tiny:
        s = np.float32(0.0) * np.sign(s)
    xf = bits_bf16(x)
    with np.errstate(over="ignore", invalid="ignore"):
        p = xf * s  # float32 multiply, rounded to nearest even as torch does
        r = np.rint(p)
    hi = (1 << (n - 1)) - 1
    lo = -hi if narrow else -hi - 1
    nan = np.isnan(r)
    sat = ~nan & ((r > hi) | (r < lo))
    codes = np.where(nan, 0, np.clip(np.nan_to_num(r, posinf=hi, neginf=lo), lo, hi))
    flags = {
        "nan": bool(np.isnan(xf).any()),
        "inf": bool(np.isinf(xf).any()),
        "sat": bool(sat.any()),
    }
    return codes.astype(np.int64), flags


def _bad_scale_bf16(bits: int) -> bool:
    return (bits & 0x7F80) in (0, 0x7F80)


def _bad_scale_f32(bits: int) -> bool:
    return (bits & 0x7F800000) in (0, 0x7F800000)


# ----------------------------------------------------------------------------- one job per lane
@dataclass(frozen=True)
class UpResult:
    """An upstream job on one lane: bfloat16 patterns ``values`` [V] and the status bits."""

    values: np.ndarray
    ints: np.ndarray
    status: int
    words_read: int


@dataclass(frozen=True)
class DownResult:
    """A downstream job on one lane: packed words ``[ceil(V*n/16)]`` and the status bits."""

    words: np.ndarray
    codes: np.ndarray
    status: int


def _bit(name: str) -> int:
    return 1 << STATUS_BITS[name]


def upstream(words, n: int, scale_bits: int, num_values: int) -> UpResult:
    """What one lane delivers for a packet ``words`` (uint16, ``tlast`` on the last one).

    ``n`` is the raw BITS register (bad widths are flagged, not raised), ``scale_bits`` the
    bfloat16 SCALE register.
    """
    w = np.asarray(words, dtype=np.uint16).ravel()
    if not MIN_BITS <= n <= MAX_BITS:
        return UpResult(
            np.zeros(0, np.uint16), np.zeros(0, np.int64), _bit("UP_DONE") | _bit("UP_ERR_WIDTH"), 0
        )
    status = _bit("UP_DONE")
    if _bad_scale_bf16(scale_bits):
        status |= _bit("UP_ERR_SCALE")
    if num_values == 0:  # nothing to do: the job ends without reading the stream
        return UpResult(np.zeros(0, np.uint16), np.zeros(0, np.int64), status, 0)
    if len(w) == 0:
        raise ValueError("words: an AXI-Stream packet has at least one word (num_values > 0)")
    need = math.ceil(num_values * n / WORD_BITS)
    if len(w) < need:
        status |= _bit("UP_ERR_SHORT")
    elif len(w) > need:
        status |= _bit("UP_ERR_LONG")
    ints = unpack(w, n, num_values)
    vals = bf16_mul(int_to_bf16(ints), np.uint16(scale_bits))
    return UpResult(vals, ints, status, len(w))


def downstream(values, n: int, inv_scale_bits: int, narrow: bool = False) -> DownResult:
    """What one lane writes for a packet of bfloat16 patterns ``values`` [V >= 1].

    ``inv_scale_bits`` is the float32 INV_SCALE register.
    """
    x = np.asarray(values, dtype=np.uint16).ravel()
    if not MIN_BITS <= n <= MAX_BITS:
        return DownResult(
            np.zeros(0, np.uint16), np.zeros(0, np.int64), _bit("DN_DONE") | _bit("DN_ERR_WIDTH")
        )
    if len(x) == 0:
        raise ValueError("values: an AXI-Stream packet has at least one value")
    status = _bit("DN_DONE")
    if _bad_scale_f32(inv_scale_bits):
        status |= _bit("DN_ERR_SCALE")
    s = np.array([inv_scale_bits], dtype=np.uint32).view(np.float32)[0]
    codes, flags = quantize_bf16(x, s, n, narrow)
    status |= _bit("DN_ERR_NAN") * flags["nan"] | _bit("DN_ERR_INF") * flags["inf"]
    status |= _bit("DN_SAT") * flags["sat"]
    return DownResult(pack(codes, n), codes, status)
