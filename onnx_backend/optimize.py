"""Graph optimization before quantization; the float function is preserved exactly.

The pipeline is onnxscript's optimizer (constant folding, dead-node removal, common
subexpression elimination, no-op removal, BatchNorm -> Conv / ConvTranspose / Gemm fusion and
its other default rewrite rules) plus the rules in `REWRITE_RULES` below, in the style of
onnxscript's rewriter: each a small pattern and its replacement. Activation fusion
(Relu / Clip into the producer) changes the float function, so it happens in the quantizer,
where the quantize step itself performs the clamp.

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
    rules = [*getattr(rewriter, "_DEFAULT_REWRITE_RULES", ()), *REWRITE_RULES]
    for rule in rules:
        matcher = getattr(rule, "_matcher", None)
        for attr in ("_graph", "_current_node", "_match"):
            if matcher is not None and attr in vars(matcher):
                setattr(matcher, attr, None)


def optimize_ir(model: ir.Model) -> ir.Model:
    """Optimize an onnx_ir model in place and return it."""
    try:
        onnxscript.optimizer.optimize_ir(model, num_iterations=3)
        register_orphan_constants(model)
        rewriter.rewrite(model, pattern_rewrite_rules=REWRITE_RULES)
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


def optimize_model(
    model: onnx.ModelProto | str, input_shapes: dict[str, list[int | str | None]] | None = None, *, opset: int | None = None
) -> onnx.ModelProto:
    """Optimize a float ONNX model for quantization: fold BatchNorm, fold constants, drop dead code.

    `input_shapes` optionally fixes input dimensions ({name: shape}); dynamic dimensions are
    otherwise kept. Models below opset 13 are upgraded (per-axis quantization needs it), or to
    `opset` if given. The input is not modified.
    """
    proto = load_model(model)
    proto = upgrade_opset(proto, max(MIN_OPSET, opset or 0))
    ir_model = ir.serde.deserialize_model(proto)
    if input_shapes:
        fix_input_shapes(ir_model, input_shapes)
    optimize_ir(ir_model)
    out = ir.serde.serialize_model(ir_model)
    if default_opset(out) < MIN_OPSET:
        raise InvalidModelError("optimization lost the opset upgrade")
    return out
