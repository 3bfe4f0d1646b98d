"""The simulator's integer tensor ops against PyTorch in float64 (exact for these integers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from npu import integer_ops as iops


def _t(a):
    return torch.tensor(a, dtype=torch.float64)


@pytest.mark.parametrize(
    "groups, cin, cout, kernel, stride, pad, dilation",
    [(1, 3, 8, 3, 1, 1, 1), (4, 8, 8, 3, 2, 1, 1), (8, 8, 8, 3, 1, 2, 2), (1, 4, 6, 1, 1, 0, 1), (2, 4, 6, (3, 5), (2, 1), (1, 2), (1, 2)), (16, 16, 16, 5, 1, 2, 1)],
)
def test_conv_and_conv_transpose_match_torch_exactly(groups, cin, cout, kernel, stride, pad, dilation):
    rng = np.random.default_rng(0)
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    k, s, p, d = pair(kernel), pair(stride), pair(pad), pair(dilation)
    x = rng.integers(-255, 256, (2, cin, 9, 11))
    attrs = {"group": groups, "strides": list(s), "pads": list(p) * 2, "dilations": list(d)}
    w = rng.integers(-127, 128, (cout, cin // groups) + k)
    ref = F.conv2d(_t(x), _t(w), stride=s, padding=p, dilation=d, groups=groups).numpy()
    np.testing.assert_array_equal(iops.conv(x, w, attrs), ref)
    wt = rng.integers(-127, 128, (cin, cout // groups) + k)
    for out_pad in ((0, 0), (1, 1)):
        if max(out_pad) >= max(max(s), max(d)):
            continue  # torch requires output_padding < stride or dilation
        ref = F.conv_transpose2d(_t(x), _t(wt), stride=s, padding=p, output_padding=out_pad, groups=groups, dilation=d).numpy()
        got = iops.conv_transpose(x, wt, {**attrs, "output_padding": list(out_pad)})
        np.testing.assert_array_equal(got, ref)


def test_conv_same_upper_and_1d():
    rng = np.random.default_rng(1)
    x = rng.integers(-255, 256, (1, 3, 10, 7))
    w = rng.integers(-127, 128, (4, 3, 3, 3))
    got = iops.conv(x, w, {"auto_pad": "SAME_UPPER", "strides": [2, 2]})
    ref = F.conv2d(F.pad(_t(x), (1, 1, 0, 1)), _t(w), stride=2).numpy()  # total pad W: 2, H: 1 (end)
    np.testing.assert_array_equal(got, ref)
    x1 = rng.integers(-255, 256, (2, 3, 20))
    w1 = rng.integers(-127, 128, (5, 3, 4))
    np.testing.assert_array_equal(iops.conv(x1, w1, {"pads": [2, 1], "strides": [3]}), F.conv1d(F.pad(_t(x1), (2, 1)), _t(w1), stride=3).numpy())


def test_exact_matmul_is_the_integer_product():
    rng = np.random.default_rng(2)
    a = rng.integers(-255, 256, (3, 50, 700))
    b = rng.integers(-255, 256, (700, 20))
    np.testing.assert_array_equal(iops.exact_matmul(a, b), np.einsum("bik,kj->bij", a.astype(np.int64), b.astype(np.int64)))
    big = np.full((1, 2), 2**27 + 1)  # 2 (2^27 + 1)^2 > 2^53: float64 would round it
    assert int(iops.exact_matmul(big, big.T)[0, 0]) == 2 * (2**27 + 1) ** 2


@pytest.mark.parametrize(
    "attrs, torch_kwargs",
    [
        ({"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}, dict(kernel_size=3, stride=2, padding=1)),
        ({"kernel_shape": [3, 3], "strides": [2, 2], "ceil_mode": 1}, dict(kernel_size=3, stride=2, ceil_mode=True)),
        ({"kernel_shape": [2, 2], "strides": [2, 2]}, dict(kernel_size=2, stride=2)),
    ],
)
def test_pooling_matches_torch(attrs, torch_kwargs):
    rng = np.random.default_rng(3)
    x = rng.integers(-128, 128, (2, 3, 9, 10))
    np.testing.assert_array_equal(iops.max_pool(x, attrs, -128), F.max_pool2d(_t(x), **torch_kwargs).numpy())
    for include_pad in (0, 1):
        sums, count = iops.window_sums(x, {**attrs, "count_include_pad": include_pad})
        ref = F.avg_pool2d(_t(x), count_include_pad=bool(include_pad), **torch_kwargs).numpy()
        np.testing.assert_allclose(sums / count, ref, rtol=0, atol=1e-12)


def test_dilated_max_pool_matches_torch():
    x = np.random.default_rng(4).integers(-128, 128, (1, 2, 11, 11))
    got = iops.max_pool(x, {"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 2]}, -128)
    np.testing.assert_array_equal(got, F.max_pool2d(_t(x), 2, stride=2, dilation=2).numpy())


@pytest.mark.parametrize("mode", ["half_pixel", "asymmetric", "pytorch_half_pixel"])
def test_nearest_resize_indices_match_torch(mode):
    x = np.arange(7 * 5).reshape(1, 1, 7, 5)
    out = (13, 11)
    idx = [iops.nearest_indices(iops.source_coordinates(o, i, o / i, mode), i, "floor" if mode == "asymmetric" else "round_prefer_ceil") for o, i in zip(out, x.shape[2:])]
    got = x[:, :, idx[0][:, None], idx[1][None, :]]
    ref_mode = "nearest" if mode == "asymmetric" else "nearest-exact"
    np.testing.assert_array_equal(got, F.interpolate(_t(x), size=out, mode=ref_mode).numpy())


def test_linear_taps_weights_are_10_bit():
    lo, hi, w = iops.linear_taps(iops.source_coordinates(8, 4, 2.0, "half_pixel"), 4)
    # half_pixel x2: source x = (i + 0.5) / 2 - 0.5 = -0.25, 0.25, 0.75, ... clamped at 0 and 3
    np.testing.assert_array_equal(lo, [0, 0, 0, 1, 1, 2, 2, 3])
    np.testing.assert_array_equal(hi, [1, 1, 1, 2, 2, 3, 3, 3])
    np.testing.assert_array_equal(w, [0, 256, 768, 256, 768, 256, 768, 0])
