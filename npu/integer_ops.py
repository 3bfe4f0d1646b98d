"""Integer tensor arithmetic for the simulator: exact int32 accumulation and window ops.

Exact integer GEMM on float64 BLAS: numpy has no BLAS for integers (its integer matmul is a
slow scalar loop), but every product of two int8 values (zero points removed: |v| <= 255) and
every partial sum of K of them is an integer below 255 * 255 * K, exactly representable in
float64 while that stays under 2^53 (K < 1.3e11). So a float64 matmul of integer-valued
arrays returns exactly the int32 accumulation, bit for bit; `exact_matmul` checks the bound.
"""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

EXACT_LIMIT = 2.0**53


def exact_matmul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b for integer arrays (numpy matmul broadcasting), exactly, as int64."""
    k = a.shape[-1]
    bound = float(np.max(np.abs(a), initial=0)) * float(np.max(np.abs(b), initial=0)) * k
    if bound >= EXACT_LIMIT:  # never for int8 operands; kept so the claim above is checked
        return np.matmul(a.astype(np.int64), b.astype(np.int64))
    return np.matmul(a.astype(np.float64), b.astype(np.float64)).astype(np.int64)


# ---- window geometry -------------------------------------------------------------------------------


def _ints(attrs: dict, name: str, n: int, default: int) -> list[int]:
    v = attrs.get(name)
    return [int(x) for x in v] if v is not None and len(v) else [default] * n


def window_pads(in_sizes, kernel, strides, dilations, attrs, *, ceil_mode: bool = False) -> tuple[list[int], list[int], list[int]]:
    """(pads_begin, pads_end, output sizes) of a Conv / pooling window by the ONNX rules."""
    n = len(in_sizes)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        out = [-(-i // s) for i, s in zip(in_sizes, strides)]
        total = [max(0, (o - 1) * s + e - i) for o, s, e, i in zip(out, strides, eff, in_sizes)]
        small = [t // 2 for t in total]
        big = [t - t // 2 for t in total]
        begin, end = (small, big) if auto == "SAME_UPPER" else (big, small)
        return begin, end, out
    if auto == "VALID":
        begin, end = [0] * n, [0] * n
    else:
        pads = _ints(attrs, "pads", 2 * n, 0)
        begin, end = pads[:n], pads[n:]
    out = []
    for i, s, e, b, en in zip(in_sizes, strides, eff, begin, end):
        span = i + b + en - e
        o = (-(-span // s) if ceil_mode else span // s) + 1
        if ceil_mode and (o - 1) * s >= i + b:  # the last window may not start in the end padding
            o -= 1
        out.append(o)
    return begin, end, out


def windows(x: np.ndarray, kernel, strides, dilations, begin, end, out, pad_value) -> np.ndarray:
    """Strided sliding windows over the spatial axes (2..): shape (N, C, *out, *kernel), a view
    of the padded input where possible."""
    n = len(kernel)
    eff = [(k - 1) * d + 1 for k, d in zip(kernel, dilations)]
    extra = [max(0, (o - 1) * s + e - (i + b + en)) for o, s, e, i, b, en in zip(out, strides, eff, x.shape[2:], begin, end)]
    widths = [(0, 0), (0, 0)] + [(b, en + ex) for b, en, ex in zip(begin, end, extra)]
    xp = np.pad(x, widths, constant_values=pad_value) if any(w != (0, 0) for w in widths) else x
    w = sliding_window_view(xp, eff, axis=tuple(range(2, 2 + n)))
    index = (slice(None), slice(None)) + tuple(slice(0, (o - 1) * s + 1, s) for o, s in zip(out, strides)) + tuple(slice(None, None, d) for d in dilations)
    return w[index]


# ---- convolutions ----------------------------------------------------------------------------------


def conv(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """ONNX Conv on integers (zero points already removed): int64 accumulators (N, M, *out)."""
    n = x.ndim - 2
    kernel = list(w.shape[2:])
    strides = _ints(attrs, "strides", n, 1)
    dilations = _ints(attrs, "dilations", n, 1)
    group = int(attrs.get("group", 1))
    begin, end, out = window_pads(x.shape[2:], kernel, strides, dilations, attrs)
    win = windows(x, kernel, strides, dilations, begin, end, out, 0)  # (N, C, *out, *k)
    batch, channels = x.shape[:2]
    m = w.shape[0]
    cg, mg = channels // group, m // group
    p = int(np.prod(out))
    kk = int(np.prod(kernel))
    win = win.reshape((batch, group, cg) + tuple(out) + tuple(kernel))
    spatial = tuple(range(3, 3 + n))
    ks = tuple(range(3 + n, 3 + 2 * n))
    cols = win.transpose((1, 0) + spatial + (2,) + ks).reshape(group, batch * p, cg * kk)
    wk = w.reshape(group, mg, cg * kk).transpose(0, 2, 1)
    acc = exact_matmul(cols, wk)  # (G, N*P, Mg)
    acc = acc.reshape((group, batch) + tuple(out) + (mg,))
    acc = np.moveaxis(acc, -1, 1)  # (G, Mg, N, *out)
    acc = acc.reshape((m, batch) + tuple(out))
    return np.moveaxis(acc, 1, 0)


def conv_transpose(x: np.ndarray, w: np.ndarray, attrs: dict) -> np.ndarray:
    """ONNX ConvTranspose on integers: weight (C_in, C_out / group, *k); int64 (N, C_out, *out)."""
    n = x.ndim - 2
    kernel = list(w.shape[2:])
    strides = _ints(attrs, "strides", n, 1)
    dilations = _ints(attrs, "dilations", n, 1)
    out_pad = _ints(attrs, "output_padding", n, 0)
    group = int(attrs.get("group", 1))
    batch, cin = x.shape[:2]
    in_sizes = list(x.shape[2:])
    full = [s * (i - 1) + (k - 1) * d + 1 for s, i, k, d in zip(strides, in_sizes, kernel, dilations)]
    out_shape = attrs.get("output_shape")
    auto = attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if out_shape is not None and len(out_shape) or auto in ("SAME_UPPER", "SAME_LOWER"):
        target = [int(v) for v in out_shape][-n:] if out_shape is not None and len(out_shape) else [i * s for i, s in zip(in_sizes, strides)]
        total = [f + op - t for f, op, t in zip(full, out_pad, target)]
        if auto == "SAME_UPPER":
            begin = [t // 2 for t in total]
        else:
            begin = [t - t // 2 for t in total]
        end = [t - b for t, b in zip(total, begin)]
    else:
        pads = _ints(attrs, "pads", 2 * n, 0)
        begin, end = pads[:n], pads[n:]
    cg = cin // group
    mg = w.shape[1]
    kk = int(np.prod(kernel))
    p = int(np.prod(in_sizes))
    xs = x.reshape((batch, group, cg, p)).transpose(1, 0, 3, 2).reshape(group, batch * p, cg)
    wk = w.reshape(group, cg, mg * kk)
    cols = exact_matmul(xs, wk).reshape((group, batch) + tuple(in_sizes) + (mg,) + tuple(kernel))
    sizes = [f + op for f, op in zip(full, out_pad)]
    acc = np.zeros((group, mg, batch) + tuple(sizes), np.int64)
    # scatter-add each kernel tap: input position i lands on output i * stride + tap * dilation
    cols = np.moveaxis(cols, 2 + n, 1)  # (G, Mg, N, *in, *k)
    for tap in np.ndindex(*kernel):
        dst = (slice(None),) * 3 + tuple(slice(t * d, t * d + s * (i - 1) + 1, s) for t, d, s, i in zip(tap, dilations, strides, in_sizes))
        acc[dst] += cols[(Ellipsis,) + tap]
    acc = acc.reshape((group * mg, batch) + tuple(sizes))
    crop = (slice(None), slice(None)) + tuple(slice(b, sz - e) for b, e, sz in zip(begin, end, sizes))
    return np.moveaxis(acc[crop], 1, 0)


# ---- pooling -----------------------------------------------------------------------------------------


def pool_geometry(x: np.ndarray, attrs: dict):
    n = x.ndim - 2
    kernel = _ints(attrs, "kernel_shape", n, 1)
    strides = _ints(attrs, "strides", n, 1)
    dilations = _ints(attrs, "dilations", n, 1)
    begin, end, out = window_pads(x.shape[2:], kernel, strides, dilations, attrs, ceil_mode=bool(attrs.get("ceil_mode", 0)))
    return kernel, strides, dilations, begin, end, out


def max_pool(q: np.ndarray, attrs: dict, pad_value: int) -> np.ndarray:
    kernel, strides, dilations, begin, end, out = pool_geometry(q, attrs)
    win = windows(q, kernel, strides, dilations, begin, end, out, pad_value)
    n = len(kernel)
    return win.max(axis=tuple(range(-n, 0)))


def window_sums(x: np.ndarray, attrs: dict) -> tuple[np.ndarray, np.ndarray]:
    """(sum over each AveragePool window of x, as int64; the number it is divided by).

    x holds q - zero_point, so padding (real 0) adds nothing; the count is the window's
    elements inside the input, or inside input and pads with count_include_pad (never the
    extra end padding of ceil_mode)."""
    kernel, strides, dilations, begin, end, out = pool_geometry(x, attrs)
    n = len(kernel)
    axes = tuple(range(-n, 0))
    sums = windows(x.astype(np.int64), kernel, strides, dilations, begin, end, out, 0).sum(axis=axes)
    ones = np.ones((1, 1) + x.shape[2:], np.int64)
    if attrs.get("count_include_pad", 0):
        ones = np.pad(ones, [(0, 0), (0, 0)] + list(zip(begin, end)), constant_values=1)
        count = windows(ones, kernel, strides, dilations, [0] * n, [0] * n, out, 0).sum(axis=axes)
    else:
        count = windows(ones, kernel, strides, dilations, begin, end, out, 0).sum(axis=axes)
    return sums, count


# ---- resize -------------------------------------------------------------------------------------------


COORDINATE_MODES = ("half_pixel", "pytorch_half_pixel", "align_corners", "asymmetric", "half_pixel_symmetric")
NEAREST_MODES = ("round_prefer_floor", "round_prefer_ceil", "floor", "ceil")


def source_coordinates(out_size: int, in_size: int, scale: float, mode: str) -> np.ndarray:
    """ONNX Resize coordinate_transformation_mode, computed in float32 (as onnxruntime does)."""
    x = np.arange(out_size, dtype=np.float32)
    scale = np.float32(scale)
    if mode == "half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5)
    if mode == "pytorch_half_pixel":
        return (x + np.float32(0.5)) / scale - np.float32(0.5) if out_size > 1 else np.zeros_like(x)
    if mode == "align_corners":
        return x * np.float32(in_size - 1) / np.float32(out_size - 1) if out_size > 1 else np.zeros_like(x)
    if mode == "asymmetric":
        return x / scale
    if mode == "half_pixel_symmetric":
        adjustment = np.float32(out_size) / (scale * np.float32(in_size))
        center = np.float32(in_size) / np.float32(2)
        offset = center * (np.float32(1) - adjustment)
        return offset + (x + np.float32(0.5)) / scale - np.float32(0.5)
    raise ValueError(f"coordinate_transformation_mode {mode!r}; known: {', '.join(COORDINATE_MODES)}")


def nearest_indices(coords: np.ndarray, in_size: int, mode: str) -> np.ndarray:
    if mode == "round_prefer_floor":
        idx = np.ceil(coords - np.float32(0.5))
    elif mode == "round_prefer_ceil":
        idx = np.floor(coords + np.float32(0.5))
    elif mode == "floor":
        idx = np.floor(coords)
    elif mode == "ceil":
        idx = np.ceil(coords)
    else:
        raise ValueError(f"nearest_mode {mode!r}; known: {', '.join(NEAREST_MODES)}")
    return np.clip(idx.astype(np.int64), 0, in_size - 1)


LERP_BITS = 10  # TFLite's integer bilinear resize keeps 10 fractional bits per axis


def linear_taps(coords: np.ndarray, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight in 1/2^LERP_BITS units) per output position."""
    c = np.clip(coords, 0, in_size - 1).astype(np.float64)
    lo = np.floor(c).astype(np.int64)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = c - lo
    w = np.floor(frac * (1 << LERP_BITS) + 0.5).astype(np.int64)
    return lo, hi, w
