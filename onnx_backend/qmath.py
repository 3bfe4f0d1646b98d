"""Quantization arithmetic of the TensorFlow Lite 8-bit spec: real = (q - zero_point) * scale.

Everything here is plain numpy and has no knowledge of graphs; the planner and the integer
simulator both build on it, and the property tests pin its guarantees (see docs/RELIABILITY.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import numpy as np

# A scale never goes below 2**-63, so that the bias scale (input scale x weight scale) stays a
# normal float32 (>= 2**-126) and the requantization multiplier stays representable.
MIN_SCALE = float(2.0**-63)
INT32_MAX = 2**31 - 1
F32_MAX = float(np.finfo(np.float32).max)


class ScaleOverflowError(ValueError):
    """No float32 scale satisfies the constraints (an int32 bias too large for its input scale)."""


class QType(Enum):
    """Integer types used by the spec, with the range each may take."""

    INT8 = ("int8", -128, 127)
    UINT8 = ("uint8", 0, 255)
    INT8_NARROW = ("int8", -127, 127)  # weights: symmetric, -128 never used
    INT32 = ("int32", -INT32_MAX, INT32_MAX)  # bias

    def __init__(self, numpy_name: str, qmin: int, qmax: int):
        self.numpy_name = numpy_name
        self.qmin = qmin
        self.qmax = qmax

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.numpy_name)


@dataclass(frozen=True)
class QuantParams:
    """Scale and zero point of one tensor: per tensor (axis None) or per channel along `axis`."""

    scale: np.ndarray  # float32, shape () or (C,)
    zero_point: np.ndarray  # qtype's dtype, same shape as scale
    qtype: QType = QType.INT8
    axis: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", np.asarray(self.scale, dtype=np.float32))
        object.__setattr__(self, "zero_point", np.asarray(self.zero_point).astype(self.qtype.np_dtype))
        if self.scale.shape != self.zero_point.shape:
            raise ValueError(f"scale shape {self.scale.shape} != zero point shape {self.zero_point.shape}")
        if not np.all(self.scale > 0) or not np.all(np.isfinite(self.scale)):
            raise ValueError(f"scales must be positive and finite, got {self.scale}")

    @property
    def per_channel(self) -> bool:
        return self.axis is not None

    def range(self) -> tuple[float, float]:
        """The real interval the integers cover (per-tensor parameters only)."""
        s, z = float(self.scale), int(self.zero_point)
        return (self.qtype.qmin - z) * s, (self.qtype.qmax - z) * s

    def same_as(self, other: QuantParams) -> bool:
        return (
            self.qtype == other.qtype
            and self.axis == other.axis
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point.astype(np.int64), other.zero_point.astype(np.int64))
        )

    def to_dict(self) -> dict:
        return {
            "scale": self.scale.tolist(),
            "zero_point": self.zero_point.astype(np.int64).tolist(),
            "dtype": self.qtype.name.lower(),
            "axis": self.axis,
        }


def _safe_scale(scale: np.ndarray | float) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float64)
    with np.errstate(over="ignore"):  # beyond float32: inf, refused by the callers' checks
        return np.maximum(scale, MIN_SCALE).astype(np.float32)


def _finite_codes(scale: np.ndarray, reach: int) -> np.ndarray:
    """`scale`, lowered where reach x scale would exceed float32 max.

    DequantizeLinear computes (q - zero_point) x scale in float32, so a range reaching float32
    max would turn its outermost codes (|q - zero_point| = reach) into inf. Only ranges within
    a factor 2 of float32 max are affected; their round trip error grows to at most one step.
    """
    cap = F32_MAX / reach
    cap32 = np.float32(cap)
    if float(cap32) > cap:
        cap32 = np.nextafter(cap32, np.float32(0))
    return np.minimum(np.asarray(scale, np.float32), cap32)


def activation_params(lo: float, hi: float, *, symmetric: bool = False, qtype: QType = QType.INT8) -> QuantParams:
    """Per-tensor parameters covering [lo, hi], widened so that 0 is exactly representable.

    Asymmetric: scale = (hi - lo) / (qmax - qmin), zero point = qmin - round(lo / scale) (nudged
    into range, as TFLite does). Symmetric: zero point 0 and [-a, a], a = max(|lo|, |hi|), with
    scale a / 127; a tensor that is never negative uses [0, a] (zero point = qmin) instead, so
    no code is wasted on negative values that never occur.
    """
    lo, hi = float(min(lo, 0.0)), float(max(hi, 0.0))
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"range must be finite, got [{lo}, {hi}]")
    qmin, qmax = qtype.qmin, qtype.qmax
    if symmetric and lo < 0:
        a = max(-lo, hi)
        half = (qmax - qmin) // 2  # 127 for int8: [-a, a] -> [-127, 127]
        zero = (qmin + qmax + 1) // 2  # 0 for int8, 128 for uint8
        scale = _finite_codes(_safe_scale(a / half), zero - qmin)
        return QuantParams(scale, np.asarray(zero), qtype)
    scale = _safe_scale((hi - lo) / (qmax - qmin))
    zero = np.clip(np.round(qmin - lo / np.float64(scale)), qmin, qmax)
    scale = _finite_codes(scale, int(max(qmax - zero, zero - qmin)))
    return QuantParams(scale, zero, qtype)


def weight_params(weight: np.ndarray, axis: int | None, *, min_scale: np.ndarray | float = 0.0, scale: np.ndarray | None = None) -> QuantParams:
    """Symmetric int8 weights in [-127, 127], zero point 0, per channel along `axis` (or per tensor).

    `min_scale` lets the caller widen scales so that the int32 bias stays in range.
    An all-zero channel gets scale 1 (any positive scale represents it exactly).
    `scale` replaces max|w| / 127 with scales chosen elsewhere (learned by quantization-aware
    training); `min_scale` still applies.
    """
    if scale is not None:
        return _weight_params_from_scale(np.asarray(scale, dtype=np.float64), axis, min_scale)
    w = np.asarray(weight)
    w = w if w.dtype in (np.float32, np.float64) else w.astype(np.float64)
    # |w| and max are exact in the weight's own dtype: no float64 copy of a large weight
    if axis is None:
        amax = np.asarray(np.max(np.abs(w)) if w.size else 0.0, dtype=np.float64)
    else:
        reduce_axes = tuple(i for i in range(w.ndim) if i != axis)
        amax = (np.max(np.abs(w), axis=reduce_axes) if w.size else np.zeros(w.shape[axis])).astype(np.float64)
    return _weight_params_from_scale(np.where(amax > 0, amax / QType.INT8_NARROW.qmax, 1.0), axis, min_scale)


def _weight_params_from_scale(scale: np.ndarray, axis: int | None, min_scale: np.ndarray | float) -> QuantParams:
    scale = np.maximum(scale, min_scale)
    safe = _finite_codes(_safe_scale(scale), QType.INT8_NARROW.qmax)
    if np.any(safe < scale * (1 - 1e-6)):  # lowered by more than float32 rounding: min_scale unmet
        raise ScaleOverflowError("no float32 weight scale keeps the int32 bias in range (bias too large for the input scale)")
    return QuantParams(safe, np.zeros_like(safe, dtype=np.int8), QType.INT8_NARROW, axis)


def bias_params(input_scale: float, weight: QuantParams) -> QuantParams:
    """int32 bias: zero point 0, scale = input scale x weight scale (per channel when the weight is).

    Exactly that product, never clamped: both factors are >= MIN_SCALE, so it is a normal float32.
    """
    with np.errstate(over="ignore"):
        scale = np.float32(input_scale) * weight.scale.astype(np.float32)
    if not np.all(np.isfinite(scale)):
        raise ScaleOverflowError(f"bias scale = input scale {input_scale:g} x weight scale overflows float32")
    return QuantParams(scale, np.zeros_like(scale, dtype=np.int32), QType.INT32, weight.axis if weight.per_channel else None)


def min_weight_scale_for_bias(bias: np.ndarray, input_scale: float) -> np.ndarray:
    """Smallest weight scale per channel for which the int32 bias cannot overflow."""
    need = np.abs(np.asarray(bias, dtype=np.float64)) / (float(input_scale) * INT32_MAX)
    return need * (1 + 1e-6)  # margin against rounding in the float32 product


def _broadcast(params: QuantParams, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    if params.axis is None or params.scale.ndim == 0:
        return params.scale, params.zero_point
    shape = [1] * ndim
    shape[params.axis] = -1
    return params.scale.reshape(shape), params.zero_point.reshape(shape)


def quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_to_even(x / scale) + zero_point)."""
    scale, zero = _broadcast(params, np.ndim(x))
    # float32 is exact for 8-bit codes (|q| < 2**24 where it matters, saturation beyond) and
    # halves the temporaries on large weights; int32 biases need float64.
    work = np.float64 if params.qtype is QType.INT32 else np.float32
    with np.errstate(over="ignore"):  # x / scale beyond float32 is +-inf, which saturates
        q = np.asarray(np.rint(np.asarray(x, dtype=np.float32) / scale), dtype=work)
        q += zero.astype(work)
    return np.clip(q, params.qtype.qmin, params.qtype.qmax, out=q).astype(params.qtype.np_dtype)


def dequantize(q: np.ndarray, params: QuantParams) -> np.ndarray:
    """ONNX DequantizeLinear: (q - zero_point) * scale, in float32."""
    scale, zero = _broadcast(params, np.ndim(q))
    return ((np.asarray(q).astype(np.int64) - zero.astype(np.int64)).astype(np.float32) * scale).astype(np.float32)


def fake_quantize(x: np.ndarray, params: QuantParams) -> np.ndarray:
    return dequantize(quantize(x, params), params)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(sum(ref^2) / sum((ref - approx)^2))."""
    ref = np.asarray(reference, dtype=np.float64)
    noise = np.sum((ref - np.asarray(approx, dtype=np.float64)) ** 2)
    signal = np.sum(ref**2)
    if noise == 0:
        return float("inf")
    if signal == 0:
        return float("-inf")
    return float(10 * np.log10(signal / noise))
