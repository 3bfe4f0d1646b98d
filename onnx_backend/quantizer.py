"""`quantize(model, ranges)`: float ONNX + tensor ranges -> TFLite-spec QDQ ONNX."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from .errors import ConfigError, InvalidModelError
from .model_editor import ModelEditor, TensorType, apply_pending
from .model_io import MIN_OPSET, check_without_data, load_model, upgrade_opset
from .optimize import optimize_ir, prepare_graph
from .planner import QuantPlan, Supports, plan_quantization, supports_everything
from .qdq import apply_plan


@dataclass
class QuantizationReport:
    """What was quantized and, for everything that was not, why."""

    plan: QuantPlan
    float_tensors: dict[str, str] = field(default_factory=dict)
    float_nodes: dict[str, str] = field(default_factory=dict)
    # {tensor: (low, high)}: mask values (-inf/+inf, finfo.min/max) left out of the tensor's range
    # on the calibration data; in int8 they saturate to the range's ends (onnx_backend.masks)
    mask_values: dict[str, tuple[int, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "summary": self.plan.summary(),
            "float_tensors": dict(sorted(self.float_tensors.items())),
            "float_nodes": dict(sorted(self.float_nodes.items())),
            "absorbed_activations": sorted(self.plan.absorbed),
            "requantized_edges": [f"{n}[{i}]" for n, i, _ in self.plan.requantize],
            "mask_values": {t: {"low": lo, "high": hi, "quantized": t in self.plan.activations} for t, (lo, hi) in sorted(self.mask_values.items())},
            "crushed_inputs": dict(sorted(self.plan.crushed_inputs.items())),
        }

    @property
    def warnings(self) -> list[str]:
        """What kept the spec at a cost the user should know: inputs a shared scale crushes."""
        return [f"{name}: {why}" for name, why in sorted(self.plan.crushed_inputs.items())]

    def describe(self) -> str:
        s = self.plan.summary()
        lines = [f"{s['quantized_tensors']} tensors quantized, {s['int8_nodes']} nodes in int8, {len(self.float_nodes)} in float"]
        for name, why in sorted(self.float_tensors.items()):
            lines.append(f"  float tensor {name}: {why}")
        for name, why in sorted(self.float_nodes.items()):
            lines.append(f"  float node   {name}: {why}")
        for warning in self.warnings:
            lines.append(f"  crushed      {warning}")
        for name, (low, high) in sorted(self.mask_values.items()):
            where = "saturate to the ends of its int8 range" if name in self.plan.activations else "the tensor stays float"
            lines.append(f"  mask values  {name}: {low} low, {high} high (+-inf, finfo.min/max) left out of its range; {where}")
        return "\n".join(lines)


# int8: the spec's storage, what the NPU consumes. uint8: the same grid with zero points + 128,
# for onnxruntime's x86 kernels (see ModelEditor.convert_activation_dtype).
ACTIVATION_DTYPES = {"int8": TensorType.INT8, "uint8": TensorType.UINT8}


def resolve_target(target) -> Supports:
    """A target name ('warboy', 'tflite'), an object with .supports(node), or None (everything)."""
    if target is None:
        return supports_everything
    if isinstance(target, str):
        from npu.target import load_target  # npu builds on this package; import lazily

        target = load_target(target)
    return target.supports


def _prepare_ir(model, opset: int | None, optimize: bool, consume: bool = False) -> ir.Model:
    ir_model = prepare_graph(model, opset, optimize=optimize, consume=consume)
    if not any(v.dtype == ir.DataType.FLOAT for n in ir_model.graph for v in n.outputs if v is not None) and not any(
        v.dtype == ir.DataType.FLOAT for v in ir_model.graph.inputs
    ):
        raise InvalidModelError("the model has no float32 tensors to quantize")
    return ir_model


def match_nodes(model: ir.Model, patterns: Iterable[str]) -> set[str]:
    """Names of nodes whose name or op type matches any glob pattern."""
    patterns = list(patterns)
    return {n.name for n in model.graph if any(fnmatch.fnmatchcase(n.name, p) or n.op_type == p for p in patterns)}


def quantize_with_report(
    model: onnx.ModelProto | str | bytes,
    ranges: Mapping[str, tuple[float, float]],
    *,
    per_channel: bool = True,
    target=None,
    exclude_nodes: Iterable[str] = (),
    exclude_tensors: Iterable[str] = (),
    opset: int | None = None,
    optimize: bool = True,
    activation_dtype: str = "int8",
    consume_input: bool = False,
    weight_overrides: Mapping[str, np.ndarray] | None = None,
    float_output_layers: bool = True,
    mean_correction: bool = True,
    weight_scales: Mapping[str, np.ndarray] | None = None,
) -> tuple[onnx.ModelProto, QuantizationReport]:
    """Quantize and also return the report of what stayed in float and why.

    `consume_input=True` lets a ModelProto the caller no longer needs be modified and reused
    instead of copied (one model's size less at the peak; torchq.export uses it).
    `weight_overrides` maps weight initializer names to integer arrays that replace
    round-to-nearest (AdaRound's learned rounding): same scales, each value floor or ceil of
    weight / scale; anything else is an error. `float_output_layers` (default) keeps a Linear
    layer that writes a model output in float on the host (see the planner, rule 8).
    `mean_correction` (default) takes each layer's weight-rounding mean shift out of its bias,
    where `ranges` carries the per-channel means of the layer's input (a calibrator.Ranges from
    calibration does; onnx_backend/mean_correction.py).
    `weight_scales` maps weight initializer names (of the optimized graph) to scales that replace
    max|w| / 127 (learned by quantization-aware training, torchq.qat).
    """
    if activation_dtype not in ACTIVATION_DTYPES:
        raise ConfigError(f"activation_dtype must be one of {sorted(ACTIVATION_DTYPES)}, got {activation_dtype!r}")
    ir_model, plan = plan_model(
        model,
        ranges,
        per_channel=per_channel,
        target=target,
        exclude_nodes=exclude_nodes,
        exclude_tensors=exclude_tensors,
        opset=opset,
        optimize=optimize,
        consume_input=consume_input,
        float_output_layers=float_output_layers,
        mean_correction=mean_correction,
        weight_scales=weight_scales,
    )
    apply_plan(ir_model, plan, weight_overrides)
    proto = apply_pending(ir.serde.serialize_model(ir_model))
    if activation_dtype != "int8":
        ModelEditor(proto).convert_activation_dtype(ACTIVATION_DTYPES[activation_dtype])
    try:
        check_without_data(proto)  # the weights are ours; their sizes were written by qdq
    except Exception as exc:
        _check_input(model, opset, optimize)
        raise RuntimeError(f"the quantized model does not pass onnx.checker: {exc}") from exc  # a torchq bug
    return proto, QuantizationReport(plan, dict(plan.float_tensors), dict(plan.float_nodes), dict(getattr(ranges, "mask_values", {})))


def plan_model(
    model: onnx.ModelProto | str | bytes,
    ranges: Mapping[str, tuple[float, float]],
    *,
    per_channel: bool = True,
    target=None,
    exclude_nodes: Iterable[str] = (),
    exclude_tensors: Iterable[str] = (),
    opset: int | None = None,
    optimize: bool = True,
    consume_input: bool = False,
    float_output_layers: bool = True,
    mean_correction: bool = True,
    weight_scales: Mapping[str, np.ndarray] | None = None,
) -> tuple[ir.Model, QuantPlan]:
    """The optimized float graph and the plan `quantize_with_report` applies to it (torchq.qat
    binds the plan's decisions to the PyTorch model without applying it)."""
    ir_model = _prepare_ir(model, opset, optimize, consume=consume_input)
    plan = plan_quantization(
        ir_model,
        ranges,
        per_channel=per_channel,
        supports=resolve_target(target),
        exclude_nodes=match_nodes(ir_model, exclude_nodes),
        exclude_tensors=set(exclude_tensors),
        float_output_layers=float_output_layers,
        mean_correction=mean_correction,
        weight_scales=weight_scales,
    )
    return ir_model, plan


def _first_line(exc: BaseException) -> str:
    return next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), type(exc).__name__)


