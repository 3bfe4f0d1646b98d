"""Hand-built QDQ ONNX models (onnx.helper) for the checker's categories and the kernels'
hand-computed values: each is a real model onnxruntime loads and runs."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class QDQBuilder:
    """Appends nodes to a graph; `quantize(name, scale, zp)` adds the Q/DQ boundary pair."""

    def __init__(self):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []

    def const(self, name: str, array) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def input(self, name: str, shape, dtype=TensorProto.FLOAT) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, list(shape)))
        return name

    def output(self, name: str) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))

    def node(self, op: str, inputs, outputs=None, name=None, **attrs) -> str:
        name = name or f"{op.lower()}{len(self.nodes)}"
        outputs = outputs or [f"{name}_out"]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    def quantize(self, x: str, scale: float, zero_point: int, *, dequantize: bool = True) -> str:
        s = self.const(f"{x}_scale", np.float32(scale))
        z = self.const(f"{x}_zp", np.int8(zero_point))
        q = self.node("QuantizeLinear", [x, s, z], [f"{x}_q"], name=f"{x}_Q")
        if not dequantize:
            return q
        return self.node("DequantizeLinear", [q, s, z], [f"{x}_dq"], name=f"{x}_DQ")

    def weight(self, name: str, q: np.ndarray, scale, axis: int | None = None) -> str:
        """A quantized constant behind a DequantizeLinear (int8 weights or int32 bias)."""
        qn = self.const(f"{name}_q", q)
        scale = np.asarray(scale, np.float32)
        s = self.const(f"{name}_scale", scale)
        z = self.const(f"{name}_zp", np.zeros(scale.shape, q.dtype))
        attrs = {"axis": axis} if axis is not None else {}
        return self.node("DequantizeLinear", [qn, s, z], [f"{name}_dq"], name=f"{name}_DQ", **attrs)

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, "g", self.inputs, self.outputs, self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
        m.ir_version = 8
        return onnx.shape_inference.infer_shapes(m)


def conv_unit(*, channels=4, groups=1, activation: str | None = "Relu", producer="Conv", quantize_input=True, quantize_output=True, seed=0) -> onnx.ModelProto:
    """x -> Q/DQ -> Conv (int8 weights, int32 bias) [-> activation] -> Q/DQ -> y."""
    rng = np.random.default_rng(seed)
    b = QDQBuilder()
    x = b.input("x", [1, channels, 6, 6])
    xin = b.quantize(x, 0.05, 3) if quantize_input else x
    if producer == "ConvTranspose":
        w = rng.integers(-127, 128, (channels, channels // groups, 3, 3)).astype(np.int8)
        ws = rng.uniform(0.005, 0.02, channels // groups) if groups == 1 else np.float32(0.01)
        wdq = b.weight("w", w, ws, axis=1 if groups == 1 else None)
        bias_scale = np.float32(0.05) * np.asarray(ws, np.float32)
        bias_scale = np.tile(bias_scale, groups) if np.ndim(bias_scale) else np.full(channels, bias_scale, np.float32)
    else:
        w = rng.integers(-127, 128, (channels, channels // groups, 3, 3)).astype(np.int8)
        ws = rng.uniform(0.005, 0.02, channels)
        wdq = b.weight("w", w, ws, axis=0)
        bias_scale = np.float32(0.05) * np.asarray(ws, np.float32)
    bdq = b.weight("b", rng.integers(-500, 500, channels).astype(np.int32), bias_scale, axis=0)
    y = b.node(producer, [xin, wdq, bdq], name="conv", pads=[1, 1, 1, 1], group=groups)
    if activation == "Relu":
        y = b.node("Relu", [y], name="act")
    elif activation == "Clip":
        y = b.node("Clip", [y, b.const("lo", np.float32(0)), b.const("hi", np.float32(6))], name="act")
    b.output(b.quantize(y, 0.04, -128 if activation else 0) if quantize_output else y)
    return b.model()


def unary_unit(op: str, *, in_scale=0.05, in_zp=0, out_scale=0.02, out_zp=0, shape=(1, 4, 5, 5), **attrs) -> onnx.ModelProto:
    """x -> Q/DQ -> op -> Q/DQ -> y for a one-input op."""
    b = QDQBuilder()
    x = b.input("x", list(shape))
    y = b.node(op, [b.quantize(x, in_scale, in_zp)], name="op", **attrs)
    b.output(b.quantize(y, out_scale, out_zp))
    return b.model()


def binary_unit(op: str, a_params, b_params, out_params, shape=(1, 4, 5, 5)) -> onnx.ModelProto:
    """a, b -> Q/DQ each -> op -> Q/DQ -> y."""
    b = QDQBuilder()
    a = b.quantize(b.input("a", list(shape)), *a_params)
    c = b.quantize(b.input("b", list(shape)), *b_params)
    y = b.node(op, [a, c], name="op")
    b.output(b.quantize(y, *out_params))
    return b.model()
