"""Apply a QuantPlan to a graph: absorb activations, insert QuantizeLinear/DequantizeLinear.

Placement, chosen so onnxruntime fuses the result into integer kernels:
* one QuantizeLinear right after the producer of each quantized activation and one
  DequantizeLinear that every consumer reads (onnxruntime duplicates a shared DequantizeLinear
  per consumer itself when it forms its node units);
* weights and biases are stored already quantized (int8 / int32 initializers) behind a
  DequantizeLinear, per-axis where per-channel;
* requantized edges (Concat inputs) get their own QuantizeLinear/DequantizeLinear pair.

Graph outputs keep their names: the DequantizeLinear output takes the name, and the float tensor
before it is renamed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from . import mean_correction, qmath
from .errors import InvalidModelError
from .planner import ConstantQuant, QuantPlan
from .qmath import QuantParams


class QDQWriter:
    def __init__(self, model: ir.Model):
        self.model = model
        self.graph = model.graph
        self.nodes = {n.name: n for n in self.graph}
        self.names = {v.name for n in self.graph for v in (*n.inputs, *n.outputs) if v is not None}
        self.names |= {v.name for v in self.graph.inputs} | set(self.graph.initializers)
        self.new_nodes: list[ir.Node] = []
        self._dq_cache: dict[tuple, tuple[ir.Value, np.ndarray, np.ndarray]] = {}  # -> (DequantizeLinear output, real, integer values)

    def unique(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def initializer(self, array: np.ndarray, name: str) -> ir.Value:
        value = ir.Value(name=self.unique(name), const_value=ir.tensor(array, name=None))
        value.const_value.name = value.name
        value.shape = ir.Shape(array.shape)
        value.type = ir.TensorType(ir.DataType.from_numpy(array.dtype))
        self.graph.register_initializer(value)
        return value

    def _params_inputs(self, params: QuantParams, base: str) -> tuple[ir.Value, ir.Value]:
        scale = self.initializer(params.scale.astype(np.float32), f"{base}_scale")
        zero = self.initializer(params.zero_point, f"{base}_zero_point")
        return scale, zero

    def _axis_attrs(self, params: QuantParams) -> dict:
        return {"axis": params.axis} if params.axis is not None and params.scale.ndim == 1 else {}

    def quantize_dequantize(self, x: ir.Value, params: QuantParams, base: str) -> tuple[ir.Node, ir.Node]:
        scale, zero = self._params_inputs(params, base)
        q = ir.node("QuantizeLinear", [x, scale, zero], attributes=self._axis_attrs(params), name=self.unique(f"{base}_QuantizeLinear"))
        q.outputs[0].name = self.unique(f"{base}_quantized")
        dq = ir.node("DequantizeLinear", [q.outputs[0], scale, zero], attributes=self._axis_attrs(params), name=self.unique(f"{base}_DequantizeLinear"))
        dq.outputs[0].name = self.unique(f"{base}_dequantized")
        for node, dtype in ((q, ir.DataType.from_numpy(params.qtype.np_dtype)), (dq, ir.DataType.FLOAT)):
            node.outputs[0].type = ir.TensorType(dtype)
            node.outputs[0].shape = x.shape
        self.new_nodes += [q, dq]
        return q, dq

    # ---- the steps -------------------------------------------------------------------------------

    def absorb(self, activation: str) -> None:
        """Remove a Relu/Clip; its producer writes the activation's output (and name) directly."""
        node = self.nodes[activation]
        x, out = node.inputs[0], node.outputs[0]
        name = out.name
        for i, o in enumerate(self.graph.outputs):
            if o is out:
                self.graph.outputs[i] = x
        ir.convenience.replace_all_uses_with(out, x)
        self.graph.remove(node, safe=True)
        del self.nodes[activation]
        x.name, out.name = name, None

    def quantize_activation(self, value: ir.Value, params: QuantParams) -> None:
        name = value.name
        uses = list(value.uses())
        q, dq = self.quantize_dequantize(value, params, name)
        for use in uses:
            use.node.replace_input_with(use.idx, dq.outputs[0])
        if value.is_graph_output():
            for i, o in enumerate(self.graph.outputs):
                if o is value:
                    self.graph.outputs[i] = dq.outputs[0]
            value.name = self.unique(f"{name}_float")
            self.names.discard(dq.outputs[0].name)
            dq.outputs[0].name = name

    def requantize_edge(self, node_name: str, index: int, params: QuantParams) -> None:
        node = self.nodes[node_name]
        src = node.inputs[index]
        _, dq = self.quantize_dequantize(src, params, f"{node_name}_input{index}_requant")
        node.replace_input_with(index, dq.outputs[0])

    def quantize_constant(self, node_name: str, index: int, params: QuantParams, override: np.ndarray | None = None, value: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Replace the constant input with its integer values behind a DequantizeLinear (`value`:
        real values to quantize instead of the constant's own). Returns (real, integer) values."""
        node = self.nodes[node_name]
        src = node.inputs[index]
        key = (src.name, params.qtype, params.axis, params.scale.tobytes(), params.zero_point.tobytes(), None if value is None else value.tobytes())
        cached = self._dq_cache.get(key)
        if cached is None:
            real = ir.convenience.get_const_tensor(src).numpy() if value is None else value
            q = qmath.quantize(real, params) if override is None else checked_override(src.name, real, params, override)
            qvalue = self.initializer(q, f"{src.name}_quantized")
            scale, zero = self._params_inputs(params, src.name)
            dq = ir.node("DequantizeLinear", [qvalue, scale, zero], attributes=self._axis_attrs(params), name=self.unique(f"{src.name}_DequantizeLinear"))
            dq_out = dq.outputs[0]
            dq_out.name = self.unique(f"{src.name}_dequantized")
            dq_out.type, dq_out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape(q.shape)
            self.new_nodes.append(dq)
            cached = self._dq_cache[key] = (dq_out, real, q)
        node.replace_input_with(index, cached[0])
        return cached[1], cached[2]

    def constant_value(self, node_name: str, index: int) -> np.ndarray:
        return ir.convenience.get_const_tensor(self.nodes[node_name].inputs[index]).numpy()

    def finish(self) -> None:
        for node in self.new_nodes:
            self.graph.append(node)
        for name, init in list(self.graph.initializers.items()):
            if not init.uses() and not init.is_graph_output() and not init.is_graph_input():
                del self.graph.initializers[name]
        self.graph.sort()


def checked_override(name: str, real: np.ndarray, params: QuantParams, q: np.ndarray) -> np.ndarray:
    """An integer weight chosen by the caller (AdaRound): the same scale, rounded up or down.

    Each value must be floor or ceil of weight / scale, within the weight's integer range, so an
    override can change the rounding but never the quantization parameters.
    """
    q = np.asarray(q)
    if q.shape != real.shape or not np.issubdtype(q.dtype, np.integer):
        raise InvalidModelError(f"weight override for {name!r}: expected integers of shape {list(real.shape)}, got {q.dtype} {list(q.shape)}")
    scale, zero = qmath._broadcast(params, real.ndim)
    exact = real.astype(np.float64) / scale.astype(np.float64) + zero.astype(np.float64)
    lo = np.clip(np.floor(exact - 1e-6), params.qtype.qmin, params.qtype.qmax)
    hi = np.clip(np.ceil(exact + 1e-6), params.qtype.qmin, params.qtype.qmax)
    if np.any(q < lo) or np.any(q > hi):
        raise InvalidModelError(f"weight override for {name!r} is not a rounding of weight / scale (a value is more than one step away); were the scales computed for another plan?")
    return q.astype(params.qtype.np_dtype)


def _corrected_bias(writer: QDQWriter, bias: ConstantQuant, weights: Mapping[tuple[str, int], tuple[np.ndarray, np.ndarray]]) -> np.ndarray | None:
    """The bias less the mean shift of its layer's weight as it was just rounded (AdaRound's
    rounding included): onnx_backend.mean_correction."""
    c = bias.correction
    weight = weights.get((c.node, c.weight_index))
    if weight is None:
        return None
    return mean_correction.corrected_bias(c, writer.constant_value(bias.node, bias.input_index), *weight)


def apply_plan(model: ir.Model, plan: QuantPlan, weight_overrides: Mapping[str, np.ndarray] | None = None) -> ir.Model:
    """Edit `model` in place by `plan`; returns it.

    `weight_overrides` ({weight initializer name: integer array}) replaces round-to-nearest for
    those weights (see `checked_override`); names that are not quantized weights are ignored.
    """
    overrides = dict(weight_overrides or {})
    writer = QDQWriter(model)
    for activation in plan.absorbed:
        writer.absorb(activation)
    values = {v.name: v for v in model.graph.inputs}
    values.update({v.name: v for n in model.graph for v in n.outputs if v is not None and v.name})
    for name, params in plan.activations.items():
        if name in values:
            writer.quantize_activation(values[name], params)
    for node_name, index, params in plan.requantize:
        writer.requantize_edge(node_name, index, params)
    weights: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}  # (node, input) -> (real, rounded) weight
    for c in plan.constants:  # a layer's weight comes before its bias
        name = writer.nodes[c.node].inputs[c.input_index].name
        override = overrides.get(name) if c.kind == "weight" else None
        value = _corrected_bias(writer, c, weights) if c.correction is not None else None
        if value is not None:
            plan.mean_shifts[(c.node, c.input_index)] = writer.constant_value(c.node, c.input_index).astype(np.float64) - value
        real, q = writer.quantize_constant(c.node, c.input_index, c.params, override, value)
        if c.kind == "weight":
            weights[(c.node, c.input_index)] = (real, qmath.dequantize(q, c.params))
    writer.finish()
    return model
