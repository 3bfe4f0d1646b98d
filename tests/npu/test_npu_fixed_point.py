"""The TFLite / gemmlowp fixed-point helpers against values worked out by hand from their C
definitions (tensorflow/lite/kernels/internal/common.h, quantization_util.cc)."""

from __future__ import annotations

import numpy as np
import pytest

from npu.fixed_point import (
    INT32_MAX,
    INT32_MIN,
    Requantizer,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    rounding_divide,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
)


@pytest.mark.parametrize(
    "real, multiplier, shift",
    [
        (0.5, 2**30, 0),  # frexp(0.5) = 0.5 * 2^0
        (1.0, 2**30, 1),  # 0.5 * 2^1
        (0.75, 1610612736, 0),  # 0.75 * 2^31
        (3.0, 1610612736, 2),  # 0.75 * 2^2
        (0.1, 1717986918, -3),  # 0.8 * 2^-3; 0.8 * 2^31 = 1717986918.4 rounds down
        (1 - 2**-40, 2**30, 1),  # q * 2^31 rounds up to 2^31: renormalised to 2^30, shift + 1
        (2**-40, 0, 0),  # shift -39 < -31: flushed to zero as TFLite does
        (0.0, 0, 0),
    ],
)
def test_quantize_multiplier(real, multiplier, shift):
    m, s = quantize_multiplier(real)
    assert (int(m), int(s)) == (multiplier, shift)


def test_quantize_multiplier_rejects_negative():
    with pytest.raises(ValueError):
        quantize_multiplier(-0.5)


@pytest.mark.parametrize(
    "a, b, expected",
    [
        (2**30, 2**30, 2**29),  # (2^60 + 2^30) / 2^31 = 2^29 + 1/2, truncated
        (5, 2**30, 3),  # 2.5: a positive tie rounds up
        (-5, 2**30, -2),  # -2.5: the nudge 1 - 2^30 makes a negative tie round toward zero
        (-7, 2**30, -3),  # -3.5 -> -3
        (-6, 2**30, -3),  # exact
        (100, 1717986918, 80),  # 100 * 0.8 (1717986918 / 2^31 = 0.79999999981)
        (INT32_MIN, INT32_MIN, INT32_MAX),  # the one saturating case
    ],
)
def test_saturating_rounding_doubling_high_mul(a, b, expected):
    assert int(saturating_rounding_doubling_high_mul(a, b)) == expected


@pytest.mark.parametrize(
    "x, exponent, expected",
    [(5, 1, 3), (-5, 1, -3), (4, 1, 2), (7, 2, 2), (-7, 2, -2), (6, 2, 2), (-6, 2, -2), (5, 2, 1), (-5, 2, -1), (9, 0, 9), (-1, 31, 0)],
)
def test_rounding_divide_by_pot_rounds_ties_away_from_zero(x, exponent, expected):
    assert int(rounding_divide_by_pot(x, exponent)) == expected


def test_multiply_by_quantized_multiplier_double_and_single_rounding():
    # 4037 * M with M = 1702035889 * 2^-39 = 12.49849... / 4037 (a Conv output just below a tie)
    # double: SaturatingRoundingDoublingHighMul -> round(4037 * 1702035889 / 2^31) = 3200, then
    #         RoundingDivideByPOT(3200, 8) = 12.5 -> 13 (the first rounding crossed the tie)
    assert int(multiply_by_quantized_multiplier(4037, 1702035889, -8, "double")) == 13
    # single: (4037 * 1702035889 + 2^38) >> 39 = (6871118883893 + 2^38) >> 39 = 12
    assert int(multiply_by_quantized_multiplier(4037, 1702035889, -8, "single")) == 12
    # a multiplier above one (3.0 = 1610612736 * 2^(2 - 31)): both give 30 for x = 10
    assert int(multiply_by_quantized_multiplier(10, 1610612736, 2, "double")) == 30
    assert int(multiply_by_quantized_multiplier(10, 1610612736, 2, "single")) == 30
    # negative accumulators: -2.5 (x = -5, M = 0.5): single rounds the tie toward +inf,
    # double rounds it toward zero in the high mul (the result of the shift-free path)
    assert int(multiply_by_quantized_multiplier(-5, 2**30, 0, "single")) == -2
    assert int(multiply_by_quantized_multiplier(-5, 2**30, 0, "double")) == -2
    assert int(multiply_by_quantized_multiplier(-5, 2**30, -1, "double")) == -1  # -1.25


@pytest.mark.parametrize("x, count, expected", [(5, 2, 3), (-5, 2, -3), (7, 4, 2), (6, 4, 2), (-6, 4, -2), (2, 4, 1), (-2, 4, -1), (1, 4, 0), (-1, 4, 0)])
def test_rounding_divide_is_tflite_average(x, count, expected):
    # TFLite AveragePool: acc > 0 ? (acc + n/2) / n : (acc - n/2) / n, C division truncating
    assert int(rounding_divide(x, count)) == expected


@pytest.mark.parametrize("rounding", ["single", "double"])
def test_requantizer_is_within_half_a_step_of_the_real_product(rounding):
    rng = np.random.default_rng(0)
    real = rng.uniform(1e-4, 0.9, 64)
    acc = rng.integers(-(2**20), 2**20, (1000, 64))
    got = Requantizer(real, rounding)(acc)
    exact = acc * real
    # single rounding: the only error is the 31-bit multiplier (relative <= 2^-31) plus rounding;
    # double rounding: the high mul keeps -shift fractional bits, so up to 2^(shift - 1) more
    slack = 0.5 + np.abs(exact) * 2.0**-31 + (0 if rounding == "single" else 0.5)
    assert np.all(np.abs(got - exact) <= slack)
    assert got.dtype == np.int64


def test_requantizer_rejects_unknown_rounding():
    with pytest.raises(ValueError, match="rounding"):
        Requantizer(0.5, "nearest")
