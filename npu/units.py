"""A quantized QDQ model seen as node units: "DequantizeLinear inputs -> op -> QuantizeLinear".

QuantizeLinear / DequantizeLinear nodes are the boundaries between int8 and float, not ops. An
op is an int8 node unit when every activation input (and weight / bias) is a DequantizeLinear
output and every float output goes only to QuantizeLinear nodes, possibly through

* a Relu / Clip the producer fuses (Conv + Relu, Add + Clip, ...: the clamp happens on the int8
  output), where the target lists that fusion;
* the Add of an int32 bias after a MatMul (the Linear pattern: MatMul + bias = Gemm).

`QDQModel.unit(node)` forms the unit and says, if the node cannot be one, which category and
why. The checker (npu.check) and the simulator (npu.simulate) read the same units.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import onnx
import onnx_ir as ir

from onnx_backend import spec
from onnx_backend.model_io import default_opset, load_model
from onnx_backend.planner import clip_bounds

QUANT_OPS = ("QuantizeLinear", "DequantizeLinear")
# ops whose output is shape/index arithmetic even when an input is a float activation
NON_DATA_OPS = spec.SHAPE_OPS | {"Constant"}


class Category(str, Enum):
    NPU = "npu"
    UNSUPPORTED_OP = "unsupported op"
    ATTRIBUTE = "attribute out of range"
    NOT_QUANTIZED = "not quantized"
    UNFUSABLE = "unfusable QDQ pattern"
    SHAPE = "shape/constant"  # no activation data: shape arithmetic or constants (compile time)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class QParams:
    """Scale / zero point of a QuantizeLinear or DequantizeLinear (per tensor or per axis)."""

    scale: np.ndarray  # float32
    zero_point: np.ndarray  # int64
    dtype: np.dtype
    axis: int | None  # None: per tensor

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.dtype).min) if self.dtype != np.int32 else -(2**31 - 1)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.dtype).max)

    def same_as(self, other: QParams) -> bool:
        return (
            self.axis == other.axis
            and self.scale.shape == other.scale.shape
            and np.array_equal(self.scale, other.scale)
            and np.array_equal(self.zero_point, other.zero_point)
            and self.dtype == other.dtype
        )

    def per_tensor(self) -> tuple[float, int]:
        return float(self.scale.reshape(-1)[0]), int(self.zero_point.reshape(-1)[0])

    def broadcast(self, ndim: int) -> tuple[np.ndarray, np.ndarray]:
        if self.axis is None or self.scale.size == 1:
            return self.scale.reshape(()), self.zero_point.reshape(())
        shape = [1] * ndim
        shape[self.axis % ndim] = -1
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """ONNX QuantizeLinear (float -> int, round half to even, saturate)."""
        scale, zero = self.broadcast(np.ndim(x))
        q = np.rint(np.asarray(x, np.float32) / scale).astype(np.float64) + zero
        return np.clip(q, self.qmin, self.qmax).astype(self.dtype)

    def dequantize(self, q: np.ndarray) -> np.ndarray:
        """ONNX DequantizeLinear (int -> float32)."""
        scale, zero = self.broadcast(np.ndim(q))
        return ((np.asarray(q, np.int64) - zero).astype(np.float32) * scale).astype(np.float32)


@dataclass
class Unit:
    """One op and the boundary nodes around it."""

    node: ir.Node
    # activation / weight / bias input index -> the DequantizeLinear that feeds it
    dq_inputs: dict[int, ir.Node] = field(default_factory=dict)
    # output index -> the QuantizeLinear nodes that quantize it (after the fused chain)
    q_outputs: dict[int, list[ir.Node]] = field(default_factory=dict)
    activation: ir.Node | None = None  # fused Relu / Clip
    bias_add: ir.Node | None = None  # MatMul + Add(int32 bias)
    bias_index: int | None = None  # which input of bias_add is the bias
    category: Category = Category.NPU
    reason: str = ""

    @property
    def ok(self) -> bool:
        return self.category is Category.NPU

    @property
    def members(self) -> list[ir.Node]:
        return [n for n in (self.node, self.bias_add, self.activation) if n is not None]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    t = ir.convenience.get_const_tensor(value)
    return None if t is None else t.numpy()


class QDQModel:
    """Lookups over a QDQ model: constants, Q/DQ parameters, node units."""

    def __init__(self, model: onnx.ModelProto | ir.Model | str | os.PathLike):
        if isinstance(model, ir.Model):
            model = ir.serde.serialize_model(model)
        proto = load_model(model)
        try:
            proto = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
        except Exception:  # shapes help the target's limits; the simulator does not need them
            pass
        self.proto = proto
        self.opset = default_opset(proto)
        self.model = ir.serde.deserialize_model(proto)
        self.graph = self.model.graph
        self.nodes: list[ir.Node] = list(self.graph)
        self._consts: dict[int, np.ndarray | None] = {}

    # ---- values ----------------------------------------------------------------------------------

    def const(self, value: ir.Value | None) -> np.ndarray | None:
        if value is None:
            return None
        key = id(value)
        if key not in self._consts:
            self._consts[key] = None if value.is_graph_input() else _const(value)
        return self._consts[key]

    def is_const(self, value: ir.Value | None) -> bool:
        return value is not None and self.const(value) is not None

    @staticmethod
    def dtype(value: ir.Value | None) -> np.dtype | None:
        if value is None or value.dtype is None:
            return None
        try:
            return np.dtype(value.dtype.numpy())
        except (TypeError, ValueError):
            return None

    def is_float(self, value: ir.Value | None) -> bool:
        dt = self.dtype(value)
        return dt is not None and dt.kind == "f"

    def is_data(self, value: ir.Value | None) -> bool:
        """A float (or unknown-type) activation: not a constant."""
        if value is None or self.is_const(value):
            return False
        dt = self.dtype(value)
        return dt is None or dt.kind == "f"

    # ---- Q / DQ ------------------------------------------------------------------------------------

    def qparams(self, node: ir.Node) -> QParams:
        scale = self.const(node.inputs[1])
        if scale is None:
            raise ValueError(f"{node.op_type} {node.name!r}: scale is not a constant")
        zero_value = node.inputs[2] if len(node.inputs) > 2 else None
        zero = self.const(zero_value) if zero_value is not None else None
        if zero is None:
            if node.op_type == "DequantizeLinear":
                dtype = self.dtype(node.inputs[0]) or np.dtype(np.uint8)
            else:
                dtype = np.dtype(np.uint8)
            zero = np.zeros(scale.shape, dtype=dtype)
        axis = None
        if scale.ndim == 1 and scale.size > 1:
            a = node.attributes.get("axis")
            axis = a.value if a is not None else 1
        return QParams(np.asarray(scale, np.float32), np.asarray(zero).astype(np.int64), np.asarray(zero).dtype, axis)

    def dq_of(self, value: ir.Value | None) -> ir.Node | None:
        p = value.producer() if value is not None else None
        return p if p is not None and p.op_type == "DequantizeLinear" and p.domain in ("", "ai.onnx") else None

    def is_q(self, node: ir.Node) -> bool:
        return node.op_type == "QuantizeLinear" and node.domain in ("", "ai.onnx")

    def is_boundary(self, node: ir.Node) -> bool:
        return node.op_type in QUANT_OPS and node.domain in ("", "ai.onnx")

    def q_uses(self, value: ir.Value) -> list[ir.Node] | None:
        """The QuantizeLinear nodes reading `value`, if they are its only readers."""
        uses = [u.node for u in value.uses()]
        if not uses or value.is_graph_output() or not all(self.is_q(n) and n.inputs[0] is value for n in uses):
            return None
        return list(dict.fromkeys(uses))

    # ---- units ------------------------------------------------------------------------------------

    def is_data_node(self, node: ir.Node) -> bool:
        """Does the node compute on activation data (rather than shapes or constants)?"""
        if node.op_type in NON_DATA_OPS or spec.rule_for(node.op_type).output is spec.OutputScale.NONE:
            return False
        ins = [v for v in node.inputs if v is not None]
        if any(self.is_data(v) or self._dq_of_activation(v) for v in ins):
            return True
        # e.g. a Gather from a quantized constant table with run-time indices
        return any(self.is_data(o) for o in node.outputs if o is not None) and any(not self.is_const(v) and self.dq_of(v) is None for v in ins)

    def _dq_of_activation(self, v: ir.Value) -> bool:
        dq = self.dq_of(v)
        return dq is not None and not self.is_const(dq.inputs[0])

    def quantized_indices(self, node: ir.Node) -> list[int]:
        """Input indices that must come from DequantizeLinear for an int8 unit."""
        rule = spec.rule_for(node.op_type)
        idx = set(spec.activation_input_indices(node.op_type, len(node.inputs)))
        for i in (rule.weight_input, rule.bias_input):
            if i is not None and i < len(node.inputs):
                idx.add(i)
        return sorted(i for i in idx if node.inputs[i] is not None)

    def unit(self, node: ir.Node, fusions: set[tuple[str, str]] | None = None) -> Unit:
        """The unit `node` heads; `fusions` None accepts every producer + activation pair."""
        u = Unit(node)
        for i in self.quantized_indices(node):
            v = node.inputs[i]
            dq = self.dq_of(v)
            if dq is not None:
                u.dq_inputs[i] = dq
            elif self.is_const(v):
                if self.dtype(v) is not None and self.dtype(v).kind == "f":
                    return self._fail(u, Category.NOT_QUANTIZED, f"constant input {v.name!r} is float, not quantized")
            elif self.is_data(v):
                return self._fail(u, Category.NOT_QUANTIZED, f"input {v.name!r} is float (not a DequantizeLinear output)")
        for k, out in enumerate(node.outputs):
            if out is None or not out.uses() and not out.is_graph_output():
                continue
            if not self.is_data(out):
                continue
            end, problem = self._follow(u, out, fusions)
            if problem is not None:
                return self._fail(u, *problem)
            qs = self.q_uses(end)
            if qs is None:
                readers = ", ".join(sorted({f"{x.node.op_type} {x.node.name!r}" for x in end.uses()})) or "the graph output"
                return self._fail(u, Category.NOT_QUANTIZED, f"output {end.name!r} is not quantized (read in float by {readers})")
            u.q_outputs[k] = qs
        if not u.q_outputs:
            return self._fail(u, Category.NOT_QUANTIZED, "no quantized output")
        return u

    @staticmethod
    def _fail(u: Unit, category: Category, reason: str) -> Unit:
        u.category, u.reason = category, reason
        return u

    def _follow(self, u: Unit, out: ir.Value, fusions) -> tuple[ir.Value, tuple[Category, str] | None]:
        """Walk from an op output over a bias Add and a fused activation to what Q reads."""
        node = u.node
        end = out
        uses = list(end.uses())
        if node.op_type == "MatMul" and len(uses) == 1 and not end.is_graph_output():
            add = uses[0].node
            other = add.inputs[1 - uses[0].idx] if add.op_type == "Add" and len(add.inputs) == 2 else None
            bias_dq = self.dq_of(other)
            if bias_dq is not None and self.dtype(bias_dq.inputs[0]) == np.int32:
                u.bias_add, u.bias_index = add, 1 - uses[0].idx
                u.dq_inputs[-1] = bias_dq  # -1: the bias of a MatMul + Add unit
                end = add.outputs[0]
                uses = list(end.uses())
        if len(uses) == 1 and not end.is_graph_output() and uses[0].node.op_type in spec.ACTIVATIONS_THAT_FUSE:
            act = uses[0].node
            if uses[0].idx == 0 and clip_bounds(act) is not None and spec.rule_for(node.op_type).absorbs_activation:
                pairs = {(node.op_type, act.op_type)} | ({("Gemm", act.op_type)} if u.bias_add is not None else set())
                if fusions is not None and not pairs & fusions:
                    why = f"{act.op_type} {act.name!r} sits between {node.op_type} and its QuantizeLinear and the target does not fuse {node.op_type} + {act.op_type}"
                    u.activation = act
                    return end, (Category.UNFUSABLE, why)
                u.activation = act
                end = act.outputs[0]
        return end, None


def activation_bounds(u: Unit, out: QParams) -> tuple[int, int]:
    """The int8 clamp of a fused Relu / Clip in the output's integers (TFLite rounds them half
    away from zero, CalculateActivationRangeQuantized)."""
    lo, hi = out.qmin, out.qmax
    if u.activation is None:
        return lo, hi
    bounds = clip_bounds(u.activation)
    scale, zero = out.per_tensor()
    if np.isfinite(bounds[0]):
        lo = max(lo, zero + int(np.sign(bounds[0] / scale) * np.floor(abs(bounds[0] / scale) + 0.5)))
    if np.isfinite(bounds[1]):
        hi = min(hi, zero + int(np.sign(bounds[1] / scale) * np.floor(abs(bounds[1] / scale) + 0.5)))
    return lo, max(lo, hi)
