"""The fixed-point arithmetic of the TFLite reference kernels (gemmlowp), vectorised in numpy.

A real multiplier M > 0 is stored as a 32-bit integer `multiplier` in [2^30, 2^31) and a
power-of-two `shift`: M ~= multiplier * 2^(shift - 31) (QuantizeMultiplier). TFLite's
MultiplyByQuantizedMultiplier rescales an int32 accumulator x in one of two ways, chosen when
TFLite is built (tensorflow/lite/kernels/internal/common.h):

* "single" (TFLITE_SINGLE_ROUNDING, ruy's and TFLite Micro's choice):
      (x * multiplier + 2^(30 - shift)) >> (31 - shift)
  one rounding, to nearest, ties toward +inf;
* "double" (the gemmlowp reference, TFLite's default build):
      RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x * 2^max(shift, 0), multiplier),
                          max(-shift, 0))
  SaturatingRoundingDoublingHighMul rounds to nearest (a tie up when the product is positive,
  toward zero when negative: gemmlowp's nudge of 1 - 2^30), then RoundingDivideByPOT rounds to
  nearest again (ties away from zero). The first rounding keeps only -shift fractional bits,
  so a result within 2^(shift-1) of a tie can round the wrong way: with multipliers ~ 2^-8
  (typical for a Conv) about 0.2 % of outputs differ by one step from exact rounding.

The simulator uses "single" by default (see docs/NPU.md for the agreement with both).
Hand-written because no maintained Python package exposes these exact integer semantics; the
functions follow the definitions in common.h and quantization_util.cc, and
tests/npu/test_fixed_point.py pins them to hand-computed values.

All values are numpy int64 arrays holding int32 quantities (int64 leaves room for the 64-bit
products the C code forms); results are in int32 range.
"""

from __future__ import annotations

import numpy as np

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def quantize_multiplier(real) -> tuple[np.ndarray, np.ndarray]:
    """TFLite QuantizeMultiplier: real multiplier(s) >= 0 -> (int32 multiplier, shift).

    frexp splits real = q * 2^shift with q in [0.5, 1); the multiplier is round(q * 2^31)
    (std::round: ties away from zero); q rounding up to 2^31 is renormalised; a multiplier so
    small that shift < -31 flushes to 0 (TFLite does the same).
    """
    real = np.asarray(real, dtype=np.float64)
    if np.any(real < 0) or not np.all(np.isfinite(real)):
        raise ValueError(f"a requantization multiplier must be finite and >= 0, got {real}")
    q, shift = np.frexp(real)
    fixed = np.floor(np.abs(q) * 2.0**31 + 0.5).astype(np.int64)  # round half away (q >= 0)
    carry = fixed == 2**31
    fixed = np.where(carry, fixed // 2, fixed)
    shift = np.where(carry, shift + 1, shift).astype(np.int64)
    tiny = shift < -31
    fixed = np.where(tiny | (real == 0), 0, fixed)
    shift = np.where(tiny | (real == 0), 0, shift)
    return fixed.astype(np.int64), shift


def saturating_rounding_doubling_high_mul(a, b) -> np.ndarray:
    """gemmlowp SaturatingRoundingDoublingHighMul: the high 32 bits of 2*a*b, rounded."""
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    s = ab + nudge
    # C integer division truncates toward zero; numpy's >> floors, so divide the magnitude
    high = np.where(s >= 0, s >> 31, -((-s) >> 31))
    overflow = (a == b) & (a == INT32_MIN)
    return np.where(overflow, INT32_MAX, high)


def rounding_divide_by_pot(x, exponent) -> np.ndarray:
    """gemmlowp RoundingDivideByPOT: x / 2^exponent, rounded to nearest, ties away from zero."""
    x = np.asarray(x, dtype=np.int64)
    exponent = np.asarray(exponent, dtype=np.int64)
    if np.any(exponent < 0) or np.any(exponent > 31):
        raise ValueError("RoundingDivideByPOT needs 0 <= exponent <= 31")
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def saturate_int32(x) -> np.ndarray:
    return np.clip(np.asarray(x, dtype=np.int64), INT32_MIN, INT32_MAX)


ROUNDINGS = ("single", "double")


def multiply_by_quantized_multiplier(x, multiplier, shift, rounding: str = "single") -> np.ndarray:
    """TFLite MultiplyByQuantizedMultiplier: x * multiplier * 2^(shift - 31), rounded.

    "double": the left shift (multipliers >= 1) saturates to int32 where the C code would
    overflow. "single": shifts are limited to [-31, 30] as TFLite's single-rounding
    QuantizeMultiplier guarantees (a larger multiplier saturates the result).
    """
    shift = np.asarray(shift, dtype=np.int64)
    if rounding == "single":
        total = 31 - np.clip(shift, -31, 30)
        prod = np.asarray(x, dtype=np.int64) * np.asarray(multiplier, dtype=np.int64)
        return saturate_int32((prod + (np.int64(1) << (total - 1))) >> total)
    if rounding != "double":
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = saturate_int32(np.asarray(x, dtype=np.int64) << left)
    return rounding_divide_by_pot(saturating_rounding_doubling_high_mul(shifted, multiplier), right)


class Requantizer:
    """A real multiplier (scalar or per channel) in TFLite form, applied to int32 accumulators."""

    def __init__(self, real, rounding: str = "single"):
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        self.rounding = rounding
        self.real = np.asarray(real, dtype=np.float64)
        self.multiplier, self.shift = quantize_multiplier(self.real)

    def reshaped(self, shape: tuple[int, ...]) -> Requantizer:
        """The same multipliers laid out to broadcast against an accumulator (per-channel axis)."""
        r = Requantizer.__new__(Requantizer)
        r.rounding = self.rounding
        r.real = self.real.reshape(shape)
        r.multiplier, r.shift = self.multiplier.reshape(shape), self.shift.reshape(shape)
        return r

    def __call__(self, acc) -> np.ndarray:
        return multiply_by_quantized_multiplier(acc, self.multiplier, self.shift, self.rounding)


def round_half_away(x: np.ndarray) -> np.ndarray:
    """std::round / TfLiteRound on float values (used only for compile-time constants)."""
    x = np.asarray(x, dtype=np.float64)
    return np.sign(x) * np.floor(np.abs(x) + 0.5)


def rounding_divide(acc, count) -> np.ndarray:
    """TFLite's integer average: acc / count rounded to nearest, ties away from zero."""
    acc = np.asarray(acc, dtype=np.int64)
    count = np.asarray(count, dtype=np.int64)
    half = count // 2
    # C division truncates toward zero: divide magnitudes
    mag = (np.abs(acc) + half) // count
    return np.where(acc >= 0, mag, -mag)
