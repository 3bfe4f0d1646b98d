"""The spec validator: walk a QDQ model and report every broken rule of the TFLite 8-bit spec.

Works on any QDQ ONNX model (ours, onnxruntime's, anyone's), so it also tells what other tools'
output breaks. Rules checked, each a small function registered in `RULES`:

* opset >= 13; every scale positive and finite;
* activations: per-tensor 8-bit: int8, or uint8 storage of the same grid (zero point + 128);
* weights of Conv / ConvTranspose / Gemm / MatMul: int8 in [-127, 127], zero point 0, and
  per-channel along the output-channel axis when per-channel;
* biases: int32, zero point 0, scale = input scale x weight scale (per channel);
* same-scale ops (MaxPool, Reshape, Concat inputs and output, ...): identical parameters;
* fixed outputs: Sigmoid / Softmax 1/256 with zero point -128, Tanh 1/128 with zero point 0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from . import spec
from .model_io import default_opset
from .qmath import INT32_MAX


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


@dataclass
class QParams:
    scale: np.ndarray
    zero_point: np.ndarray
    axis: int | None
    node: str

    @property
    def int8_zero_point(self) -> np.ndarray:
        """The zero point on the int8 grid (uint8 storage is the same grid shifted by 128)."""
        z = self.zero_point.astype(np.int64)
        return z - 128 if self.zero_point.dtype == np.uint8 else z

    def same(self, other: QParams) -> bool:
        return (
            self.scale.shape == other.scale.shape
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.int8_zero_point, other.int8_zero_point)
        )


class GraphView:
    """Lookups over a GraphProto: producers, consumers, constants, Q/DQ parameters."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.consts: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        for n in g.node:
            if n.op_type == "Constant" and n.attribute:
                attr = n.attribute[0]
                if attr.name == "value":
                    self.consts[n.output[0]] = numpy_helper.to_array(attr.t)
        self.producer = {o: n for n in g.node for o in n.output if o}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in g.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.inputs = {i.name for i in g.input}

    def qparams(self, node: onnx.NodeProto) -> QParams:
        scale = self.consts.get(node.input[1])
        zero = self.consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros_like(scale, dtype=np.uint8)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) if scale is not None and scale.ndim == 1 else None
        return QParams(np.asarray(scale, np.float32) if scale is not None else np.array(np.nan), np.asarray(zero), axis, node.name)

    def dq_of(self, tensor: str) -> onnx.NodeProto | None:
        p = self.producer.get(tensor)
        return p if p is not None and p.op_type == "DequantizeLinear" else None

    def q_after(self, tensor: str) -> onnx.NodeProto | None:
        return next((c for c in self.consumers.get(tensor, []) if c.op_type == "QuantizeLinear"), None)

    def is_const(self, tensor: str) -> bool:
        return tensor in self.consts


Rule = Callable[[GraphView], list[Violation]]
RULES: list[tuple[str, Rule]] = []


def rule(name: str):
    def register(fn: Rule) -> Rule:
        RULES.append((name, fn))
        return fn

    return register


@rule("opset")
def _opset(view: GraphView) -> list[Violation]:
    v = default_opset(view.model)
    return [] if v >= 13 else [Violation("opset", "<model>", f"opset {v} < 13: per-axis Q/DQ needs opset 13")]


@rule("scale")
def _scales(view: GraphView) -> list[Violation]:
    out = []
    for n in view.model.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            p = view.qparams(n)
            if not (np.all(np.isfinite(p.scale)) and np.all(p.scale > 0)):
                out.append(Violation("scale", n.name, f"scale must be positive and finite, got {p.scale}"))
    return out


@rule("activation-int8")
def _activations(view: GraphView) -> list[Violation]:
    out = []
    for n in view.model.graph.node:
        if n.op_type != "QuantizeLinear" and not (n.op_type == "DequantizeLinear" and not view.is_const(n.input[0])):
            continue
        p = view.qparams(n)
        if p.axis is not None and p.scale.size > 1:
            out.append(Violation("activation-int8", n.name, "activation parameters must be per tensor"))
        dtype = p.zero_point.dtype
        if dtype not in (np.int8, np.uint8):  # uint8 storage is the int8 grid shifted by 128
            out.append(Violation("activation-int8", n.name, f"activation type must be 8-bit (int8, or uint8 storage), got {dtype}"))
    return out


def _weight_users(view: GraphView):
    """(node, weight DQ) for each Conv/ConvTranspose/Gemm/MatMul whose weight is a DQ'd constant."""
    for n in view.model.graph.node:
        rule_ = spec.SPEC.get(n.op_type)
        if rule_ is None or rule_.weight_input is None or len(n.input) <= rule_.weight_input:
            continue
        dq = view.dq_of(n.input[rule_.weight_input])
        if dq is not None and view.is_const(dq.input[0]):
            yield n, dq


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


