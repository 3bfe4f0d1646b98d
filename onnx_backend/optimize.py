"""Graph optimization before quantization; the float function is preserved exactly.

The pipeline: constants in whatever form the exporter wrote them (initializers, `Constant`
nodes as paddle2onnx writes weights, Identity chains) become initializers first (onnx_ir's
passes), so every rule sees them alike; then onnxscript's optimizer (constant folding, dead-node
removal, common subexpression elimination, no-op removal, BatchNorm -> Conv / ConvTranspose /
Gemm fusion and its other default rewrite rules); then the rules in `REWRITE_RULES` below, in the
style of onnxscript's rewriter: each a small pattern and its replacement. Among them, constant
Mul / Add steps next to a Conv, ConvTranspose, Gemm or MatMul (a BatchNorm exported as Mul + Add,
a learnable affine step, a BatchNorm that could not be fused as such) are folded into its weights
and bias wherever that is exact. Activation fusion (Relu / Clip into the producer) changes the
float function, so it happens in the quantizer, where the quantize step itself performs the clamp.

Tensor names of surviving values are kept (the rewriter carries the replaced value's name over),
which is what lets calibration statistics stay bound to their tensors through optimization.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxscript.optimizer
from onnxscript import rewriter
from onnxscript.rewriter import pattern
from onnxscript.rewriter.rules.common import (
    fuse_batchnorm_into_conv_rule,
    fuse_batchnorm_into_conv_transpose_rule,
    fuse_batchnorm_into_gemm_rule,
)

from .errors import InvalidModelError
from .model_io import MIN_OPSET, default_opset, load_model, upgrade_opset


def _same_type(value: ir.Value, like: ir.Value, shape: ir.Shape | None) -> None:
    value.dtype = like.dtype
    value.shape = shape


class StandaloneBatchNormToAffine(pattern.RewriteRuleClassBase):
    """BatchNormalization not preceded by a foldable Conv -> Mul(scale) + Add(shift).

    Runs after the fusion rules, so only BatchNorms that could not be folded remain; the NPU runs
    Mul and Add, and each gets its own int8 range.
    """

    def pattern(self, op, x, gamma, beta, mean, var):
        return op.BatchNormalization(x, gamma, beta, mean, var, _allow_other_attributes=True, _outputs=["out"])

    def check(self, context, x, gamma, beta, mean, var, out, **_):
        result = pattern.MatchResult()
        if out.producer().attributes.get_int("training_mode", 0):
            return result.fail("training-mode BatchNormalization")
        if any(v.const_value is None for v in (gamma, beta, mean, var)):
            return result.fail("BatchNormalization parameters are not constant")
        if x.shape is None or x.shape.rank() is None or x.shape.rank() < 2:
            return result.fail("input rank unknown")
        return result

    def rewrite(self, op, x, gamma, beta, mean, var, out, **_):
        eps = out.producer().attributes.get_float("epsilon", 1e-5)
        g, b, m, v = (t.const_value.numpy().astype(np.float64) for t in (gamma, beta, mean, var))
        scale = g / np.sqrt(v + eps)
        shift = b - m * scale
        shape = (-1,) + (1,) * (x.shape.rank() - 2)
        dtype = gamma.const_value.numpy().dtype
        name = out.producer().name or out.name
        s = op.initializer(ir.tensor(scale.reshape(shape).astype(dtype)), name=f"{name}.scale")
        t = op.initializer(ir.tensor(shift.reshape(shape).astype(dtype)), name=f"{name}.shift")
        scaled = op.Mul(x, s)
        _same_type(scaled, x, x.shape)  # the rewriter types only the value it replaces
        return op.Add(scaled, t)


class SpatialMeanToGlobalAveragePool(pattern.RewriteRuleClassBase):
    """ReduceMean over all spatial axes of an NCHW tensor -> GlobalAveragePool (+ Reshape).

    The same arithmetic; onnxruntime has an integer kernel for GlobalAveragePool (and the NPU
    lists it), not for ReduceMean. `x.mean((2, 3))` in PyTorch exports as ReduceMean.
    """

    def pattern(self, op, x):
        return op.ReduceMean(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"])

    def _axes(self, node) -> list[int] | None:
        if len(node.inputs) > 1 and node.inputs[1] is not None:
            t = ir.convenience.get_const_tensor(node.inputs[1])
            return None if t is None else [int(a) for a in t.numpy().ravel()]
        attr = node.attributes.get("axes")
        return None if attr is None else list(attr.as_ints())

    def check(self, context, x, out, **_):
        result = pattern.MatchResult()
        rank = x.shape.rank() if x.shape is not None else None
        node = out.producer()
        axes = self._axes(node)
        if rank is None or rank < 3 or axes is None:
            return result.fail("rank or axes unknown")
        if sorted(a % rank for a in axes) != list(range(2, rank)):
            return result.fail("not a mean over every spatial axis")
        return result

    def rewrite(self, op, x, out, **_):
        pooled = op.GlobalAveragePool(x)
        if out.producer().attributes.get_int("keepdims", 1):
            return pooled
        rank = x.shape.rank()
        _same_type(pooled, x, ir.Shape([*x.shape[:2], *[1] * (rank - 2)]))  # else it is no float activation to the planner
        return op.Squeeze(pooled, op.Constant(value=ir.tensor(np.arange(2, rank, dtype=np.int64))))


# onnxscript's own BatchNorm fusions, once more before a BatchNorm that is left becomes Mul + Add:
# the optimizer ran them while the weights may still have been Constant nodes.
_FUSE_BATCHNORM = [fuse_batchnorm_into_conv_rule, fuse_batchnorm_into_conv_transpose_rule, fuse_batchnorm_into_gemm_rule]
LINEAR_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def _channel_vector(value: ir.Value, rank: int, axis: int) -> np.ndarray | None:
    """The constant `value` as a vector along `axis` of a rank-`rank` tensor it broadcasts with
    (a scalar gives a 1-vector), or None when it varies along another axis or would widen the
    result's rank."""
    t = ir.convenience.get_const_tensor(value)
    if t is None:
        return None
    c = t.numpy()
    if c.ndim > rank or not np.issubdtype(c.dtype, np.floating):
        return None
    shape = (1,) * (rank - c.ndim) + c.shape
    if any(n != 1 for k, n in enumerate(shape) if k != axis):
        return None
    return c.reshape(-1)


