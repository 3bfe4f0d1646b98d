"""The quantization arithmetic of the TFLite 8-bit spec (onnx_backend.qmath)."""

import numpy as np
import pytest

from onnx_backend import qmath
from onnx_backend.qmath import QType


def test_asymmetric_params_cover_range_and_represent_zero():
    p = qmath.activation_params(-1.0, 3.0)
    lo, hi = p.range()
    assert lo <= -1.0 + float(p.scale) and hi >= 3.0 - float(p.scale)
    assert qmath.dequantize(qmath.quantize(np.float32(0.0), p), p) == 0.0
    assert p.zero_point.dtype == np.int8


def test_range_is_widened_to_include_zero():
    p = qmath.activation_params(2.0, 5.0)  # never below 2: still must represent 0
    assert int(p.zero_point) == -128
    assert qmath.dequantize(qmath.quantize(np.float32(0.0), p), p) == 0.0


def test_symmetric_has_zero_point_zero_and_never_negative_uses_full_range():
    sym = qmath.activation_params(-2.0, 1.0, symmetric=True)
    assert int(sym.zero_point) == 0 and np.isclose(float(sym.scale), 2.0 / 127)
    pos = qmath.activation_params(0.0, 6.0, symmetric=True)
    assert int(pos.zero_point) == -128 and np.isclose(float(pos.scale), 6.0 / 255)


def test_weights_are_symmetric_narrow_per_channel():
    w = np.array([[1.0, -0.5], [0.0, 0.0], [-4.0, 2.0]], np.float32)
    p = qmath.weight_params(w, axis=0)
    q = qmath.quantize(w, p)
    assert p.qtype is QType.INT8_NARROW and np.all(p.zero_point == 0)
    assert q.min() >= -127 and q.max() <= 127
    assert p.scale[1] > 0  # all-zero channel keeps a positive scale
    np.testing.assert_array_equal(q[:, 0], [127, 0, -127])


def test_bias_scale_is_input_times_weight_and_overflow_is_guarded():
    w = np.full((2, 3), 1e-6, np.float32)
    bias = np.array([1e4, -1.0], np.float32)
    in_scale = 1e-3
    min_scale = qmath.min_weight_scale_for_bias(bias, in_scale)
    wp = qmath.weight_params(w, 0, min_scale=min_scale)
    bp = qmath.bias_params(in_scale, wp)
    np.testing.assert_allclose(bp.scale, np.float32(in_scale) * wp.scale, rtol=1e-7)
    qb = qmath.quantize(bias, bp)
    assert np.abs(qb.astype(np.int64)).max() <= qmath.INT32_MAX
    np.testing.assert_allclose(qmath.dequantize(qb, bp), bias, rtol=1e-6)


def test_quantize_rounds_half_to_even_like_onnx():
    p = qmath.QuantParams(np.float32(1.0), np.int8(0))
    np.testing.assert_array_equal(qmath.quantize(np.array([0.5, 1.5, 2.5, -0.5], np.float32), p), [0, 2, 2, 0])


def test_scales_never_underflow():
    p = qmath.activation_params(0.0, 1e-40)
    assert float(p.scale) >= qmath.MIN_SCALE
    bp = qmath.bias_params(float(p.scale), qmath.weight_params(np.full((1, 1), 1e-30, np.float32), 0))
    assert float(bp.scale[0]) > 0


def test_non_finite_range_is_rejected():
    with pytest.raises(ValueError, match="finite"):
        qmath.activation_params(0.0, float("inf"))


def test_sqnr_db():
    x = np.ones(100)
    assert qmath.sqnr_db(x, x) == float("inf")
    assert np.isclose(qmath.sqnr_db(x, x * 1.1), 20.0)
