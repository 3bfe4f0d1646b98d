"""Integer kernels: one per node unit "DequantizeLinear inputs -> op -> QuantizeLinear".

Each builder reads a unit once (parameters, weights, multipliers, tables: compile time) and
returns a Kernel whose `run(lookup)` maps int8 inputs to the int8 outputs of the unit's
QuantizeLinear nodes, as the chip would, with TFLite's integer arithmetic:

* Conv / ConvTranspose / Gemm / MatMul (+ int32 bias): int32 accumulation of (x - zx) * w,
  + bias, requantized per output channel by M = sx * sw / sy (QuantizeMultiplier +
  MultiplyByQuantizedMultiplier), + zy, clamped to the fused activation's range;
* Add / Sub: TFLite's scheme (inputs shifted left 20 bits, rescaled by per-input multipliers to
  a common scale 2 * max(sa, sb), summed, rescaled to the output);
* Mul: (a - za) * (b - zb) rescaled by sa * sb / sy; Div by a constant: rescaled by
  sa / (c * sy), c the divisor's dequantized value (folded at compile time);
* AveragePool: window sum, divided with rounding (TFLite); GlobalAveragePool / ReduceMean /
  ReduceSum: sum of (q - zx) rescaled by sx / (sy * N) (1/N folded into the multiplier);
* MaxPool, Concat, Reshape, Transpose, Slice, Gather, Split, Pad, Resize (nearest), ...: moves
  int8 values, requantizing (q - zx) * sx / sy where the output's parameters differ;
* Resize (linear): TFLite's integer bilinear (10 fractional bits per axis, one rounding);
* Softmax: an exp lookup table (256 int32 entries, Q2.30, per input scale), int64 row sums,
  probabilities by integer division, requantized to the output;
* Sigmoid, Tanh, HardSwish, Erf, Relu, Clip, LeakyRelu, Exp, ... (elementwise, one input): an
  int8 -> int8 256-entry lookup table, computed once per (input, output) parameter pair by
  evaluating the float op on the 256 dequantized codes and quantizing the results.

A builder raises NoKernel(why) when it cannot run a unit in integers; the simulator then runs
that op in float between its DequantizeLinear and QuantizeLinear (host fallback) and says why.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from . import integer_ops as iops
from .fixed_point import INT32_MAX, INT32_MIN, Requantizer, rounding_divide
from .units import QDQModel, QParams, Unit, activation_bounds

Lookup = Callable[[str], np.ndarray]
INPUT_SHIFT = 20  # TFLite's left shift of int8 Add/Sub inputs


class NoKernel(Exception):
    """The unit has no integer kernel here (the reason is the message)."""


@dataclass
class Operand:
    """An int8 (or int32) input of a unit: a run-time tensor or a quantized constant."""

    params: QParams
    name: str | None = None
    const: np.ndarray | None = None

    def value(self, lookup: Lookup) -> np.ndarray:
        return self.const if self.const is not None else lookup(self.name)

    def centered(self, lookup: Lookup) -> np.ndarray:
        """q - zero_point as int64 (per axis where the parameters are)."""
        q = self.value(lookup).astype(np.int64)
        return q - self.params.broadcast(q.ndim)[1]

    @property
    def per_tensor(self) -> bool:
        return self.params.axis is None or self.params.scale.size == 1


@dataclass
class Output:
    index: int  # which output of the op
    name: str  # the QuantizeLinear output it produces
    params: QParams
    bounds: tuple[int, int]  # clamp (fused activation, type range)


@dataclass
class Kernel:
    kind: str
    outputs: list[str]
    run: Callable[[Lookup], list[np.ndarray]]


class UnitContext:
    def __init__(self, qm: QDQModel, unit: Unit, host_eval, rounding: str = "single"):
        self.qm, self.unit, self.node = qm, unit, unit.node
        self.rounding = rounding
        self.host_eval = host_eval  # (node, float inputs) -> float outputs, for tables
        self.attrs = {k: _attr(a.value) for k, a in self.node.attributes.items()}
        self.outputs: list[Output] = []
        for k, qs in sorted(unit.q_outputs.items()):
            for q in qs:
                p = qm.qparams(q)
                if p.axis is not None and p.scale.size > 1:
                    raise NoKernel(f"output {q.name!r} is quantized per axis")
                self.outputs.append(Output(k, q.outputs[0].name, p, activation_bounds(unit, p)))

    def operand(self, i: int) -> Operand:
        dq = self.unit.dq_inputs.get(i)
        if dq is None:
            raise NoKernel(f"input {i} is not quantized")
        p = self.qm.qparams(dq)
        src = dq.inputs[0]
        c = self.qm.const(src)
        if c is not None:
            return Operand(p, const=np.asarray(c))
        return Operand(p, name=src.name)

    def activation(self, i: int) -> Operand:
        op = self.operand(i)
        if not op.per_tensor:
            raise NoKernel(f"input {i} is quantized per axis")
        return op

    def raw(self, i: int):
        """A non-quantized input: a constant array, a run-time name, or None if absent."""
        v = self.node.inputs[i] if i < len(self.node.inputs) else None
        if v is None:
            return None
        c = self.qm.const(v)
        return np.asarray(c) if c is not None else v.name

    def const_input(self, i: int, what: str) -> np.ndarray | None:
        r = self.raw(i)
        if isinstance(r, str):
            raise NoKernel(f"{what} (input {i}) is computed at run time")
        return r

    def rq(self, real) -> Requantizer:
        return Requantizer(real, self.rounding)

    def requantize(self, q: np.ndarray, src: QParams, dst: QParams) -> np.ndarray:
        return requantize(q, src, dst, self.rounding)

    def finish(self, y: np.ndarray, out: Output) -> np.ndarray:
        return np.clip(y, *out.bounds).astype(out.params.dtype)


def _attr(v):
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, (list, tuple)):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


def _value(x, lookup: Lookup):
    return lookup(x) if isinstance(x, str) else x


class AccumulatorOverflowWarning(UserWarning):
    pass


def check_int32(acc: np.ndarray, where: str) -> None:
    """The chip's accumulators are int32; say so when a sum leaves that range."""
    if acc.size and (acc.max() > INT32_MAX or acc.min() < INT32_MIN):
        warnings.warn(f"{where}: int32 accumulator overflow (range {acc.min()}..{acc.max()})", AccumulatorOverflowWarning, stacklevel=3)