def _only_use(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and all(user is node for user, _ in value.uses())


class _LinearLayer:
    """The constant weight and bias of a Conv / ConvTranspose / Gemm / MatMul node, and how its
    output channels (and input channels) lie in them."""

    def __init__(self, node: ir.Node):
        self.node = node
        self.op_type = node.op_type
        self.weight = ir.convenience.get_const_tensor(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        self.bias = None if bias is None else ir.convenience.get_const_tensor(bias)
        self.has_bias = bias is not None
        attrs = node.attributes
        self.group = attrs.get_int("group", 1)
        self.trans_b = attrs.get_int("transB", 0)
        self.beta = attrs.get_float("beta", 1.0)

    def foldable(self) -> str | None:
        """Why the layer's constants cannot absorb a step, or None when they can."""
        if self.weight is None:
            return "weights are not constant"
        if self.has_bias and self.bias is None:
            return "bias is not constant"
        if self.op_type == "Gemm" and self.node.attributes.get_int("transA", 0):
            return "Gemm with transA"
        if self.op_type in ("Gemm", "MatMul") and self.weight.numpy().ndim != 2:
            return "weights are not a matrix"
        return None

    def output_rank(self, x: ir.Value) -> int | None:
        if self.op_type in ("Conv", "ConvTranspose"):
            return self.weight.numpy().ndim
        if self.op_type == "Gemm":
            return 2
        return x.shape.rank() if x.shape is not None else None  # MatMul: the input's rank

    def output_axis(self, rank: int) -> int:
        return 1 if self.op_type in ("Conv", "ConvTranspose") else rank - 1

    def out_channels(self) -> int:
        w = self.weight.numpy()
        if self.op_type == "Conv":
            return w.shape[0]
        if self.op_type == "ConvTranspose":
            return w.shape[1] * self.group
        return w.shape[0] if self.trans_b else w.shape[1]

    def scaled_weight(self, s: np.ndarray) -> np.ndarray:
        """The weights with output channel o multiplied by s[o] (s broadcast from size 1)."""
        w = self.weight.numpy()
        s = np.broadcast_to(s, (self.out_channels(),)).astype(np.float64)
        if self.op_type == "Conv":
            return w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        if self.op_type == "ConvTranspose":  # (in, out / group, k...): channel o is group o // (out / group)
            per_group = w.shape[1]
            grouped = w.reshape(self.group, w.shape[0] // self.group, per_group, *w.shape[2:])
            return (grouped * s.reshape(self.group, 1, per_group, *(1,) * (w.ndim - 2))).reshape(w.shape)
        return w * (s[:, None] if self.trans_b else s[None, :])

    def bias_vector(self) -> np.ndarray:
        """The bias as it is added, per output channel (Gemm's beta applied; zeros if none)."""
        n = self.out_channels()
        if self.bias is None:
            return np.zeros(n)
        b = self.bias.numpy().astype(np.float64)
        return np.broadcast_to(b * (self.beta if self.op_type == "Gemm" else 1.0), (n,)).copy() if b.size in (1, n) else None

    def input_channel_of(self) -> np.ndarray:
        """For a Conv: the input channel each weight slice W[o, j] reads, shape W.shape[:2]."""
        w = self.weight.numpy()
        out_per_group, in_per_group = w.shape[0] // self.group, w.shape[1]
        o = np.arange(w.shape[0])[:, None]
        return (o // out_per_group) * in_per_group + np.arange(in_per_group)[None, :]


def _tensor_like(values: np.ndarray, like: ir.TensorProtocol) -> ir.Tensor:
    return ir.tensor(np.ascontiguousarray(values, dtype=like.numpy().dtype))


def _fresh_name(graph: ir.Graph | None, base: str) -> str:
    """`base`, or `base` with a number, so that no initializer of the graph has it (onnxscript's
    rewriter would overwrite one that has)."""
    taken = graph.initializers if graph is not None else {}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name


def _emit_layer(op, layer: _LinearLayer, x: ir.Value, weight: np.ndarray, bias: np.ndarray, name: str) -> ir.Value:
    """The layer again, on input x, with these weights and this per-channel bias."""
    node = layer.node
    attributes = dict(node.attributes)
    w = op.initializer(_tensor_like(weight, layer.weight), name=_fresh_name(node.graph, f"{name}.weight"))
    if layer.op_type == "MatMul":  # only scales reach a MatMul: its bias stays all zeros
        return op.MatMul(x, w)
    attributes.pop("beta", None)  # folded into the bias below
    b = op.initializer(_tensor_like(bias, layer.weight), name=_fresh_name(node.graph, f"{name}.bias"))
    return op.op(layer.op_type, x, w, b, **attributes)


# A step by a constant c, as what it does to its other operand x: "scale" (x * c, x / c) or
# "shift" (x + c, x - c), and the vector that scales or shifts. Div and Sub only with c second.
STEPS = {"Mul": "scale", "Div": "scale", "Add": "shift", "Sub": "shift"}


def _step_vector(step: str, vec: np.ndarray) -> np.ndarray | None:
    vec = vec.astype(np.float64)
    if step == "Div":
        return None if np.any(vec == 0) else 1.0 / vec
    return -vec if step == "Sub" else vec


class AffineAfterLinear(pattern.RewriteRuleClassBase):
    """Conv / ConvTranspose / Gemm / MatMul, then Mul, Div, Add or Sub by a constant that varies
    only along its output channels (a BatchNorm exported as Mul + Add, a learnable affine step) ->
    the same layer with scaled weights and bias, or a shifted bias. Exact: (W x + b) s =
    (W s) x + b s. A MatMul takes no bias, so only a scale folds into it."""

    def __init__(self, producer: str, step: str):
        super().__init__(f"{step}After{producer}")
        self.producer, self.step, self.kind = producer, step, STEPS[step]

    def pattern(self, op, x, c):
        y = getattr(op, self.producer)(x, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["y"])
        return getattr(op, self.step)(y, c, _outputs=["out"])

    def _vector(self, layer: _LinearLayer, x: ir.Value, c: ir.Value) -> np.ndarray | None:
        rank = layer.output_rank(x)
        vec = None if rank is None else _channel_vector(c, rank, layer.output_axis(rank))
        if vec is None or vec.size not in (1, layer.out_channels()):
            return None
        vec = _step_vector(self.step, vec)
        return None if vec is None else np.broadcast_to(vec, (layer.out_channels(),))

    def check(self, context, x, c, y, out, **_):
        result = pattern.MatchResult()
        layer = _LinearLayer(y.producer())
        if (why := layer.foldable()) is not None:
            return result.fail(why)
        if self.kind == "shift" and layer.op_type == "MatMul":
            return result.fail("a MatMul has no bias to absorb a shift")
        if not _only_use(y, out.producer()):
            return result.fail("the layer's output has other readers")
        if self._vector(layer, x, c) is None:
            return result.fail("not a constant per output channel (or a division by 0)")
        if layer.bias_vector() is None:
            return result.fail("bias is not per output channel")
        return result

    def rewrite(self, op, x, c, y, out, **_):
        layer = _LinearLayer(y.producer())
        vec = self._vector(layer, x, c)
        weight, bias = layer.weight.numpy().astype(np.float64), layer.bias_vector()
        if self.kind == "scale":
            weight, bias = layer.scaled_weight(vec), bias * vec
        else:
            bias = bias + vec
        return _emit_layer(op, layer, x, weight, bias, out.name or layer.node.name)


class AffineBeforeConv(pattern.RewriteRuleClassBase):
    """Mul, Div, Add or Sub by a constant that varies only along the channels, read only by a
    Conv -> the Conv with scaled weights (a scale) or a shifted bias (a shift). A scale is always
    exact; a shift only without padding (padding adds zeros, not shifted zeros). A scale and shift
    before a padded Conv stay as they are: x * s + t = (x + t / s) * s would fold the scale, but
    x + t / s is a tensor the PyTorch path never observed, so it would have no range."""

    def __init__(self, step: str):
        super().__init__(f"{step}BeforeConv")
        self.step, self.kind = step, STEPS[step]

    def pattern(self, op, x, c):
        stepped = getattr(op, self.step)(x, c, _outputs=["stepped"])
        return op.Conv(stepped, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["out"])

    def _vector(self, layer: _LinearLayer, c: ir.Value) -> np.ndarray | None:
        w = layer.weight.numpy()
        channels = w.shape[1] * layer.group
        vec = _channel_vector(c, w.ndim, 1)
        if vec is None or vec.size not in (1, channels):
            return None
        vec = _step_vector(self.step, vec)
        return None if vec is None else np.broadcast_to(vec, (channels,))

    def check(self, context, x, c, stepped, out, **_):
        result = pattern.MatchResult()
        conv = out.producer()
        layer = _LinearLayer(conv)
        if (why := layer.foldable()) is not None:
            return result.fail(why)
        if conv.inputs[0] is not stepped or not _only_use(stepped, conv):
            return result.fail("the step has other readers")
        if x.const_value is not None:
            return result.fail("both operands are constant")
        if self._vector(layer, c) is None:
            return result.fail("not a constant per input channel (or a division by 0)")
        if self.kind == "shift" and not _no_padding(conv):
            return result.fail("a padded Conv: the shift cannot move into the bias")
        return result

    def rewrite(self, op, x, c, stepped, out, **_):
        layer = _LinearLayer(out.producer())
        w = layer.weight.numpy().astype(np.float64)
        vec = self._vector(layer, c)
        per_slice = vec[layer.input_channel_of()].reshape(w.shape[:2] + (1,) * (w.ndim - 2))
        bias = layer.bias_vector()
        if self.kind == "scale":
            w = w * per_slice
        else:
            bias = bias + (w * per_slice).reshape(w.shape[0], -1).sum(axis=1)
        return _emit_layer(op, layer, x, w, bias, out.name or layer.node.name)


class MergeConstantSteps(pattern.RewriteRuleClassBase):
    """Two scales (Mul / Div by constants) or two shifts (Add / Sub) in a row -> one Mul or Add
    by the combined constant (the inner step's output read only by the outer one). The result
    broadcasts to the same shape."""

    def __init__(self, inner: str, outer: str):
        super().__init__(f"{outer}Of{inner}")
        self.inner, self.outer = inner, outer

    def pattern(self, op, x, a, b):
        inner = getattr(op, self.inner)(x, a, _outputs=["mid"])
        return getattr(op, self.outer)(inner, b, _outputs=["out"])

    def _combined(self, a: ir.Value, b: ir.Value) -> np.ndarray | None:
        ta, tb = ir.convenience.get_const_tensor(a), ir.convenience.get_const_tensor(b)
        if ta is None or tb is None:
            return None
        va, vb = ta.numpy(), tb.numpy()
        if not (np.issubdtype(va.dtype, np.floating) and va.dtype == vb.dtype):
            return None
        steps = []
        for step, v in ((self.inner, va), (self.outer, vb)):
            v = v.astype(np.float64)
            if step == "Div":
                if np.any(v == 0):
                    return None
                v = 1.0 / v
            steps.append(-v if step == "Sub" else v)
        merged = steps[0] * steps[1] if STEPS[self.inner] == "scale" else steps[0] + steps[1]
        return merged.astype(va.dtype)

    def check(self, context, x, a, b, mid, out, **_):
        result = pattern.MatchResult()
        if x.const_value is not None:
            return result.fail("both operands are constant")
        if not _only_use(mid, out.producer()):
            return result.fail("the inner step has other readers")
        if self._combined(a, b) is None:
            return result.fail("not two float constants")
        return result

    def rewrite(self, op, x, a, b, mid, out, **_):
        c = op.initializer(ir.tensor(self._combined(a, b)), name=_fresh_name(out.producer().graph, f"{out.name}.constant"))
        return op.Mul(x, c) if STEPS[self.inner] == "scale" else op.Add(x, c)


def _no_padding(conv: ir.Node) -> bool:
    auto_pad = conv.attributes.get_string("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", "VALID"):
        return False
    pads = conv.attributes.get("pads")
    return pads is None or not any(pads.as_ints())


# Rules whose constant may be either operand (Mul, Add), and those where it must come second.
AFFINE_RULES = [
    *(AffineAfterLinear.rule(producer, step) for producer in LINEAR_OPS for step in ("Mul", "Add")),
    *(AffineBeforeConv.rule(step) for step in ("Mul", "Add")),
    *(MergeConstantSteps.rule(inner, outer) for inner, outer in (("Mul", "Mul"), ("Add", "Add"))),
]
ORDERED_AFFINE_RULES = [
    *(AffineAfterLinear.rule(producer, step) for producer in LINEAR_OPS for step in ("Div", "Sub")),
    *(AffineBeforeConv.rule(step) for step in ("Div", "Sub")),
    *(MergeConstantSteps.rule(inner, outer) for inner, outer in (("Div", "Mul"), ("Mul", "Div"), ("Div", "Div"), ("Sub", "Add"), ("Add", "Sub"), ("Sub", "Sub"))),
]
REWRITE_RULES = [
    StandaloneBatchNormToAffine.rule(),
    SpatialMeanToGlobalAveragePool.rule(),
]


def register_orphan_constants(model: ir.Model) -> None:
    """Register constant values that nodes read but the graph does not own as initializers.

    onnxscript 0.7.2 folds two Flattens of one tensor into Reshapes whose shape constants both
    want the name '<x>/shape'; the second is renamed '<x>/shape_1' but never registered, so the
    serialized model reads a tensor nothing provides.
    """
    graph = model.graph
    for node in graph:
        for v in node.inputs:
            if v is not None and v.producer() is None and v.const_value is not None and not v.is_graph_input() and not v.is_initializer() and v.graph is None:
                graph.register_initializer(v)


def release_matcher_state() -> None:
    """Drop what onnxscript's pattern matchers remember of their last match.

    onnxscript 0.7.2 keeps the last match (its nodes, values and graph) on the rule objects,
    which are module-level, so the last optimized model stayed in memory after optimization:
    420 MB for ConvNeXt-B (bench/scale.py). The matchers set these again before each match.
    """
    rules = [*getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()), *REWRITE_RULES, *AFFINE_RULES, *ORDERED_AFFINE_RULES]
    for rule in rules:
        matcher = getattr(rule, "_matcher", None)
        for attr in ("_graph", "_current_node", "_match"):
            if matcher is not None and attr in vars(matcher):
                setattr(matcher, attr, None)


# Rounds of affine folding: each folds one Mul or Add step into each layer; a layer can have a
# few (a BatchNorm's Mul and Add, then a learnable scale and shift).
AFFINE_ROUNDS = 8


def constants_as_initializers(model: ir.Model) -> None:
    """Constants in any form the exporter wrote them -> initializers read directly: `Constant`
    nodes lifted (every size), Identity nodes of constants (chains too) bypassed. onnxscript's
    fusion rules take only initializers."""
    common_passes.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=0)(model)
    _bypass_identities_of_constants(model.graph)


def _bypass_identities_of_constants(graph: ir.Graph) -> None:
    """Readers of Identity(constant) read the constant itself, in the main graph only.

    Written here rather than onnx_ir's IdentityEliminationPass: that pass also renames values
    inside subgraphs, and an If branch whose output is an Identity of an outer-scope value then
    makes the outer value a subgraph output (it fails on nested Ifs)."""
    for node in list(graph):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1 or len(node.outputs) != 1:
            continue
        source, out = node.inputs[0], node.outputs[0]
        if source is None or source.const_value is None or not source.is_initializer() or out.is_graph_output():
            continue
        out.replace_all_uses_with(source)
        graph.remove(node, safe=True)


def fold_affine_steps(model: ir.Model) -> int:
    """Fold constant Mul / Add steps into neighbouring Conv / ConvTranspose / Gemm / MatMul
    layers (AFFINE_RULES, either operand order) until none is left; the number folded."""
    either = pattern.RewriteRuleSet(AFFINE_RULES, commute=True)
    ordered = pattern.RewriteRuleSet(ORDERED_AFFINE_RULES)
    total = 0
    for _ in range(AFFINE_ROUNDS):
        count = either.apply_to_model(model) + ordered.apply_to_model(model)
        total += count
        if not count:
            break
    return total


def optimize_ir(model: ir.Model) -> ir.Model:
    """Optimize an onnx_ir model in place and return it."""
    try:
        constants_as_initializers(model)
        onnxscript.optimizer.optimize_ir(model, num_iterations=3)
        register_orphan_constants(model)
        constants_as_initializers(model)  # what folding produced
        rewriter.rewrite(model, pattern_rewrite_rules=[*_FUSE_BATCHNORM, *REWRITE_RULES])
        fold_affine_steps(model)
        constants_as_initializers(model)  # the rewrites' own constants (e.g. Squeeze axes): optimizing again changes nothing
    finally:
        release_matcher_state()
    common_passes.IdentityEliminationPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return model


def fix_input_shapes(model: ir.Model, input_shapes: dict[str, list[int | str | None]]) -> None:
    inputs = {v.name: v for v in model.graph.inputs}
    for name, shape in input_shapes.items():
        if name not in inputs:
            raise InvalidModelError(f"input_shapes names {name!r}, which is not a model input (inputs: {sorted(inputs)})")
        inputs[name].shape = ir.Shape(list(shape))


def prepare_graph(model, opset: int | None = None, *, optimize: bool = True, consume: bool = False, input_shapes: dict | None = None) -> ir.Model:
    """The float graph that gets calibrated and quantized, whichever entry point asked: the opset
    upgraded (to `opset`, at least 13), shapes inferred (rewrites such as ReduceMean ->
    GlobalAveragePool need ranks), optimized if asked, names fixed. One preparation, so that the
    Calibrator's tensors are the quantizer's and the technique pipeline's."""
    from .model_io import infer_shapes, merge_inferred

    proto = load_model(model, copy=not consume)
    proto = upgrade_opset(proto, max(MIN_OPSET, opset or 0))
    try:
        proto = merge_inferred(proto, infer_shapes(proto, data_prop=True))
    except Exception:  # shape inference is a help, not a requirement
        pass
    ir_model = ir.serde.deserialize_model(proto)
    if input_shapes:
        fix_input_shapes(ir_model, input_shapes)
    if optimize:
        optimize_ir(ir_model)
    common_passes.NameFixPass()(ir_model)
    return ir_model


def optimize_model(
    model: onnx.ModelProto | str, input_shapes: dict[str, list[int | str | None]] | None = None, *, opset: int | None = None
) -> onnx.ModelProto:
    """Optimize a float ONNX model for quantization: fold BatchNorm, fold constants, drop dead code
    (`prepare_graph`: the very graph quantize_onnx and the quantizer work on).

    `input_shapes` optionally fixes input dimensions ({name: shape}); dynamic dimensions are
    otherwise kept. Models below opset 13 are upgraded (per-axis quantization needs it), or to
    `opset` if given. The input is not modified.
    """
    out = ir.serde.serialize_model(prepare_graph(model, opset, input_shapes=input_shapes))
    if default_opset(out) < MIN_OPSET:
        raise InvalidModelError("optimization lost the opset upgrade")
    return out