def _check_input(model, opset: int | None, optimize: bool) -> None:
    """Blame the input when it is itself invalid ONNX, or becomes visibly inconsistent once its
    constants are folded (a shape mismatch hidden behind a computed shape). Only run when the
    output fails the check, so valid models pay nothing for it."""
    proto = upgrade_opset(load_model(model), max(MIN_OPSET, opset or 0))
    try:
        onnx.checker.check_model(proto, full_check=True)
    except Exception as exc:
        raise InvalidModelError(f"the model is not valid ONNX: {_first_line(exc)}") from None
    if optimize:
        folded = ir.serde.deserialize_model(proto)
        optimize_ir(folded)
        try:
            onnx.checker.check_model(ir.serde.serialize_model(folded), full_check=True)
        except Exception as exc:
            raise InvalidModelError(f"the model is inconsistent once its constants are folded: {_first_line(exc)}") from None


def quantize(
    model: onnx.ModelProto | str | bytes,
    ranges: Mapping[str, tuple[float, float]],
    *,
    per_channel: bool = True,
    target=None,
    exclude_nodes: Iterable[str] = (),
    opset: int | None = None,
    optimize: bool = True,
    activation_dtype: str = "int8",
    mean_correction: bool = True,
) -> onnx.ModelProto:
    """Quantize a float ONNX model with the given tensor ranges into a TFLite-spec QDQ model.

    `ranges` maps tensor names to (min, max), as `Calibrator.compute_range()` returns them; a range
    symmetric about 0 gets zero point 0. Tensors without a range stay float (see
    `quantize_with_report` for the list and the reasons). `target` ('warboy', 'tflite' or None for
    every op) decides which ops run in int8. `exclude_nodes` are node names or op types (globs)
    kept in float. `activation_dtype` "uint8" stores activations as uint8 (the same grid, zero
    points + 128) for fast onnxruntime execution on x86. `mean_correction` takes each layer's
    weight-rounding mean shift out of its bias where `ranges` carries its input's channel means
    (a calibrator.Ranges does). The input model is not modified.
    """
    return quantize_with_report(
        model,
        ranges,
        per_channel=per_channel,
        target=target,
        exclude_nodes=exclude_nodes,
        opset=opset,
        optimize=optimize,
        activation_dtype=activation_dtype,
        mean_correction=mean_correction,
    )[0]