def requantize(q: np.ndarray, src: QParams, dst: QParams, rounding: str = "single") -> np.ndarray:
    """int -> int with new parameters: (q - zx) * sx / sy + zy (TFLite Requantize)."""
    if src.same_as(dst):
        return q
    sx, zx = src.per_tensor()
    sy, zy = dst.per_tensor()
    y = Requantizer(sx / sy, rounding)(q.astype(np.int64) - zx) + zy
    return np.clip(y, dst.qmin, dst.qmax).astype(dst.dtype)


# ---- Conv / ConvTranspose / Gemm / MatMul ------------------------------------------------------------


def _weight_scale_per_output(op: str, p: QParams, shape: tuple[int, ...], attrs: dict) -> np.ndarray:
    """The weight scale of each output channel (a scalar when per tensor)."""
    if p.axis is None or p.scale.size == 1:
        return np.float64(p.scale.reshape(-1)[0])
    axis = p.axis % len(shape)
    s = p.scale.astype(np.float64)
    if op == "Conv" and axis == 0:
        return s
    if op == "ConvTranspose":
        group = int(attrs.get("group", 1))
        if axis == 1:  # (C_in, C_out / group, k...): output channel o uses scale o % (C_out / group)
            return np.tile(s, group)
        if axis == 0 and shape[1] == 1 and shape[0] == group:  # one input channel per output
            return s
    if op == "Gemm" and axis == (0 if attrs.get("transB", 0) else 1):
        return s
    if op == "MatMul" and axis == len(shape) - 1:
        return s
    raise NoKernel(f"weight scales along axis {axis} vary within an output channel's sum")


