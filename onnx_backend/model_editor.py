"""ModelEditor: integer model inputs and outputs, so the NPU gets raw pixels and returns int8.

`convert_input_type(name, TensorType.UINT8)` removes the QuantizeLinear after the input: the
model then takes the quantized values directly (with a calibrated input range of [0, 255] that
is scale 1, zero point 0 in uint8: raw pixels). `convert_output_type` removes the last
DequantizeLinear: the model returns the quantized values; the scale and zero point to interpret
them are recorded in the model's metadata (`torchq.output.<name>.scale` / `.zero_point`).

Called on a float model (the reference SDK's order: edit, then `quantize`), the request is
recorded in the model's metadata (`torchq.convert.<input|output>.<name>`) and `quantize`
carries it out once the Q/DQ nodes exist; the float model itself still runs unchanged.
"""

from __future__ import annotations

from enum import Enum

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import InvalidModelError

META_PREFIX = "torchq.convert."


class TensorType(Enum):
    UINT8 = onnx.TensorProto.UINT8
    INT8 = onnx.TensorProto.INT8


def _set_meta(model: onnx.ModelProto, key: str, value: str) -> None:
    for p in model.metadata_props:
        if p.key == key:
            p.value = value
            return
    model.metadata_props.add(key=key, value=value)


def pending_conversions(model: onnx.ModelProto) -> list[tuple[str, str, TensorType]]:
    """(kind, tensor, type) requests recorded on a float model."""
    out = []
    for p in model.metadata_props:
        if p.key.startswith(META_PREFIX):
            kind, name = p.key[len(META_PREFIX) :].split(".", 1)
            out.append((kind, name, TensorType[p.value]))
    return out


