"""Quantization planning: which tensor gets which parameters, by the spec table and the target.

The planner reads an optimized float graph and the chosen ranges, and produces a `QuantPlan`;
it does not edit the graph (`qdq.apply_plan` does). Rules, in graph order:

1. A float activation tensor is quantized when a node next to it (its producer, or a consumer
   reading it as an activation) runs in int8 on the target, and its parameters are known.
2. Parameters come from, in order: a fixed-output op (Sigmoid/Softmax/Tanh); a same-scale op
   (the input's parameters pass through); the tensor's own calibrated range.
3. Relu / Clip(0, x) after an op that absorbs activations (Conv, Gemm, MatMul, Add; in int8 or
   on the host), when it is that op's only consumer, is removed: the producer writes the
   activation's output directly, quantized with lo = 0 (and hi <= x), so the quantize step
   performs the clamp exactly.
4. Concat / Max / Min share one scale across inputs and output: an input whose producer has
   its own scale and no other consumer takes the output's parameters; any other input is
   requantized on that edge. An input whose own range spans fewer than SHARED_SCALE_MIN_STEPS
   steps of the shared scale (a detection head's sigmoid scores concatenated with box
   coordinates) keeps the spec and is reported in `crushed_inputs`, never silently.
5. Weights are int8 symmetric per output channel (spec.weight_axis), widened where needed so
   the int32 bias (scale = input scale x weight scale) cannot overflow. A MatMul whose output
   only feeds an Add of a constant vector (a Linear layer) treats that vector as its int32 bias.
   With `mean_correction` (default) and the per-channel means of the layer's input in the
   ranges (calibrator.Ranges.channel_sums), the bias also takes out the mean shift that
   rounding the weights causes (onnx_backend/mean_correction.py).
6. Other constant float inputs at activation positions get per-tensor int8 from their values.
7. A node whose float outputs only reach integer casts and shape inputs (directly or through
   other such nodes: T5's relative-position buckets, float arithmetic on shapes) stays in float,
   exact: no Q/DQ moves the integers it computes.
8. A Linear layer (Gemm, MatMul + bias Add) writing a model output runs on the host in float
   (`float_output_layers`): the output is what the user reads, and an int8 grid fitted on the
   calibration data clips a classifier's largest logits and ties its top classes.
9. A Conv / ConvTranspose / Gemm the target leaves on the host between quantized activations
   has its weights stored int8 per channel (and its bias int32), as an int8 node's: onnxruntime
   would otherwise quantize float weights there itself, per tensor.
10. A node a technique placed on the host (metadata `torchq.host`, its value the reason: the
   rescale SmoothQuant inserts before a host reader) runs there in float; `host_nodes` gives the
   placement of rules 1, 7, 8 and the host islands before any range is known, for such techniques.

Every float tensor next to an int8 node that stays float is listed with the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from . import mean_correction, qmath, spec
from .errors import InvalidModelError
from .mean_correction import MeanCorrection
from .qmath import QuantParams

Supports = Callable[[ir.Node], tuple[bool, str]]
OUTPUT_LAYER_REASON = "a Linear layer writing a model output: computed in float on the host, so the output is not rounded to an int8 grid"
FLOAT_TYPES = {ir.DataType.FLOAT}
# Fewer integer levels than this for an input's own range under a shared Concat / Max / Min
# scale: its signal is crushed (4 bits), which the report says.
SHARED_SCALE_MIN_STEPS = 16
INTEGER_ARITHMETIC = "integer arithmetic: its outputs only reach integer casts and shape inputs, so it stays exact in float"
# A node a technique placed on the host (metadata key -> the reason, reported as the node's):
# SmoothQuant's channel rescales before host readers (techniques/smoothquant.py)
HOST_NODE_KEY = "torchq.host"


SHAPE_DERIVED = (
    "computed from tensor shapes and constants only (the exporter's arithmetic on sizes, e.g. attention's 1 / sqrt(head size)): "
    "no data flows into it to calibrate, so it stays float"
)


def _from_shapes_only(v: ir.Value) -> bool:
    """True when no data reaches `v` except through Shape / Size: its value depends on shapes alone."""
    seen: set[int] = set()
    stack = [v]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen or x.const_value is not None or x.is_initializer():
            continue
        seen.add(id(x))
        producer = x.producer()
        if producer is None:
            return False  # a graph input: data
        if producer.op_type in ("Shape", "Size"):
            continue
        stack.extend(producer.inputs)
    return True


def _no_statistics(v: ir.Value) -> str:
    return SHAPE_DERIVED if _from_shapes_only(v) else "no calibration statistics for this tensor"


def supports_everything(node: ir.Node) -> tuple[bool, str]:
    return True, ""


@dataclass
class ConstantQuant:
    """A constant input quantized into an integer initializer (weight, bias or data)."""

    node: str
    input_index: int
    params: QuantParams
    kind: str  # "weight" | "bias" | "constant"
    correction: MeanCorrection | None = None  # a bias: its layer's weight-rounding mean shift is taken out


@dataclass
class QuantPlan:
    activations: dict[str, QuantParams] = field(default_factory=dict)
    requantize: list[tuple[str, int, QuantParams]] = field(default_factory=list)
    absorbed: dict[str, str] = field(default_factory=dict)  # activation node -> producer node
    constants: list[ConstantQuant] = field(default_factory=list)
    float_tensors: dict[str, str] = field(default_factory=dict)  # tensor -> why it stays float
    float_nodes: dict[str, str] = field(default_factory=dict)  # node -> why it runs in float
    int8_nodes: list[str] = field(default_factory=list)
    # tensor -> why: inputs a shared scale leaves fewer than SHARED_SCALE_MIN_STEPS levels of their own range
    crushed_inputs: dict[str, str] = field(default_factory=dict)
    # written by qdq.apply_plan: (bias node, input) -> the weight-rounding mean shift taken out of it
    mean_shifts: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)

    def summary(self) -> dict:
        return {
            "quantized_tensors": len(self.activations),
            "int8_nodes": len(self.int8_nodes),
            "float_nodes": len(self.float_nodes),
            "absorbed_activations": len(self.absorbed),
            "requantized_edges": len(self.requantize),
            "float_tensors": len(self.float_tensors),
            "crushed_inputs": len(self.crushed_inputs),
        }


def is_float_activation(v: ir.Value | None) -> bool:
    """A float tensor computed from the inputs: not an initializer, nor a Constant node's output
    (weights held by Constant nodes are constants: a graph left unoptimized keeps them so)."""
    if v is None or v.const_value is not None or v.is_initializer() or v.dtype not in FLOAT_TYPES:
        return False
    producer = v.producer()
    return producer is None or producer.op_type != "Constant"


def _const_array(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def _output_channels(op_type: str, attrs: dict, w_shape: tuple[int, ...]) -> int:
    if op_type == "Conv":
        return w_shape[0]
    if op_type == "Gemm":
        return w_shape[0] if attrs.get("transB", 0) else w_shape[1]
    if op_type == "ConvTranspose":
        return w_shape[1] * attrs.get("group", 1)
    return w_shape[-1]  # MatMul


def clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    """(min, max) of a Relu or a Clip with constant bounds; None otherwise."""
    if node.op_type == "Relu":
        return 0.0, float("inf")
    if node.op_type != "Clip":
        return None
    lo = _const_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else np.float32(-np.inf)
    hi = _const_array(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.float32(np.inf)
    if lo is None or hi is None or np.size(lo) != 1 or np.size(hi) != 1:  # Clip bounds are scalars
        return None
    return float(np.ravel(lo)[0]), float(np.ravel(hi)[0])


def inferred_ranges(graph: ir.Graph, ranges: Mapping[str, tuple[float, float]]) -> Mapping[str, tuple[float, float]]:
    """`ranges`, plus ranges worked back from a consumer's output for inputs that have none and
    no other reader: through a rearranging op (spec.REARRANGE_OPS) the same range, through
    `Add(x, c)` / `Sub(x, c)` with constant c the range shifted back by c (a bound: nothing is
    clipped). The PyTorch path observes one tensor per module, but the backend's rewrites split
    some ops in two: `x.mean((2, 3))` becomes GlobalAveragePool -> Squeeze and a standalone
    BatchNorm Mul -> Add; the inner tensor takes its range from the observed one instead of
    leaving both ops on the host."""
    inferred = dict(ranges)
    for node in reversed(list(graph)):  # consumers first: chains pass it on
        if not node.inputs or not node.outputs or node.outputs[0].name not in inferred:
            continue
        x, (lo, hi) = node.inputs[0], inferred[node.outputs[0].name]
        if x is None or x.name in inferred or not is_float_activation(x) or len(x.uses()) != 1 or x.is_graph_output() or x.producer() is None:
            continue
        if node.op_type in spec.REARRANGE_OPS:
            inferred[x.name] = (lo, hi)
        elif node.op_type in ("Add", "Sub") and len(node.inputs) == 2:
            c = _const_array(node.inputs[1])
            if c is None or not c.size or not np.all(np.isfinite(c)):
                continue
            c_lo, c_hi = float(c.min()), float(c.max())
            inferred[x.name] = (lo - c_hi, hi - c_lo) if node.op_type == "Add" else (lo + c_lo, hi + c_hi)
    return inferred


class Planner:
    def __init__(
        self,
        model: ir.Model,
        ranges: Mapping[str, tuple[float, float]],
        *,
        per_channel: bool = True,
        supports: Supports = supports_everything,
        exclude_nodes: set[str] | frozenset[str] = frozenset(),
        exclude_tensors: set[str] | frozenset[str] = frozenset(),
        symmetric_constants: bool = False,
        float_output_layers: bool = True,
        mean_correction: bool = True,
        weight_scales: Mapping[str, np.ndarray] | None = None,
    ):
        self.graph = model.graph
        self.weight_scales = dict(weight_scales or {})  # weight initializer -> scales learned elsewhere
        self.ranges = inferred_ranges(model.graph, ranges)
        self.channel_sums = dict(getattr(ranges, "channel_sums", {}))  # calibrator.Ranges carries them
        self.mean_correction = mean_correction
        self.per_channel = per_channel
        self.supports = supports
        self.exclude_nodes = set(exclude_nodes) | self._producers_of(exclude_tensors)
        self.symmetric_constants = symmetric_constants
        self.float_output_layers = float_output_layers
        self.plan = QuantPlan()
        self.int8: dict[int, bool] = {}
        self.biases_of_matmul: dict[str, tuple[ir.Node, int]] = {}  # matmul name -> (add, index)

    def _producers_of(self, tensors) -> set[str]:
        """Nodes producing `tensors`, and the unobserved nodes that only feed those (the rest of
        an op the exporter decomposed, e.g. the MatMul of a Linear whose Add was excluded)."""
        tensors = set(tensors)
        excluded: set[str] = set()
        for node in reversed(list(self.graph)):
            outs = [o for o in node.outputs if o is not None]
            if any(o.name in tensors for o in outs):
                excluded.add(node.name)
            elif outs and all(o.name not in self.ranges and o.uses() and all(u.node.name in excluded for u in o.uses()) for o in outs):
                excluded.add(node.name)
        return excluded

    # ---- which nodes run in int8 -------------------------------------------------------------

    def _integer_arithmetic(self) -> set[int]:
        """Nodes whose float outputs only reach integer casts and shape inputs, directly or
        through other such nodes: T5's relative-position buckets (log of the distance, scaled,
        cast to int64), float arithmetic on shapes. Quantizing them would move the integers they
        compute."""
        exact: set[int] = set()
        for node in reversed(list(self.graph)):  # readers first
            floats = [o for o in node.outputs if o is not None and o.dtype in FLOAT_TYPES]
            if not floats or any(o.is_graph_output() or not o.uses() for o in floats):
                continue
            if all(self._read_as_integer(u, exact) for o in floats for u in o.uses()):
                exact.add(id(node))
        return exact

    @staticmethod
    def _read_as_integer(use, exact: set[int]) -> bool:
        node = use.node
        if id(node) in exact or node.op_type in ("Shape", "Size"):
            return True
        if node.op_type == "Cast":
            to = node.attributes.get("to")
            return to is not None and ir.DataType(to.value) not in FLOAT_TYPES | {ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE}
        rule = spec.rule_for(node.op_type)
        # a shape, axes, scales or a bound: neither an activation, a weight nor a bias
        return use.idx not in spec.activation_input_indices(node.op_type, len(node.inputs)) and use.idx not in (rule.weight_input, rule.bias_input)

    def _decide_nodes(self) -> None:
        exact = self._integer_arithmetic()
        for node in self.graph:
            rule = spec.rule_for(node.op_type)
            name = node.name
            if rule.output is spec.OutputScale.NONE or node.op_type in spec.SHAPE_OPS:
                ok, why = False, "not a float activation op"
            elif id(node) in exact:
                ok, why = False, INTEGER_ARITHMETIC
            elif name in self.exclude_nodes:
                ok, why = False, "excluded by configuration"
            elif HOST_NODE_KEY in node.metadata_props:
                ok, why = False, node.metadata_props[HOST_NODE_KEY]
            elif not any(is_float_activation(node.inputs[i]) for i in spec.activation_input_indices(node.op_type, len(node.inputs)) if node.inputs[i] is not None) and not any(is_float_activation(o) for o in node.outputs):
                ok, why = False, "no float activations"
            else:
                ok, why = self.supports(node)
            self.int8[id(node)] = ok
            if ok:
                self.plan.int8_nodes.append(name)
            elif why not in ("not a float activation op", "no float activations"):
                self.plan.float_nodes[name] = why

    def _keep_output_layers_float(self) -> None:
        """A Linear layer (Gemm, or MatMul with a constant weight and its bias Add) that writes a
        model output runs on the host in float. Quantized, the output would be rounded to an int8
        grid fitted on the calibration data: a classifier's largest logit, the one its argmax
        reads, is the tail such a range clips (inputs more confident than any calibration sample
        saturate, and the top classes tie), and the grid's step is coarser than the gap between
        near-tied classes. A Linear head costs the host one small matrix product."""
        for node in self.graph:
            members = self._linear_writing_output(node)
            if members and all(self.runs_int8(n) for n in members):
                for n in members:
                    self._keep_float(n, OUTPUT_LAYER_REASON)

    def _linear_writing_output(self, node: ir.Node) -> list[ir.Node]:
        if node.op_type not in ("Gemm", "MatMul") or len(node.inputs) < 2 or _const_array(node.inputs[1]) is None:
            return []
        out = node.outputs[0]
        if out.is_graph_output():
            return [node]
        uses = list(out.uses())
        if node.op_type == "MatMul" and len(uses) == 1 and uses[0].node.op_type == "Add":
            add = uses[0].node
            if _const_array(add.inputs[1 - uses[0].idx]) is not None and add.outputs[0].is_graph_output():
                return [node, add]
        return []

    def _join_host_islands(self) -> None:
        """An elementwise Add/Sub/Mul that reads a tensor the host computes, and whose output only
        host ops read, runs on the host too: that costs no transfer (its other input goes to the
        host either way, in place of its output) and saves quantizing a tensor nobody reads in
        int8. The case that matters: a post-norm transformer's residual sum on a target that runs
        LayerNorm on the host, a tensor with a few huge channels (MiniLM: cosine to float 0.85 with
        it quantized, 0.94 without; bench/technique_checks.py)."""
        for node in self.graph:
            if node.op_type not in ("Add", "Sub", "Mul") or not self.runs_int8(node):
                continue
            outs = [o for o in node.outputs if o is not None]
            if not outs or any(o.is_graph_output() or not o.uses() for o in outs):
                continue
            if any(self.runs_int8(u.node) for o in outs for u in o.uses()):
                continue
            if any(is_float_activation(x) and x.producer() is not None and not self.runs_int8(x.producer()) for x in node.inputs):
                self.int8[id(node)] = False
                self.plan.int8_nodes.remove(node.name)
                self.plan.float_nodes[node.name] = "reads a tensor the host computes and only host ops read its output: runs on the host with them"

    def runs_int8(self, node: ir.Node | None) -> bool:
        return node is not None and self.int8.get(id(node), False)

    def _reads_as_activation(self, node: ir.Node, index: int) -> bool:
        return index in spec.activation_input_indices(node.op_type, len(node.inputs))

    def _next_to_int8(self, v: ir.Value) -> bool:
        if self.runs_int8(v.producer()):
            return True
        return any(self.runs_int8(u.node) and self._reads_as_activation(u.node, u.idx) for u in v.uses())

    # ---- activation parameters -----------------------------------------------------------------

    def _own_params(self, name: str, *, clamp: tuple[float, float] | None = None) -> QuantParams | None:
        r = self.ranges.get(name)
        if r is None:
            return None
        lo, hi = float(r[0]), float(r[1])
        if clamp is not None:
            lo, hi = max(lo, clamp[0]), min(hi, clamp[1])
            lo = clamp[0] if clamp[0] == 0 else lo  # absorbed Relu: zero point at qmin, exactly
            hi = max(hi, lo)
        symmetric = lo < 0 and lo == -hi  # a range symmetric about 0 gets zero point 0
        return qmath.activation_params(lo, hi, symmetric=symmetric)

    def _absorbable(self, act: ir.Node) -> tuple[float, float] | None:
        """Clip bounds if `act` can be absorbed into its producer, else None."""
        bounds = clip_bounds(act)
        if bounds is None or bounds[0] != 0.0:
            return None
        x = act.inputs[0]
        producer = x.producer() if x is not None else None
        # A producer on the host (a depthwise Conv past the target's group limit) absorbs it too:
        # the quantize step after it, with lo = 0, is the clamp. One rounding instead of two, and
        # no requantization left between it and the next int8 op.
        if producer is None or not self.runs_int8(act):
            return None
        if not spec.rule_for(producer.op_type).absorbs_activation:
            return None
        if len(x.uses()) != 1 or x.is_graph_output():
            return None
        return bounds

    def _plan_activations(self) -> None:
        params = self.plan.activations
        for v in self.graph.inputs:
            if is_float_activation(v) and self._next_to_int8(v) and v.name not in params:
                p = self._own_params(v.name)
                if p is None:
                    self.plan.float_tensors[v.name] = "no calibration statistics for this model input"
                else:
                    params[v.name] = p
        for node in self.graph:
            if node.op_type in spec.ACTIVATIONS_THAT_FUSE:
                bounds = self._absorbable(node)
                if bounds is not None:
                    self._absorb(node, bounds)
                    continue
            rule = spec.rule_for(node.op_type)
            for out in node.outputs:
                if not is_float_activation(out) or not self._next_to_int8(out) or out.name in params:
                    continue
                p = self._derived_params(node, rule, out)
                if p is None:
                    p = self._own_params(out.name)
                if p is None:
                    self.plan.float_tensors[out.name] = _no_statistics(out)
                    continue
                params[out.name] = p
            if self.runs_int8(node) and rule.all_inputs_share_scale:
                self._share_scale(node)

    def _derived_params(self, node: ir.Node, rule: spec.OpRule, out: ir.Value) -> QuantParams | None:
        if rule.output is spec.OutputScale.SAME_AS_INPUT and not rule.all_inputs_share_scale:
            # On the host too: the output's values lie on the quantized input's grid (a subset,
            # a rearrangement, or averages within its range), so requantizing them to a scale of
            # their own only adds a rounding and breaks the same-scale rule (Swin's q/k/v Gathers).
            source = self._activation_params_of(node.inputs[0])
            if source is not None:
                return source
        if not self.runs_int8(node):
            return None
        if rule.output is spec.OutputScale.FIXED:
            scale, zero = rule.fixed
            return QuantParams(np.float32(scale), np.int8(zero))
        if rule.output is spec.OutputScale.SAME_AS_INPUT and not rule.all_inputs_share_scale:
            x = node.inputs[0]
            arr = _const_array(x)
            if arr is not None and arr.size and np.all(np.isfinite(arr)):
                return self._constant_params(arr)  # what _plan_constants gives the constant input
        if rule.all_inputs_share_scale and out.name not in self.ranges:
            ins = [self.ranges.get(i.name) for i in node.inputs if i is not None and is_float_activation(i)]
            if ins and all(r is not None for r in ins):
                return qmath.activation_params(min(r[0] for r in ins), max(r[1] for r in ins))
        return None

    def _activation_params_of(self, v: ir.Value | None) -> QuantParams | None:
        if v is None:
            return None
        producer = v.producer()
        if v.name in self.plan.activations:
            return self.plan.activations[v.name]
        if producer is not None and producer.name in self.plan.absorbed:
            return self.plan.activations.get(producer.outputs[0].name)
        return None

    def _absorb(self, act: ir.Node, bounds: tuple[float, float]) -> None:
        x, out = act.inputs[0], act.outputs[0]
        p = self._own_params(out.name, clamp=bounds)
        if p is None:  # no statistics for the activation's output: use its input's, clamped
            p = self._own_params(x.name, clamp=bounds)
        if p is None:
            self.plan.float_tensors[out.name] = "no calibration statistics for this tensor"
            return
        self.plan.absorbed[act.name] = x.producer().name
        self.plan.activations.pop(x.name, None)  # the producer's output is now internal to it
        self.plan.activations[out.name] = p

    def _share_scale(self, node: ir.Node) -> None:
        out = node.outputs[0]
        shared = self.plan.activations.get(out.name)
        if shared is None:
            return
        for i, x in enumerate(node.inputs):
            if x is None or not is_float_activation(x):
                continue
            current = self._activation_params_of(x)
            self._check_levels(node, x, current, shared)
            if current is not None and current.same_as(shared):
                continue
            if current is not None and self._can_take_params(x, shared):
                self.plan.activations[x.name] = shared
            else:
                self.plan.requantize.append((node.name, i, shared))

    def _check_levels(self, node: ir.Node, x: ir.Value, current: QuantParams | None, shared: QuantParams) -> None:
        """Report an input whose own range the shared scale resolves into too few levels."""
        own = self.ranges.get(x.name) or (current.range() if current is not None else None)
        if own is None:
            return
        width = float(own[1]) - float(own[0])
        steps = width / float(shared.scale)
        if width > 0 and steps < SHARED_SCALE_MIN_STEPS:  # a constant value (a zero class token) has nothing to resolve
            lo, hi = shared.range()
            self.plan.crushed_inputs[x.name] = (
                f"{node.op_type} {node.name} shares one scale over its inputs and output ([{lo:.4g}, {hi:.4g}]): this input's own range "
                f"[{float(own[0]):.4g}, {float(own[1]):.4g}] gets {steps:.1f} of its 255 steps; quantize the parts separately "
                "(concatenate after the model, or keep this node on the host) to keep its precision"
            )

    def _can_take_params(self, x: ir.Value, shared: QuantParams) -> bool:
        producer = x.producer()
        if producer is None or x.is_graph_output() or len(x.uses()) != 1 or not self.runs_int8(producer):
            return False
        if spec.rule_for(producer.op_type).output is not spec.OutputScale.OWN:
            return False
        if producer.name in self.plan.absorbed or producer.op_type in spec.ACTIVATIONS_THAT_FUSE:
            lo, _ = shared.range()
            return lo == 0.0
        return True

    # ---- weights, biases, constants ------------------------------------------------------------

    def _input_scale(self, node: ir.Node) -> float | None:
        p = self._activation_params_of(node.inputs[0])
        return None if p is None else float(p.scale)

    def _matmul_bias(self, node: ir.Node, n_out: int) -> tuple[ir.Node, int] | None:
        """The Add that adds a constant (N,) vector to this MatMul's output, if it is the only use."""
        out = node.outputs[0]
        uses = list(out.uses())
        if len(uses) != 1 or out.is_graph_output() or uses[0].node.op_type != "Add" or not self.runs_int8(uses[0].node):
            return None
        add = uses[0].node
        other = 1 - uses[0].idx
        b = _const_array(add.inputs[other])
        if b is None or b.ndim != 1 or b.shape[0] != n_out or b.dtype != np.float32:
            return None
        return add, other

    def _plan_weights(self) -> None:
        for node in self.graph:
            rule = spec.rule_for(node.op_type)
            w_idx = rule.weight_input
            w = _const_array(node.inputs[w_idx]) if w_idx is not None and w_idx < len(node.inputs) else None
            if not self.runs_int8(node):
                if w is not None and w.dtype == np.float32 and w.ndim >= 2 and self._host_between_quantized(node):
                    self._plan_weight(node, rule, w, on_failure=lambda why: None)
                continue
            if w is not None and w.dtype == np.float32 and w.ndim >= 2:
                self._plan_weight(node, rule, w)
            elif w is not None:  # a constant weight input that cannot take the weight rule
                self._keep_float(node, f"its constant weight is not a float32 matrix ({w.dtype}, rank {w.ndim})")
            if self.runs_int8(node):  # _plan_weight may have kept it in float
                self._plan_constants(node)

    def _host_between_quantized(self, node: ir.Node) -> bool:
        """A Conv / ConvTranspose / Gemm the target leaves on the host, reading a quantized
        activation and writing one that is quantized (directly or through an absorbed Relu/Clip).

        Its weights are stored int8 per output channel and its bias int32, exactly as an int8
        node's: with float weights between a DequantizeLinear and a QuantizeLinear, onnxruntime's
        default graph optimization (its WeightBiasQuantization transformer) quantizes them itself,
        per tensor, and a depthwise Conv loses most of its channels' precision. Stored per channel,
        the model runs the same with every onnxruntime optimization level, and the host computes
        on the dequantized values. npu.check still reports the node on the host, for the target's
        reason."""
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.outputs) != 1:
            return False
        if self._activation_params_of(node.inputs[0]) is None:
            return False
        out = node.outputs[0]
        if out.name in self.plan.activations:
            return True
        uses = list(out.uses())
        return len(uses) == 1 and not out.is_graph_output() and uses[0].node.name in self.plan.absorbed

    def _plan_weight(self, node: ir.Node, rule: spec.OpRule, w: np.ndarray, on_failure: Callable[[str], None] | None = None) -> None:
        fail = on_failure or (lambda why: self._keep_float(node, why))
        in_scale = self._input_scale(node)
        if in_scale is None:
            fail("its input activation is not quantized, so its weights stay float")
            return
        attrs = {k: a.value for k, a in node.attributes.items()}
        axis = spec.weight_axis(node.op_type, attrs, w.shape) if self.per_channel else None
        n_channels = w.shape[axis] if axis is not None else 1
        bias_at: tuple[ir.Node, int] | None = None
        if rule.bias_input is not None and rule.bias_input < len(node.inputs) and node.inputs[rule.bias_input] is not None:
            bias_at = (node, rule.bias_input)
        elif node.op_type == "MatMul" and w.ndim == 2:
            bias_at = self._matmul_bias(node, w.shape[-1])
        bias = _const_array(bias_at[0].inputs[bias_at[1]]) if bias_at else None
        if bias_at is not None and bias_at[0] is node and (bias is None or bias.ndim != 1 or bias.dtype != np.float32):
            fail("its bias is not a constant float32 vector, so it cannot become an int32 bias")
            return
        if bias is not None and (bias.ndim != 1 or bias.dtype != np.float32):
            bias_at, bias = None, None
        if not np.all(np.isfinite(w)) or (bias is not None and not np.all(np.isfinite(bias))):
            fail("its weight or bias holds Inf/NaN")
            return
        min_scale = 0.0
        n_out = _output_channels(node.op_type, attrs, w.shape)
        if bias is not None and bias.shape[0] != n_out:  # ONNX's checker does not catch this
            raise InvalidModelError(f"node {node.name!r}: its bias has {bias.shape[0]} values for {n_out} output channels")
        if bias is not None:
            per_out = qmath.min_weight_scale_for_bias(bias, in_scale)
            min_scale = self._bias_to_weight_channels(per_out, node, w, axis)
        try:
            wp = qmath.weight_params(w, axis, min_scale=min_scale, scale=self.weight_scales.get(node.inputs[rule.weight_input].name))
            bp = self._bias_params(in_scale, wp, node, w, bias.shape[0]) if bias is not None else None
        except qmath.ScaleOverflowError as exc:
            fail(f"kept in float: {exc}")
            return
        self.plan.constants.append(ConstantQuant(node.name, rule.weight_input, wp, "weight"))
        if bias is not None:
            correction = mean_correction.correction_for(node.name, node.op_type, attrs, rule.weight_input, self.channel_sums.get(node.inputs[0].name)) if self.mean_correction else None
            self.plan.constants.append(ConstantQuant(bias_at[0].name, bias_at[1], bp, "bias", correction))
            if bias_at[0] is not node:  # MatMul + Add: the MatMul output is the accumulator
                self.plan.activations.pop(node.outputs[0].name, None)
                self.biases_of_matmul[node.name] = bias_at
                self.plan.float_tensors.pop(node.outputs[0].name, None)

    def _keep_float(self, node: ir.Node, why: str) -> None:
        self.plan.float_nodes[node.name] = why
        self.int8[id(node)] = False
        if node.name in self.plan.int8_nodes:
            self.plan.int8_nodes.remove(node.name)

    def _bias_to_weight_channels(self, per_out: np.ndarray, node: ir.Node, w: np.ndarray, axis: int | None):
        if axis is None:
            return float(np.max(per_out, initial=0.0))
        if node.op_type == "ConvTranspose" and axis == 1:
            groups = per_out.shape[0] // w.shape[1]
            return per_out.reshape(groups, w.shape[1]).max(axis=0)
        return per_out

    def _bias_params(self, in_scale: float, wp: QuantParams, node: ir.Node, w: np.ndarray, n_out: int) -> QuantParams:
        if wp.axis is None:
            return qmath.bias_params(in_scale, wp)
        scale = wp.scale
        if node.op_type == "ConvTranspose" and wp.axis == 1 and scale.shape[0] != n_out:
            scale = np.tile(scale, n_out // scale.shape[0])  # output channel o uses scale o % (C_out / group)
        per_channel = QuantParams(scale, np.zeros(scale.shape, np.int8), qmath.QType.INT8_NARROW, 0)
        return qmath.bias_params(in_scale, per_channel)

    def _plan_constants(self, node: ir.Node) -> None:
        taken = {(c.node, c.input_index) for c in self.plan.constants}
        for i in spec.activation_input_indices(node.op_type, len(node.inputs)):
            v = node.inputs[i]
            if v is None or (node.name, i) in taken or v.dtype not in FLOAT_TYPES:
                continue
            arr = _const_array(v)
            if arr is None or arr.size == 0:
                continue
            if not np.all(np.isfinite(arr)):
                self.plan.float_tensors[v.name] = "constant holds Inf/NaN"
                continue
            p = self._constant_params(arr)
            self.plan.constants.append(ConstantQuant(node.name, i, p, "constant"))

    def _constant_params(self, arr: np.ndarray) -> QuantParams:
        lo, hi = float(np.min(arr)), float(np.max(arr))
        if self.symmetric_constants and lo < 0:
            a = max(-lo, hi)
            return qmath.activation_params(-a, a, symmetric=True)
        return qmath.activation_params(lo, hi)

    # ---- report ----------------------------------------------------------------------------------

    def _report_unquantized(self) -> None:
        """List float activations next to int8 nodes that got no parameters."""
        for node in self.graph:
            if not self.runs_int8(node) or node.name in self.plan.absorbed:  # absorbed: leaves the graph
                continue
            for i in spec.activation_input_indices(node.op_type, len(node.inputs)):
                v = node.inputs[i]
                if is_float_activation(v) and v.name not in self.plan.activations and v.name not in self.plan.float_tensors:
                    producer = v.producer()
                    if producer is not None and self.biases_of_matmul.get(producer.name, (None,))[0] is node:
                        continue
                    if producer is not None and producer.name in self.plan.absorbed:
                        continue
                    self.plan.float_tensors[v.name] = _no_statistics(v)

    def decide_placement(self) -> None:
        """Which nodes run in int8 and which on the host (needs no ranges)."""
        self._decide_nodes()
        if self.float_output_layers:
            self._keep_output_layers_float()
        self._join_host_islands()

    def run(self) -> QuantPlan:
        self.decide_placement()
        self._plan_activations()
        self._plan_weights()
        self._report_unquantized()
        return self.plan


def plan_quantization(model: ir.Model, ranges: Mapping[str, tuple[float, float]], **kwargs) -> QuantPlan:
    return Planner(model, ranges, **kwargs).run()


def host_nodes(model: ir.Model, **kwargs) -> set[str]:
    """Names of the float-activation nodes that run on the host in float under the planner's rules
    (kwargs as Planner's: supports=the target), decided before any ranges are known."""
    planner = Planner(model, {}, **kwargs)
    planner.decide_placement()
    return set(planner.plan.float_nodes)