def build_linear(ctx: UnitContext) -> Kernel:
    node, op, attrs = ctx.node, ctx.node.op_type, ctx.attrs
    x = ctx.activation(0)
    w = ctx.operand(1)
    sx, zx = x.params.per_tensor()
    alpha = float(attrs.get("alpha", 1.0)) if op == "Gemm" else 1.0
    beta = float(attrs.get("beta", 1.0)) if op == "Gemm" else 1.0
    if alpha <= 0:
        raise NoKernel("Gemm alpha <= 0")
    if w.const is not None:
        wq = w.centered(lambda _: None)
        sw = _weight_scale_per_output(op, w.params, wq.shape, attrs)
    else:
        if not w.per_tensor:
            raise NoKernel("activation B quantized per axis")
        sw = np.float64(w.params.per_tensor()[0])
        wq = None
    acc_scale = sx * np.asarray(sw, np.float64)  # real value of one accumulator unit, per channel
    bias_idx = -1 if ctx.unit.bias_add is not None else (2 if 2 in ctx.unit.dq_inputs else None)
    bias = None
    if bias_idx is not None:
        b = ctx.operand(bias_idx)
        if b.const is None:
            raise NoKernel("bias is not a constant")
        bq = b.centered(lambda _: None)
        bscale = np.broadcast_to(b.params.broadcast(bq.ndim)[0], bq.shape).astype(np.float64) * beta
        want = np.broadcast_to(acc_scale, bq.shape[-1:]) if np.ndim(acc_scale) else acc_scale
        ratio = bscale / want
        # the spec's bias scale is float32(sx * sw): use the int32 values as they are when equal
        bias = bq if beta == 1.0 and np.allclose(ratio, 1.0, rtol=2e-7, atol=0) else np.sign(bq * ratio) * np.floor(np.abs(bq * ratio) + 0.5)
        bias = bias.astype(np.int64)
    channel_axis = 1 if op in ("Conv", "ConvTranspose") else -1
    requantizers = [ctx.rq(acc_scale * alpha / out.params.per_tensor()[0]) for out in ctx.outputs]

    def run(lookup: Lookup) -> list[np.ndarray]:
        xv = x.centered(lookup)
        wv = wq if wq is not None else w.centered(lookup)
        if op == "Conv":
            acc = iops.conv(xv, wv, attrs)
        elif op == "ConvTranspose":
            acc = iops.conv_transpose(xv, wv, attrs)
        elif op == "Gemm":
            a = xv.T if attrs.get("transA", 0) else xv
            bm = wv.T if attrs.get("transB", 0) else wv
            acc = iops.exact_matmul(a, bm)
        else:
            acc = iops.exact_matmul(xv, wv)
        if bias is not None:
            acc = acc + (bias.reshape((-1,) + (1,) * (acc.ndim - 2)) if channel_axis == 1 else bias)
        check_int32(acc, node.name)
        results = []
        for out, r in zip(ctx.outputs, requantizers):
            if r.real.ndim and channel_axis == 1:
                r = r.reshaped((-1,) + (1,) * (acc.ndim - 2))
            results.append(ctx.finish(r(acc) + out.params.per_tensor()[1], out))
        return results

    return Kernel(f"{op} int32 accumulate + requantize", [o.name for o in ctx.outputs], run)


# ---- elementwise binary --------------------------------------------------------------------------


def build_add(ctx: UnitContext) -> Kernel:
    a, b = ctx.activation(0), ctx.activation(1)
    sa, za = a.params.per_tensor()
    sb, zb = b.params.per_tensor()
    twice_max = 2.0 * max(sa, sb)
    ra, rb = ctx.rq(sa / twice_max), ctx.rq(sb / twice_max)
    routs = [ctx.rq(twice_max / ((1 << INPUT_SHIFT) * o.params.per_tensor()[0])) for o in ctx.outputs]
    sign = -1 if ctx.node.op_type == "Sub" else 1

    def run(lookup):
        va = ra((a.value(lookup).astype(np.int64) - za) << INPUT_SHIFT)
        vb = rb((b.value(lookup).astype(np.int64) - zb) << INPUT_SHIFT)
        raw = va + sign * vb
        return [ctx.finish(r(raw) + o.params.per_tensor()[1], o) for o, r in zip(ctx.outputs, routs)]

    return Kernel(f"{ctx.node.op_type} (TFLite: inputs << {INPUT_SHIFT}, per-input multipliers)", [o.name for o in ctx.outputs], run)


def build_mul(ctx: UnitContext) -> Kernel:
    a, b = ctx.activation(0), ctx.activation(1)
    sa, za = a.params.per_tensor()
    sb, zb = b.params.per_tensor()
    routs = [ctx.rq(sa * sb / o.params.per_tensor()[0]) for o in ctx.outputs]

    def run(lookup):
        raw = (a.value(lookup).astype(np.int64) - za) * (b.value(lookup).astype(np.int64) - zb)
        return [ctx.finish(r(raw) + o.params.per_tensor()[1], o) for o, r in zip(ctx.outputs, routs)]

    return Kernel("Mul (a - za)(b - zb) requantized", [o.name for o in ctx.outputs], run)