def clear_pending(model: onnx.ModelProto) -> None:
    keep = [p for p in model.metadata_props if not p.key.startswith(META_PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(keep)


class ModelEditor:
    """Edits `model` in place (as the reference SDK's ModelEditor does)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model

    def _is_quantized(self) -> bool:
        return any(n.op_type == "QuantizeLinear" for n in self.model.graph.node)

    def _value_info(self, name: str, where) -> onnx.ValueInfoProto:
        for vi in where:
            if vi.name == name:
                return vi
        raise InvalidModelError(f"{name!r} is not a model {'input' if where is self.model.graph.input else 'output'}; choose from {[v.name for v in where]}")

    def _init(self, name: str) -> onnx.TensorProto:
        for t in self.model.graph.initializer:
            if t.name == name:
                return t
        raise InvalidModelError(f"quantization parameter {name!r} is not a constant initializer")

    def _retype_zero_point(self, node: onnx.NodeProto, tensor_type: TensorType) -> np.ndarray:
        """Give a Q/DQ node a zero point of `tensor_type` (int8 <-> uint8 shifts it by 128)."""
        zp_init = self._init(node.input[2])
        zp = numpy_helper.to_array(zp_init).astype(np.int64)
        if tensor_type is TensorType.UINT8 and zp_init.data_type == onnx.TensorProto.INT8:
            zp = zp + 128
        elif tensor_type is TensorType.INT8 and zp_init.data_type == onnx.TensorProto.UINT8:
            zp = zp - 128
        dtype = np.uint8 if tensor_type is TensorType.UINT8 else np.int8
        new = numpy_helper.from_array(zp.astype(dtype), name=f"{node.input[2]}_{tensor_type.name.lower()}")
        self.model.graph.initializer.append(new)
        node.input[2] = new.name
        return zp

    def convert_input_type(self, tensor_name: str, tensor_type: TensorType) -> None:
        vi = self._value_info(tensor_name, self.model.graph.input)
        if not self._is_quantized():
            _set_meta(self.model, f"{META_PREFIX}input.{tensor_name}", tensor_type.name)
            return
        g = self.model.graph
        qs = [n for n in g.node if n.op_type == "QuantizeLinear" and n.input[0] == tensor_name]
        others = [n for n in g.node if tensor_name in n.input and n.op_type != "QuantizeLinear"]
        if len(qs) != 1 or others:
            raise InvalidModelError(f"input {tensor_name!r} does not feed exactly one QuantizeLinear, so it cannot take integer values")
        q = qs[0]
        q_out = q.output[0]
        for dq in (n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] == q_out):
            self._retype_zero_point(dq, tensor_type)
            dq.input[0] = tensor_name
        g.node.remove(q)
        vi.type.tensor_type.elem_type = tensor_type.value

    def convert_output_type(self, tensor_name: str, tensor_type: TensorType) -> None:
        vi = self._value_info(tensor_name, self.model.graph.output)
        if not self._is_quantized():
            _set_meta(self.model, f"{META_PREFIX}output.{tensor_name}", tensor_type.name)
            return
        g = self.model.graph
        dq = next((n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] == tensor_name), None)
        if dq is None:
            raise InvalidModelError(f"output {tensor_name!r} is not produced by a DequantizeLinear, so it cannot be integer")
        q = next((n for n in g.node if n.op_type == "QuantizeLinear" and n.output[0] == dq.input[0]), None)
        if q is None:
            raise InvalidModelError(f"output {tensor_name!r} is not quantized by a QuantizeLinear")
        if any(dq.input[0] in n.input for n in g.node if n is not dq):
            # the quantized tensor has other readers: give the output its own QuantizeLinear
            q2 = helper.make_node("QuantizeLinear", list(q.input), [tensor_name], name=f"{tensor_name}_output_QuantizeLinear")
            g.node.remove(dq)
            g.node.append(q2)
            q = q2
        else:
            g.node.remove(dq)
            q.output[0] = tensor_name
        zp = self._retype_zero_point(q, tensor_type)
        scale = numpy_helper.to_array(self._init(q.input[1]))
        _set_meta(self.model, f"torchq.output.{tensor_name}.scale", repr(float(scale)))
        _set_meta(self.model, f"torchq.output.{tensor_name}.zero_point", str(int(zp)))
        vi.type.tensor_type.elem_type = tensor_type.value


    def convert_activation_dtype(self, tensor_type: TensorType) -> None:
        """Store every quantized activation as `tensor_type`: int8 <-> uint8 shifts zero points
        (and the codes of quantized constants) by 128, so the real values do not change.

        Weights of Conv / ConvTranspose / Gemm / MatMul stay int8 and biases int32: onnxruntime's
        x86 integer kernels are u8 x s8. Its own int8 -> uint8 conversion applies only where a
        quantized tensor has a single consumer, and a node whose input and output types then
        differ runs in float; converting everything here lets every node fuse.
        """
        g = self.model.graph
        inits = {t.name: t for t in g.initializer}
        weights = _weight_initializers(self.model)
        to_dtype, shift = (np.uint8, 128) if tensor_type is TensorType.UINT8 else (np.int8, -128)
        from_type = onnx.TensorProto.INT8 if tensor_type is TensorType.UINT8 else onnx.TensorProto.UINT8
        shifted: set[str] = set()

        def shift_init(name: str) -> None:
            t = inits.get(name)
            if t is None or name in shifted or t.data_type != from_type:
                return
            value = numpy_helper.to_array(t).astype(np.int16) + shift
            t.CopyFrom(numpy_helper.from_array(value.astype(to_dtype), name))
            shifted.add(name)

        retyped: set[str] = set()
        for node in g.node:
            if node.op_type not in ("QuantizeLinear", "DequantizeLinear") or len(node.input) < 3:
                continue
            if node.op_type == "DequantizeLinear" and node.input[0] in weights:
                continue
            shift_init(node.input[2])
            if node.op_type == "DequantizeLinear" and node.input[0] in inits:
                shift_init(node.input[0])  # a quantized constant: its codes move with the zero point
            retyped.add(node.output[0] if node.op_type == "QuantizeLinear" else node.input[0])
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            if (vi.name in retyped or vi.name in shifted) and vi.type.tensor_type.elem_type == from_type:
                vi.type.tensor_type.elem_type = tensor_type.value
        for p in self.model.metadata_props:
            if p.key.startswith("torchq.output.") and p.key.endswith(".zero_point"):
                p.value = str(int(p.value) + shift)


def _weight_initializers(model: onnx.ModelProto) -> set[str]:
    """Initializers behind the DequantizeLinear of a Conv/ConvTranspose/Gemm/MatMul weight."""
    from .spec import SPEC

    producer = {n.output[0]: n for n in model.graph.node if n.output}
    inits = {t.name for t in model.graph.initializer}
    out = set()
    for n in model.graph.node:
        rule = SPEC.get(n.op_type)
        if rule is None or rule.weight_input is None or len(n.input) <= rule.weight_input:
            continue
        dq = producer.get(n.input[rule.weight_input])
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits:
            out.add(dq.input[0])
    return out


def apply_pending(model: onnx.ModelProto) -> onnx.ModelProto:
    """Carry out conversions requested on the float model (called by quantize)."""
    pending = pending_conversions(model)
    clear_pending(model)
    editor = ModelEditor(model)
    for kind, name, ttype in pending:
        if kind == "input":
            editor.convert_input_type(name, ttype)
        else:
            editor.convert_output_type(name, ttype)
    return model
