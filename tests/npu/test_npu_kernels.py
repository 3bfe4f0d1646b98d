"""Integer kernels on hand-built QDQ models: against exact real arithmetic (every int8 input
pair or code), against hand-worked TFLite values, and against onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest

from npu import Simulator
from npu.compare import compare
from tests.conftest import run_onnx
from tests.npu.qdq_models import QDQBuilder, unary_unit

CODES = np.arange(-128, 128)


def _dq(codes, scale, zp):
    return ((np.asarray(codes, np.int64) - zp) * np.float32(scale)).astype(np.float32)


def _binary(op, a_params, b_params, y_params, *, const_b=None):
    """a (256, 1) and b (1, 256) -> op -> y: every pair of int8 codes."""
    b = QDQBuilder()
    a = b.quantize(b.input("a", [256, 1]), *a_params)
    if const_b is None:
        c = b.quantize(b.input("b", [1, 256]), *b_params)
    else:
        c = b.weight("c", np.asarray(const_b, np.int8), np.float32(b_params[0]))
    y = b.node(op, [a, c], name="op")
    b.output(b.quantize(y, *y_params))
    return b.model()


def _simulated(model, feeds, tensor, **kw):
    return Simulator(model, None, **kw).run_all(feeds)[tensor].astype(np.int64)


def _assert_exact_rounding(got, exact, *, near_tie=1e-6, qmin=-128, qmax=127):
    """got == round(exact) except within `near_tie` of a tie, where it may go either way.

    1e-6 covers the 31-bit multipliers (relative error 2^-31); TFLite's Add / Sub align the
    inputs with 20 fractional bits, so their results may move by ~2^-19 of a step."""
    exact = np.clip(exact, qmin, qmax)
    frac = exact - np.floor(exact)
    tie = np.abs(frac - 0.5) < near_tie
    np.testing.assert_array_equal(got[~tie], np.round(exact[~tie]))
    assert np.all((got[tie] == np.floor(exact[tie])) | (got[tie] == np.ceil(exact[tie])))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul"])
def test_binary_kernels_round_the_exact_result(op):
    # scales from calibration are arbitrary floats ("round" decimals would make exact ties common)
    ap, bp, yp = (0.0312734, 5), (0.0471396, -20), (0.0603118 if op != "Mul" else 0.0917331, -3)
    model = _binary(op, ap, bp, yp)
    feeds = {"a": _dq(CODES, *ap).reshape(256, 1), "b": _dq(CODES, *bp).reshape(1, 256)}
    got = _simulated(model, feeds, "op_out_q")
    ra = (CODES[:, None] - ap[1]) * np.float64(np.float32(ap[0]))
    rb = (CODES[None, :] - bp[1]) * np.float64(np.float32(bp[0]))
    real = {"Add": ra + rb, "Sub": ra - rb, "Mul": ra * rb}[op]
    _assert_exact_rounding(got, real / np.float64(np.float32(yp[0])) + yp[1], near_tie=2.0**-18 if op != "Mul" else 1e-6)
    ort = np.rint(run_onnx(model, feeds)[0] / np.float32(yp[0])) + yp[1]
    assert np.mean(ort == got) >= 0.999 and np.abs(ort - got).max() <= 1


def test_div_by_constant_folds_into_a_multiplier():
    ap, cp, yp = (0.02, 0), (0.05, 0), (0.01, 0)
    divisor = np.array([[60, -35, 17, 127] * 64], np.int8)  # 3.0, -1.75, 0.85, 6.35
    model = _binary("Div", ap, cp, yp, const_b=divisor)
    feeds = {"a": _dq(CODES, *ap).reshape(256, 1)}
    got = _simulated(model, feeds, "op_out_q")
    real = (CODES[:, None] * np.float64(np.float32(0.02))) / (divisor.astype(np.float64) * np.float64(np.float32(0.05)))
    _assert_exact_rounding(got, real / np.float64(np.float32(0.01)))


def test_add_ties_follow_the_requantization_rounding():
    """Worked by hand with TFLite's Add: sa = 0.5, sb = 0.25, sy = 0.5, all zero points 0.
    2 max(sa, sb) = 1; input multipliers 0.5 and 0.25; output multiplier 1 / (2^20 * 0.5) = 2^-19.
    a = 3, b = 5: (3 << 20) * 0.5 + (5 << 20) * 0.25 = 2883584; * 2^-19 = 5.5 -> 6 in both modes.
    a = -3, b = -5: -2883584 * 2^-19 = -5.5 -> single rounding -5 (ties toward +inf), double
    rounding -6 (RoundingDivideByPOT: ties away from zero)."""
    b = QDQBuilder()
    a = b.quantize(b.input("a", [2]), 0.5, 0)
    c = b.quantize(b.input("b", [2]), 0.25, 0)
    b.output(b.quantize(b.node("Add", [a, c], name="op"), 0.5, 0))
    model = b.model()
    feeds = {"a": np.array([1.5, -1.5], np.float32), "b": np.array([1.25, -1.25], np.float32)}
    assert _simulated(model, feeds, "op_out_q", rounding="single").tolist() == [6, -5]
    assert _simulated(model, feeds, "op_out_q", rounding="double").tolist() == [6, -6]


@pytest.mark.parametrize(
    "op, out_params, fn",
    [
        ("Sigmoid", (1 / 256, -128), lambda x: 1 / (1 + np.exp(-x))),
        ("Tanh", (1 / 128, 0), np.tanh),
        ("HardSwish", (0.025, -20), lambda x: x * np.clip(x / 6 + 0.5, 0, 1)),
        ("Exp", (0.5, -128), np.exp),
    ],
)
def test_lookup_tables_are_quantize_of_f_of_dequantize(op, out_params, fn):
    model = unary_unit(op, in_scale=0.04, in_zp=7, out_scale=out_params[0], out_zp=out_params[1], shape=(256,))
    feeds = {"x": _dq(CODES, 0.04, 7)}
    got = _simulated(model, feeds, "op_out_q")
    exact = fn(_dq(CODES, 0.04, 7).astype(np.float64)) / np.float64(np.float32(out_params[0])) + out_params[1]
    _assert_exact_rounding(got, exact)
    ort = np.rint(run_onnx(model, feeds)[0] / np.float32(out_params[0])) + out_params[1]
    assert np.abs(ort - got).max() <= 1 and np.mean(ort == got) >= 0.99


def test_softmax_is_the_exact_probability_rounded():
    rng = np.random.default_rng(0)
    model = unary_unit("Softmax", in_scale=0.07, in_zp=-3, out_scale=1 / 256, out_zp=-128, shape=(8, 5, 37), axis=-1)
    codes = rng.integers(-128, 128, (8, 5, 37))
    feeds = {"x": _dq(codes, 0.07, -3)}
    got = _simulated(model, feeds, "op_out_q")
    z = (codes - (-3)) * np.float64(np.float32(0.07))
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    _assert_exact_rounding(got, p * 256 - 128)
    assert compare(model, feeds, None).agrees


def test_average_pool_differs_from_exact_rounding_only_at_ties():
    """Same scale in and out: TFLite sums the raw codes and divides with ties away from zero;
    onnxruntime rounds the real average (ties to even): they differ exactly at the ties."""
    b = QDQBuilder()
    x = b.quantize(b.input("x", [1, 8, 16, 16]), 0.03, -9)
    b.output(b.quantize(b.node("AveragePool", [x], name="op", kernel_shape=[2, 2], strides=[2, 2]), 0.03, -9))
    model = b.model()
    codes = np.random.default_rng(1).integers(-128, 128, (1, 8, 16, 16))
    feeds = {"x": _dq(codes, 0.03, -9)}
    got = _simulated(model, feeds, "op_out_q")
    raw = codes.reshape(1, 8, 8, 2, 8, 2).sum(axis=(3, 5))
    np.testing.assert_array_equal(got, np.sign(raw) * np.floor(np.abs(raw) / 4 + 0.5))  # TFLite
    ort = np.rint(run_onnx(model, feeds)[0] / np.float32(0.03)) - 9
    differ = ort != got
    assert np.abs(ort - got).max() <= 1
    assert np.all(raw[differ] % 2 == 0) and np.all((raw[differ] // 2) % 2 == 1)  # sum / 4 = k + 1/2


@pytest.mark.parametrize("op, axes", [("GlobalAveragePool", None), ("ReduceMean", [1, 2])])
def test_means_round_the_exact_average(op, axes):
    b = QDQBuilder()
    x = b.quantize(b.input("x", [2, 6, 7, 5]), 0.05, 11)
    inputs = [x] if axes is None else [x, b.const("axes", np.array(axes, np.int64))]
    b.output(b.quantize(b.node(op, inputs, name="op"), 0.011, -2))
    model = b.model()
    codes = np.random.default_rng(2).integers(-128, 128, (2, 6, 7, 5))
    got = _simulated(model, {"x": _dq(codes, 0.05, 11)}, "op_out_q")
    mean = (codes - 11).mean(axis=(2, 3) if axes is None else (1, 2), keepdims=True) * np.float64(np.float32(0.05))
    _assert_exact_rounding(got, mean / np.float64(np.float32(0.011)) - 2)


def _resize_x2(size: int, **attrs):
    """int8 x (scale 0.02, zero point 4) of [1, 4, size, size] -> Resize x2 named "op" -> the same grid."""
    b = QDQBuilder()
    x = b.quantize(b.input("x", [1, 4, size, size]), 0.02, 4)
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    b.output(b.quantize(b.node("Resize", [x, "", scales], name="op", **attrs), 0.02, 4))
    return b.model()


def test_bilinear_resize_x2_differs_from_onnxruntime_only_at_ties():
    model = _resize_x2(9, mode="linear", coordinate_transformation_mode="half_pixel")
    codes = np.random.default_rng(3).integers(-128, 128, (1, 4, 9, 9))
    feeds = {"x": _dq(codes, 0.02, 4)}
    got = _simulated(model, feeds, "op_out_q")
    ort = np.rint(run_onnx(model, feeds)[0] / np.float32(0.02)) + 4
    # weights 1/4, 3/4 per axis: the exact value is a multiple of 1/16 of the codes
    import torch
    import torch.nn.functional as F

    exact = F.interpolate(torch.tensor(codes, dtype=torch.float64), scale_factor=2.0, mode="bilinear", align_corners=False).numpy()
    _assert_exact_rounding(got, exact)
    differ = ort != got
    assert np.abs(ort - got).max() <= 1
    np.testing.assert_array_equal(exact[differ] - np.floor(exact[differ]), 0.5)


def test_resize_with_an_unknown_mode_falls_back_to_the_host_when_built():
    # The mode used to be read only when the kernel ran: an unknown one raised from inside a run.
    placement = Simulator(_resize_x2(5, mode="nearest", nearest_mode="round_half_down"), None).placement["op"]
    assert placement[0] == "host" and "nearest_mode 'round_half_down'" in placement[1], placement