def build_div(ctx: UnitContext) -> Kernel:
    a, d = ctx.activation(0), ctx.operand(1)
    if d.const is None:
        raise NoKernel("divisor is not a constant (only division by a constant is folded into a multiplier)")
    divisor = d.params.dequantize(d.const).astype(np.float64)
    if np.any(divisor == 0):
        raise NoKernel("divisor has zeros")
    sa, za = a.params.per_tensor()
    sign = np.sign(divisor).astype(np.int64)
    routs = [ctx.rq(sa / (np.abs(divisor) * o.params.per_tensor()[0])) for o in ctx.outputs]

    def run(lookup):
        raw = (a.value(lookup).astype(np.int64) - za) * sign
        return [ctx.finish(r(raw) + o.params.per_tensor()[1], o) for o, r in zip(ctx.outputs, routs)]

    return Kernel("Div by a constant (multiplier sa / (c * sy))", [o.name for o in ctx.outputs], run)


def build_max_min(ctx: UnitContext) -> Kernel:
    ins = [ctx.activation(i) for i in sorted(k for k in ctx.unit.dq_inputs if k >= 0)]
    reduce = np.maximum if ctx.node.op_type == "Max" else np.minimum

    def run(lookup):
        results = []
        for o in ctx.outputs:
            vals = [ctx.requantize(x.value(lookup), x.params, o.params).astype(np.int64) for x in ins]
            results.append(ctx.finish(reduce.reduce(np.broadcast_arrays(*vals)), o))
        return results

    return Kernel(f"{ctx.node.op_type} of requantized inputs", [o.name for o in ctx.outputs], run)


# ---- data movement -----------------------------------------------------------------------------------


def build_concat(ctx: UnitContext) -> Kernel:
    ins = [ctx.activation(i) for i in range(len(ctx.node.inputs)) if ctx.node.inputs[i] is not None]
    axis = int(ctx.attrs.get("axis", 0))

    def run(lookup):
        return [ctx.finish(np.concatenate([ctx.requantize(x.value(lookup), x.params, o.params) for x in ins], axis=axis), o) for o in ctx.outputs]

    return Kernel("Concat (inputs requantized to the output's parameters)", [o.name for o in ctx.outputs], run)


MOVEMENT_OPS = {
    "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Gather", "GatherElements",
    "GatherND", "Split", "Expand", "Identity", "SpaceToDepth", "DepthToSpace", "Tile",
}  # fmt: skip


def build_movement(ctx: UnitContext) -> Kernel:
    """Ops that only move values: run the ONNX op itself on the integers (onnx.reference)."""
    x = ctx.activation(0)
    others = [ctx.raw(i) for i in range(1, len(ctx.node.inputs))]

    def run(lookup):
        ys = ctx.host_eval(ctx.node, [x.value(lookup)] + [_value(o, lookup) for o in others])
        return [ctx.finish(ctx.requantize(ys[o.index], x.params, o.params), o) for o in ctx.outputs]

    return Kernel(f"{ctx.node.op_type} on int8 values", [o.name for o in ctx.outputs], run)