@rule("weight")
def _weights(view: GraphView) -> list[Violation]:
    out = []
    for n, dq in _weight_users(view):
        w = view.consts[dq.input[0]]
        p = view.qparams(dq)
        if w.dtype != np.int8:
            out.append(Violation("weight", n.name, f"weight must be int8, got {w.dtype}"))
            continue
        if np.any(p.zero_point != 0):
            out.append(Violation("weight", n.name, "weight zero point must be 0 (symmetric)"))
        if w.size and int(w.min()) < -127:
            out.append(Violation("weight", n.name, "weight uses -128; the spec's range is [-127, 127]"))
        if p.scale.size > 1:
            want = spec.weight_axis(n.op_type, _attrs(n), w.shape)
            axis = p.axis if p.axis >= 0 else p.axis + w.ndim
            if axis != want:
                out.append(Violation("weight", n.name, f"per-channel axis {axis}, the output-channel axis is {want}"))
            elif p.scale.size != w.shape[axis]:
                out.append(Violation("weight", n.name, f"{p.scale.size} scales for {w.shape[axis]} channels"))
    return out


def _bias_location(view: GraphView, node: onnx.NodeProto) -> str | None:
    r = spec.SPEC[node.op_type]
    if r.bias_input is not None and len(node.input) > r.bias_input and node.input[r.bias_input]:
        return node.input[r.bias_input]
    if node.op_type == "MatMul":  # Linear: MatMul -> Add(bias)
        users = view.consumers.get(node.output[0], [])
        if len(users) == 1 and users[0].op_type == "Add":
            other = [i for i in users[0].input if i != node.output[0]]
            if other and view.dq_of(other[0]) is not None and view.consts.get(view.dq_of(other[0]).input[0], np.zeros(0)).dtype == np.int32:
                return other[0]
    return None


@rule("bias")
def _biases(view: GraphView) -> list[Violation]:
    out = []
    for n, wdq in _weight_users(view):
        bias = _bias_location(view, n)
        if bias is None:
            continue
        bdq = view.dq_of(bias)
        if bdq is None or not view.is_const(bdq.input[0]):
            out.append(Violation("bias", n.name, "bias is not quantized (int32 expected)"))
            continue
        b = view.consts[bdq.input[0]]
        bp, wp = view.qparams(bdq), view.qparams(wdq)
        in_dq = view.dq_of(n.input[0])
        if b.dtype != np.int32:
            out.append(Violation("bias", n.name, f"bias must be int32, got {b.dtype}"))
            continue
        if np.any(bp.zero_point != 0):
            out.append(Violation("bias", n.name, "bias zero point must be 0"))
        if b.size and np.max(np.abs(b.astype(np.int64))) > INT32_MAX:
            out.append(Violation("bias", n.name, "bias overflows int32"))
        if in_dq is None:
            out.append(Violation("bias", n.name, "input is not quantized, so the bias scale is undefined"))
            continue
        want = view.qparams(in_dq).scale * wp.scale
        if n.op_type == "ConvTranspose" and want.size != bp.scale.size and bp.scale.size % max(want.size, 1) == 0:
            want = np.tile(want, bp.scale.size // want.size)
        if want.size not in (1, bp.scale.size) or not np.allclose(bp.scale, want, rtol=1e-6, atol=0):
            out.append(Violation("bias", n.name, "bias scale != input scale x weight scale"))
    return out


def _in_params(view: GraphView, tensor: str) -> QParams | None:
    dq = view.dq_of(tensor)
    return view.qparams(dq) if dq is not None else None


def _out_params(view: GraphView, tensor: str) -> QParams | None:
    q = view.q_after(tensor)
    return view.qparams(q) if q is not None else None


@rule("same-scale")
def _same_scale(view: GraphView) -> list[Violation]:
    out = []
    for n in view.model.graph.node:
        r = spec.SPEC.get(n.op_type)
        if r is None or r.output is not spec.OutputScale.SAME_AS_INPUT:
            continue
        inputs = n.input if r.all_inputs_share_scale else n.input[:1]
        outs = [p for p in (_out_params(view, o) for o in n.output if o) if p is not None]
        for o in outs:
            for i, name in enumerate(inputs):
                p = _in_params(view, name) if name else None
                if p is not None and not p.same(o):
                    out.append(Violation("same-scale", n.name, f"input {i} and output have different scales ({p.scale} vs {o.scale})"))
    return out


@rule("fixed-output")
def _fixed(view: GraphView) -> list[Violation]:
    out = []
    for n in view.model.graph.node:
        r = spec.SPEC.get(n.op_type)
        if r is None or r.output is not spec.OutputScale.FIXED:
            continue
        p = _out_params(view, n.output[0])
        if p is None:
            continue
        scale, zero = r.fixed
        if not (np.isclose(float(p.scale), scale, rtol=0, atol=0) and int(p.int8_zero_point) == zero):
            out.append(Violation("fixed-output", n.name, f"{n.op_type} output must be scale {scale}, zero point {zero} (int8); got {float(p.scale):.6g}, {int(p.int8_zero_point)}"))
    return out


def validate(model: onnx.ModelProto) -> list[Violation]:
    """Every broken spec rule in a QDQ model (empty list: the model follows the spec)."""
    view = GraphView(model)
    violations: list[Violation] = []
    for _, check in RULES:
        violations.extend(check(view))
    return violations


class SpecViolationError(AssertionError):
    pass


def assert_valid(model: onnx.ModelProto) -> None:
    violations = validate(model)
    if violations:
        raise SpecViolationError("the model breaks the TFLite 8-bit spec:\n" + "\n".join(f"  {v}" for v in violations))
