"""Property-based tests of the quantization math (hypothesis).

Each property holds for every float32 the strategies can produce: denormals, +-0, values near
float32 max (mask values: counted and left out of the statistics), constant tensors, single values. The guarantees are listed in docs/RELIABILITY.md.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, example, given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from onnx_backend import qmath
from onnx_backend.qmath import MIN_SCALE, QType
from onnx_backend.range_selection import Method, select_range
from onnx_backend.statistics import MASK_MAGNITUDE, TensorStatistics, required_exponent
from torchq.observer import Observer

F32_MAX = float(np.finfo(np.float32).max)
F32_TINY = float(np.finfo(np.float32).smallest_subnormal)

def f32(v: float) -> float:
    return float(np.float32(v))


# Every finite float32, denormals and +-0 included.
finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
# Magnitudes across the whole float32 exponent range, biased towards the extremes.
extreme32 = st.one_of(
    finite32,
    st.sampled_from([f32(v) for v in (0.0, -0.0, F32_TINY, -F32_TINY, 1e-40, -1e-40, 1.1754944e-38, F32_MAX, -F32_MAX, 1e38, -1e38, 1.0, -1.0)]),
)


def arrays32(min_size=1, max_size=64, elements=extreme32):
    return hnp.arrays(np.float32, st.integers(min_size, max_size), elements=elements)


def half_step_tolerance(scale: np.ndarray, x: np.ndarray, steps: float = 0.5) -> np.ndarray:
    """Half a step, plus float32 rounding in x / scale and in (q - z) * scale."""
    return scale.astype(np.float64) * (steps + 5e-5) + np.abs(x.astype(np.float64)) * 2e-7


# ---- activation parameters ---------------------------------------------------------------------


@given(a=extreme32, b=extreme32, symmetric=st.booleans(), qtype=st.sampled_from([QType.INT8, QType.UINT8]))
@example(a=-F32_MAX, b=F32_MAX, symmetric=False, qtype=QType.INT8)
@example(a=0.0, b=F32_TINY, symmetric=True, qtype=QType.INT8)
@example(a=5.0, b=5.0, symmetric=False, qtype=QType.INT8)  # constant tensor
def test_property_activation_params_valid_and_zero_exact(a, b, symmetric, qtype):
    lo, hi = min(a, b), max(a, b)
    p = qmath.activation_params(lo, hi, symmetric=symmetric, qtype=qtype)
    scale, zero = float(p.scale), int(p.zero_point)
    assert math.isfinite(scale) and scale >= MIN_SCALE  # scales never underflow
    assert qtype.qmin <= zero <= qtype.qmax
    q0 = qmath.quantize(np.float32(0.0), p)
    assert qmath.dequantize(q0, p) == 0.0  # zero is exactly representable
    if symmetric and lo < 0:
        assert zero == (0 if qtype is QType.INT8 else 128)  # symmetric: zero point 0 (int8)


@given(a=extreme32, b=extreme32, symmetric=st.booleans(), data=st.data())
@example(a=-1.0, b=3.0, symmetric=False, data=None)  # zero point nudged: the range shifts
@example(a=-F32_MAX, b=F32_MAX, symmetric=False, data=None)
@example(a=-F32_MAX, b=1.0, symmetric=True, data=None)
@example(a=0.0, b=F32_MAX, symmetric=False, data=None)
def test_property_round_trip_within_half_a_step_inside_the_range(a, b, symmetric, data):
    lo, hi = min(a, b, 0.0), max(a, b, 0.0)
    p = qmath.activation_params(lo, hi, symmetric=symmetric)
    if data is None:
        x = np.linspace(lo, hi, 1001, dtype=np.float32)
    else:
        x = data.draw(arrays32(elements=st.floats(lo, hi, width=32)))
    y = qmath.dequantize(qmath.quantize(x, p), p)
    assert np.all(np.isfinite(y))  # every code is a finite float32, even at float32 max
    # Within a factor 2 of float32 max the scale is lowered so the outermost codes stay finite:
    # there the error bound is one step.
    steps = 0.5 if max(-lo, hi) <= F32_MAX / 2 else 1.0
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= half_step_tolerance(p.scale, x, steps)), (float(p.scale), int(p.zero_point), x[np.argmax(err)])


@given(a=extreme32, b=extreme32, symmetric=st.booleans())
@example(a=-F32_MAX, b=F32_MAX, symmetric=False)
@example(a=-F32_MAX, b=0.0, symmetric=True)
def test_property_every_code_dequantizes_to_a_finite_float(a, b, symmetric):
    p = qmath.activation_params(min(a, b), max(a, b), symmetric=symmetric)
    assert np.all(np.isfinite(qmath.dequantize(np.arange(-128, 128, dtype=np.int8), p)))


@given(a=extreme32, b=extreme32, symmetric=st.booleans(), x=arrays32(elements=st.floats(width=32, allow_nan=False)))
def test_property_quantized_values_stay_in_range(a, b, symmetric, x):
    p = qmath.activation_params(min(a, b), max(a, b), symmetric=symmetric)
    q = qmath.quantize(x, p)  # +-inf included: saturates
    assert q.dtype == np.int8 and q.min() >= -128 and q.max() <= 127


# ---- weights -----------------------------------------------------------------------------------


@st.composite
def weights_with_zero_channels(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
    w = draw(hnp.arrays(np.float32, shape, elements=extreme32))
    axis = draw(st.integers(0, len(shape) - 1))
    zero = draw(st.lists(st.integers(0, shape[axis] - 1), max_size=shape[axis]))
    for c in zero:  # some output channels are all zero (pruned filters)
        np.moveaxis(w, axis, 0)[c] = 0.0
    return w, axis


@given(wa=weights_with_zero_channels(), per_channel=st.booleans())
def test_property_weights_symmetric_narrow_and_positive_scales(wa, per_channel):
    w, axis = wa
    axis = axis if per_channel else None
    p = qmath.weight_params(w, axis)
    assert p.qtype is QType.INT8_NARROW and np.all(p.zero_point == 0)
    assert np.all(np.isfinite(p.scale)) and np.all(p.scale >= MIN_SCALE)  # all-zero channels too
    q = qmath.quantize(w, p)
    assert q.min() >= -127 and q.max() <= 127
    assert np.all(np.isfinite(qmath.dequantize(np.full(w.shape, -127, np.int8), p)))
    scale = p.scale if axis is None else p.scale.reshape([-1 if i == axis else 1 for i in range(w.ndim)])
    err = np.abs(qmath.dequantize(q, p).astype(np.float64) - w.astype(np.float64))
    assert np.all(err <= half_step_tolerance(np.broadcast_to(scale, w.shape), w))


# ---- bias --------------------------------------------------------------------------------------

act_range = st.tuples(extreme32.map(lambda v: -abs(v)), extreme32.map(abs))
small_weights = hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 4)), elements=extreme32)


@given(r=act_range, w=small_weights, data=st.data())
@example(r=(-1e-30, 1e-30), w=np.full((2, 3), 1e-6, np.float32), data=None)
@example(r=(0.0, f32(1e-10)), w=np.full((2, 3), f32(1e-8), np.float32), data=None)  # product < 2**-63
def test_property_int32_bias_never_overflows(r, w, data):
    """Either the weight scale is widened so the int32 bias fits, or qmath refuses (ValueError)
    when no float32 weight scale can: the planner then keeps the layer in float."""
    # Biases up to half float32 max (beyond, q x scale may round past float32 max when dequantized).
    bias_values = extreme32.filter(lambda v: abs(v) <= F32_MAX / 2)
    bias = np.array([1e3, -1e-3], np.float32)[: w.shape[0]] if data is None else data.draw(hnp.arrays(np.float32, w.shape[0], elements=bias_values))
    if bias.size < w.shape[0]:
        bias = np.resize(bias, w.shape[0])
    in_scale = float(qmath.activation_params(*r).scale)
    min_scale = qmath.min_weight_scale_for_bias(bias, in_scale)
    guardable = bool(np.all(min_scale * np.float64(in_scale) * 1.001 < F32_MAX) and np.all(min_scale < F32_MAX / 127))
    try:
        wp = qmath.weight_params(w, 0, min_scale=min_scale)
        bp = qmath.bias_params(in_scale, wp)
    except qmath.ScaleOverflowError as exc:
        assert not guardable or np.any(np.float64(in_scale) * np.abs(w).max(axis=1) / 127 > F32_MAX / 2), exc
        return
    np.testing.assert_array_equal(bp.zero_point, 0)
    assert bp.qtype is QType.INT32 and np.all(np.isfinite(bp.scale)) and np.all(bp.scale > 0)
    # The spec's bias scale exactly, never clamped.
    np.testing.assert_array_equal(bp.scale, np.float32(in_scale) * wp.scale)
    # No saturation: the real bias fits int32 at this scale, so it round-trips within half a step.
    assert np.all(np.abs(bias.astype(np.float64) / bp.scale.astype(np.float64)) <= qmath.INT32_MAX)
    err = np.abs(qmath.dequantize(qmath.quantize(bias, bp), bp).astype(np.float64) - bias)
    assert np.all(err <= half_step_tolerance(bp.scale, bias))


def test_bias_beyond_what_a_float32_weight_scale_can_guard_is_refused():
    # |bias| / (input scale x INT32_MAX) is not a float32 here: no weight scale keeps the int32
    # bias in range. qmath refuses (the planner keeps such a layer in float, see test_hostile).
    need = qmath.min_weight_scale_for_bias(np.array([F32_MAX], np.float32), MIN_SCALE)
    with pytest.raises(qmath.ScaleOverflowError, match="int32 bias"):
        qmath.weight_params(np.ones((1, 1), np.float32), 0, min_scale=need)


@given(a=st.floats(0, f32(1e-30), width=32), w=st.floats(0, f32(1e-30), width=32))
@example(a=0.0, w=0.0)
@example(a=F32_TINY, w=F32_TINY)
def test_property_scales_never_underflow(a, w):
    in_scale = float(qmath.activation_params(0.0, a).scale)
    wp = qmath.weight_params(np.full((1, 1), w, np.float32), 0)
    bp = qmath.bias_params(in_scale, wp)
    assert in_scale >= MIN_SCALE and wp.scale[0] >= MIN_SCALE
    assert bp.scale[0] >= np.finfo(np.float32).tiny  # a normal float32, never 0 or denormal


# ---- statistics --------------------------------------------------------------------------------


def assert_same_statistics(a: TensorStatistics, b: TensorStatistics) -> None:
    assert (a.min, a.max, a.count, a.exponent, a.offset, a.mask_low, a.mask_high) == (b.min, b.max, b.count, b.exponent, b.offset, b.mask_low, b.mask_high)
    np.testing.assert_array_equal(a.counts, b.counts)


@st.composite
def split_batches(draw, max_size=200):
    x = draw(arrays32(1, max_size))
    cuts = sorted(draw(st.lists(st.integers(0, x.size), max_size=6)))
    parts = [x[i:j] for i, j in zip([0, *cuts], [*cuts, x.size])]
    order = draw(st.permutations(range(len(parts))))
    return x, [parts[i] for i in order]


@given(xb=split_batches(), bins=st.sampled_from([256, 1024, 4096]))
@example(xb=(np.array([-1e35, -1e-40], np.float32), [np.array([-1e35, -1e-40], np.float32)]), bins=4096)
@example(xb=(np.array([-1e35, -1e-40], np.float32), [np.array([-1e-40], np.float32), np.array([-1e35], np.float32)]), bins=4096)
@example(xb=(np.array([-1e38, -1e-40], np.float32), [np.array([-1e-40], np.float32), np.array([-1e38], np.float32)]), bins=4096)  # a mask value
def test_property_histogram_merge_exact_and_order_independent(xb, bins):
    x, batches = xb
    whole = TensorStatistics(bins)
    whole.update(x)
    streamed = TensorStatistics(bins)
    for b in batches:
        streamed.update(b)
    shards = [TensorStatistics(bins) for _ in batches]
    for s, b in zip(shards, batches):
        s.update(b)
    merged = TensorStatistics(bins)
    for s in reversed(shards):  # merge order differs from the streaming order
        merged.merge(s)
    for s in (streamed, merged):
        assert_same_statistics(whole, s)
    data = x[np.abs(x) < MASK_MAGNITUDE]  # the rest are mask values: counted, left out
    assert (whole.mask_low, whole.mask_high) == (int(np.sum(x <= -MASK_MAGNITUDE)), int(np.sum(x >= MASK_MAGNITUDE)))
    assert whole.count == data.size == int(whole.counts.sum())
    if data.size:
        assert whole.counts.size <= bins and whole.exponent == required_exponent(whole.min, whole.max, bins)
        assert whole.min == float(data.min()) and whole.max == float(data.max())


@given(xb=split_batches(), bins=st.sampled_from([256, 4096]))
@example(xb=(np.array([-1e38, -1e-40], np.float32), [np.array([-1e38, -1e-40], np.float32)]), bins=4096)
def test_property_torch_observer_equals_numpy_statistics(xb, bins):
    _, batches = xb
    obs = Observer("k", bins)
    ref = TensorStatistics(bins)
    for b in batches:
        obs.update(torch.from_numpy(b.copy()))
        ref.update(b)
    assert_same_statistics(obs.to_statistics(), ref)


# ---- range selection ---------------------------------------------------------------------------


@given(x=arrays32(1, 300), method=st.sampled_from(list(Method)), symmetric=st.booleans())
@example(x=np.full(7, 3.5, np.float32), method=Method.ENTROPY, symmetric=False)  # constant tensor
@example(x=np.array([-2.5], np.float32), method=Method.MSE, symmetric=True)  # a single value
@example(x=np.array([F32_TINY, -F32_TINY], np.float32), method=Method.SQNR, symmetric=False)  # denormals
@example(x=np.array([-1.3e36, 1.3e36, 0.0], np.float32), method=Method.PERCENTILE, symmetric=False)  # the largest data
@example(x=np.array([-F32_MAX, F32_MAX, 0.5], np.float32), method=Method.PERCENTILE, symmetric=False)  # mask values around it
def test_property_selected_range_contains_zero_stays_within_data_and_quantizes(x, method, symmetric):
    s = TensorStatistics(1024)
    s.update(x)
    x = x[np.abs(x) < MASK_MAGNITUDE]  # mask values are left out of the statistics
    assume(x.size > 0)
    lo, hi = select_range(s, method, symmetric)
    data_lo, data_hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    assert math.isfinite(lo) and math.isfinite(hi) and lo <= 0.0 <= hi
    never_negative = float(x.min()) >= 0
    if symmetric and not never_negative:
        assert lo == -hi and hi <= max(-data_lo, data_hi)
    else:
        assert data_lo <= lo and hi <= data_hi
    p = qmath.activation_params(lo, hi, symmetric=symmetric)  # every chosen range is quantizable
    assert qmath.dequantize(qmath.quantize(np.float32(0), p), p) == 0.0


@given(x=arrays32(1, 300, elements=st.floats(-1e4, 1e4, width=32)), method=st.sampled_from(list(Method)), symmetric=st.booleans(), data=st.data())
def test_property_torch_and_onnx_paths_choose_the_same_range(x, method, symmetric, data):
    cut = data.draw(st.integers(0, x.size))
    obs, ref = Observer("k", 1024), TensorStatistics(1024)
    for part in (x[:cut], x[cut:]):
        obs.update(torch.from_numpy(part.copy()))
    ref.update(x)
    assert select_range(obs.to_statistics(), method, symmetric) == select_range(ref, method, symmetric)