def build_pad(ctx: UnitContext) -> Kernel:
    x = ctx.activation(0)
    mode = ctx.attrs.get("mode", "constant")
    pads_in, value_in, axes_in = ctx.raw(1), ctx.raw(2), ctx.raw(3)
    if pads_in is None:  # opset < 11: attributes
        pads_in = np.asarray(ctx.attrs.get("pads", []), np.int64)
        value_in = np.float32(ctx.attrs.get("value", 0.0))
    if isinstance(value_in, str):
        raise NoKernel("pad value is computed at run time")
    value = np.float32(0.0) if value_in is None or np.size(value_in) == 0 else np.float32(np.asarray(value_in).reshape(-1)[0])
    qvalue = int(x.params.quantize(np.asarray(value)))  # the real pad value in the input's integers
    np_mode = {"constant": "constant", "reflect": "reflect", "edge": "edge", "wrap": "wrap"}.get(mode)
    if np_mode is None:
        raise NoKernel(f"Pad mode {mode!r}")

    def run(lookup):
        q = x.value(lookup)
        pads = np.asarray(_value(pads_in, lookup), np.int64).reshape(-1)
        axes = list(range(q.ndim)) if axes_in is None else [int(a) % q.ndim for a in np.asarray(_value(axes_in, lookup)).reshape(-1)]
        k = len(axes)
        widths = [(0, 0)] * q.ndim
        for j, a in enumerate(axes):
            widths[a] = (int(pads[j]), int(pads[j + k]))
        crop = tuple(slice(max(0, -b), q.shape[a] - max(0, -e) if e < 0 else None) for a, (b, e) in enumerate(widths))
        q = q[crop]
        widths = [(max(0, b), max(0, e)) for b, e in widths]
        y = np.pad(q, widths, mode=np_mode, **({"constant_values": qvalue} if np_mode == "constant" else {}))
        return [ctx.finish(ctx.requantize(y, x.params, o.params), o) for o in ctx.outputs]

    return Kernel(f"Pad ({mode}) on int8 values", [o.name for o in ctx.outputs], run)


def build_resize(ctx: UnitContext) -> Kernel:
    x = ctx.activation(0)
    a = ctx.attrs
    mode = a.get("mode", "nearest")
    coord = a.get("coordinate_transformation_mode", "half_pixel")
    nearest = a.get("nearest_mode", "round_prefer_floor")
    if mode not in ("nearest", "linear"):
        raise NoKernel(f"Resize mode {mode!r}")
    if coord == "tf_crop_and_resize" or a.get("antialias", 0) or a.get("keep_aspect_ratio_policy", "stretch") != "stretch":
        raise NoKernel("Resize with tf_crop_and_resize / antialias / keep_aspect_ratio_policy")
    # Checked here, not when the kernel runs: an unknown mode is a host fallback, not a crash.
    if coord not in iops.COORDINATE_MODES or (mode == "nearest" and nearest not in iops.NEAREST_MODES):
        raise NoKernel(f"Resize coordinate_transformation_mode {coord!r} / nearest_mode {nearest!r}")
    if len(ctx.node.inputs) < 2 or ctx.qm.opset < 11:
        raise NoKernel("Resize before opset 11")
    scales_in, sizes_in = ctx.raw(2), ctx.raw(3)
    axes_attr = a.get("axes")
    sx, zx = x.params.per_tensor()

    def geometry(q, lookup):
        axes = [int(v) % q.ndim for v in axes_attr] if axes_attr else list(range(q.ndim))
        sizes = _value(sizes_in, lookup) if sizes_in is not None else None
        scales = _value(scales_in, lookup) if scales_in is not None else None
        if sizes is not None and np.size(sizes):
            out = [int(v) for v in np.asarray(sizes).reshape(-1)]
            sc = [np.float32(o) / np.float32(q.shape[ax]) for o, ax in zip(out, axes)]
        else:
            sc = [np.float32(v) for v in np.asarray(scales).reshape(-1)]
            out = [int(np.floor(np.float32(q.shape[ax]) * s)) for s, ax in zip(sc, axes)]
        return axes, out, sc

    def run(lookup):
        q = x.value(lookup)
        axes, out, sc = geometry(q, lookup)
        resized = [(ax, o, s) for ax, o, s in zip(axes, out, sc) if o != q.shape[ax] or s != 1]
        if mode == "nearest":
            y = q
            for ax, o, s in resized:
                coords = iops.source_coordinates(o, q.shape[ax], s, coord)
                y = np.take(y, iops.nearest_indices(coords, q.shape[ax], nearest), axis=ax)
            return [ctx.finish(ctx.requantize(y, x.params, o.params), o) for o in ctx.outputs]
        acc = q.astype(np.int64)
        for ax, o, s in resized:  # separable: every axis adds LERP_BITS of fraction, no rounding
            lo, hi, w = iops.linear_taps(iops.source_coordinates(o, q.shape[ax], s, coord), q.shape[ax])
            shape = [1] * acc.ndim
            shape[ax] = -1
            w = w.reshape(shape)
            acc = np.take(acc, lo, axis=ax) * ((1 << iops.LERP_BITS) - w) + np.take(acc, hi, axis=ax) * w
        bits = iops.LERP_BITS * len(resized)
        results = []
        for o in ctx.outputs:
            if x.params.same_as(o.params):  # TFLite interpolates the raw codes, one rounding
                y = rounding_divide(acc, 1 << bits)  # TFLite: (v +- 2^(bits-1)) / 2^bits
            else:
                sy, zy = o.params.per_tensor()
                count = 1 << bits
                y = ctx.rq(sx / (sy * count))(acc - zx * count) + zy
            results.append(ctx.finish(y, o))
        return results

    return Kernel(f"Resize ({mode}) on int8 values", [o.name for o in ctx.outputs], run)


# ---- pooling and reductions --------------------------------------------------------------------------


def build_max_pool(ctx: UnitContext) -> Kernel:
    if len(ctx.node.outputs) > 1 and ctx.node.outputs[1] is not None and ctx.node.outputs[1].uses():
        raise NoKernel("MaxPool indices output is used")
    x = ctx.activation(0)

    def run(lookup):
        y = iops.max_pool(x.value(lookup), ctx.attrs, x.params.qmin)
        return [ctx.finish(ctx.requantize(y, x.params, o.params), o) for o in ctx.outputs]

    return Kernel("MaxPool on int8 values", [o.name for o in ctx.outputs], run)


def build_average_pool(ctx: UnitContext) -> Kernel:
    x = ctx.activation(0)
    sx, zx = x.params.per_tensor()

    def run(lookup):
        sums, count = iops.window_sums(x.centered(lookup), ctx.attrs)
        results = []
        for o in ctx.outputs:
            if x.params.same_as(o.params):  # TFLite: raw codes summed, (sum + count/2) / count
                y = rounding_divide(sums + zx * count, count)
            else:
                sy, zy = o.params.per_tensor()
                y = ctx.rq(sx / (sy * count.astype(np.float64)))(sums) + zy
            results.append(ctx.finish(y, o))
        return results

    return Kernel("AveragePool: integer window sum, rounding division", [o.name for o in ctx.outputs], run)


def build_reduce(ctx: UnitContext) -> Kernel:
    """GlobalAveragePool, ReduceMean, ReduceSum: sum of (q - zx), rescaled by sx / (sy * N)."""
    op = ctx.node.op_type
    x = ctx.activation(0)
    sx, zx = x.params.per_tensor()
    keepdims = bool(ctx.attrs.get("keepdims", 1)) or op == "GlobalAveragePool"
    noop = bool(ctx.attrs.get("noop_with_empty_axes", 0))
    axes_in = ctx.raw(1) if op != "GlobalAveragePool" and len(ctx.node.inputs) > 1 else None
    axes_attr = ctx.attrs.get("axes")

    def run(lookup):
        q = x.value(lookup)
        if op == "GlobalAveragePool":
            axes = tuple(range(2, q.ndim))
        else:
            given = _value(axes_in, lookup) if axes_in is not None else axes_attr
            given = [] if given is None else [int(v) for v in np.asarray(given).reshape(-1)]
            if not given and noop:
                return [ctx.finish(ctx.requantize(q, x.params, o.params), o) for o in ctx.outputs]
            axes = tuple(sorted({a % q.ndim for a in given})) if given else tuple(range(q.ndim))
        n = int(np.prod([q.shape[a] for a in axes]))
        acc = (q.astype(np.int64) - zx).sum(axis=axes, keepdims=keepdims)
        results = []
        for o in ctx.outputs:
            sy, zy = o.params.per_tensor()
            real = sx / (sy * n) if op != "ReduceSum" else sx / sy
            results.append(ctx.finish(ctx.rq(real)(acc) + zy, o))
        return results

    return Kernel(f"{op}: integer sum, 1/N folded into the multiplier", [o.name for o in ctx.outputs], run)


# ---- Softmax and lookup tables -------------------------------------------------------------------------

EXP_BITS = 30  # exp table entries are Q2.30 integers


def build_softmax(ctx: UnitContext) -> Kernel:
    x = ctx.activation(0)
    sx, _ = x.params.per_tensor()
    span = x.params.qmax - x.params.qmin
    # e(d) = exp(-sx * d) for d = max - q in [0, span], as round(e * 2^30): computed once per scale
    table = np.floor(np.exp(-np.float64(sx) * np.arange(span + 1)) * 2.0**EXP_BITS + 0.5).astype(np.int64)
    opset = ctx.qm.opset
    axis = int(ctx.attrs.get("axis", -1 if opset >= 13 else 1))
    routs = [ctx.rq(2.0**-EXP_BITS / o.params.per_tensor()[0]) for o in ctx.outputs]

    def run(lookup):
        q = x.value(lookup).astype(np.int64)
        shape = q.shape
        ax = axis % q.ndim
        if opset < 13:  # the input is seen as 2-D [prod(shape[:axis]), prod(shape[axis:])]
            q = q.reshape(int(np.prod(shape[:ax])), -1)
            ax = 1
        e = table[q.max(axis=ax, keepdims=True) - q]
        total = e.sum(axis=ax, keepdims=True)
        p = (e * (1 << (EXP_BITS + 1)) + total) // (2 * total)  # round(e / total * 2^30), ties up
        return [ctx.finish((r(p) + o.params.per_tensor()[1]).reshape(shape), o) for o, r in zip(ctx.outputs, routs)]

    return Kernel("Softmax: exp table (Q2.30) + integer normalisation", [o.name for o in ctx.outputs], run)


ELEMENTWISE_UNARY = {
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Ceil", "Celu", "Clip", "Cos", "Cosh",
    "Elu", "Erf", "Exp", "Floor", "Gelu", "HardSigmoid", "HardSwish", "LeakyRelu", "Log", "Mish",
    "Neg", "Pow", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh",
    "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
}  # fmt: skip


def build_table(ctx: UnitContext) -> Kernel:
    """An int8 -> int8 lookup table: f evaluated in float on the 256 dequantized codes."""
    x = ctx.activation(0)
    extra = []
    for i in range(1, len(ctx.node.inputs)):
        v = ctx.node.inputs[i]
        if v is None:
            extra.append(None)
            continue
        if i in ctx.unit.dq_inputs:
            c = ctx.operand(i)
            if c.const is None:
                raise NoKernel(f"input {i} is not a constant")
            val = c.params.dequantize(c.const)
        else:
            val = ctx.const_input(i, "operand")
        if val is None or np.size(val) != 1:
            raise NoKernel(f"input {i} is not a scalar constant")
        extra.append(np.asarray(val))
    codes = np.arange(x.params.qmin, x.params.qmax + 1)
    real = ctx.host_eval(ctx.node, [x.params.dequantize(codes)] + extra)[0]
    tables = [np.clip(o.params.quantize(real).astype(np.int64), *o.bounds).astype(o.params.dtype) for o in ctx.outputs]

    def run(lookup):
        idx = x.value(lookup).astype(np.int64) - x.params.qmin
        return [t[idx] for t in tables]

    return Kernel(f"{ctx.node.op_type}: 256-entry int8 lookup table", [o.name for o in ctx.outputs], run)


BUILDERS = {
    "Conv": build_linear,
    "ConvTranspose": build_linear,
    "Gemm": build_linear,
    "MatMul": build_linear,
    "Add": build_add,
    "Sub": build_add,
    "Mul": build_mul,
    "Div": build_div,
    "Max": build_max_min,
    "Min": build_max_min,
    "Concat": build_concat,
    "Pad": build_pad,
    "Resize": build_resize,
    "MaxPool": build_max_pool,
    "AveragePool": build_average_pool,
    "GlobalAveragePool": build_reduce,
    "ReduceMean": build_reduce,
    "ReduceSum": build_reduce,
    "Softmax": build_softmax,
    **{op: build_movement for op in MOVEMENT_OPS},
    **{op: build_table for op in ELEMENTWISE_UNARY},
}


def build_kernel(qm: QDQModel, unit: Unit, host_eval, rounding: str = "single") -> Kernel:
    """The integer kernel of a unit; NoKernel(why) if there is none."""
    node: ir.Node = unit.node
    if node.domain not in ("", "ai.onnx"):
        raise NoKernel(f"custom-domain op {node.domain}::{node.op_type}")
    builder = BUILDERS.get(node.op_type)
    if builder is None:
        raise NoKernel(f"no integer kernel for {node.op_type} in the simulator")
    if unit.activation is not None and node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul"):
        raise NoKernel(f"fused {unit.activation.op_type} after {node.op_type}")
    return builder(UnitContext(qm, unit, host_eval, rounding))
