"""The TensorFlow Lite 8-bit quantization spec, in ONNX QDQ terms, as a table.

One row per ONNX op type says
* which inputs carry activations (quantized int8, per tensor),
* which input is a weight (int8 symmetric per output channel) and which a bias (int32),
* how the output's scale is chosen: its own range, the same as the input's, or fixed.

The planner applies the rows and the validator checks them, so both read the same rules.
Op types not listed are quantized at their float data inputs and outputs with their own
ranges ("own scale, everything else"), and only where the target runs them (see npu/).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np


class OutputScale(Enum):
    OWN = "own"  # output range from calibration
    SAME_AS_INPUT = "same"  # output (and, for Concat/Max/Min, every input) share one scale
    FIXED = "fixed"  # a constant scale and zero point
    NONE = "none"  # output is not a float activation (shapes, indices)


@dataclass(frozen=True)
class OpRule:
    output: OutputScale = OutputScale.OWN
    activation_inputs: tuple[int, ...] | None = (0,)  # None: every input
    weight_input: int | None = None
    bias_input: int | None = None
    fixed: tuple[float, int] | None = None  # (scale, zero point) for FIXED
    all_inputs_share_scale: bool = False  # Concat, Max, Min: inputs requantized to the output's
    absorbs_activation: bool = False  # a following Relu/Clip(0, x) folds into its output range
    notes: str = ""


ALL = None

SPEC: dict[str, OpRule] = {
    # weights, per output channel; bias int32 with scale = input scale x weight scale
    "Conv": OpRule(weight_input=1, bias_input=2, absorbs_activation=True),
    "ConvTranspose": OpRule(weight_input=1, bias_input=2, absorbs_activation=True),
    "Gemm": OpRule(activation_inputs=(0,), weight_input=1, bias_input=2, absorbs_activation=True),
    "MatMul": OpRule(activation_inputs=ALL, weight_input=1, absorbs_activation=True, notes="weight only when B is constant"),
    # own scale
    "Add": OpRule(activation_inputs=ALL, absorbs_activation=True),
    "Sub": OpRule(activation_inputs=ALL),
    "Mul": OpRule(activation_inputs=ALL),
    "Div": OpRule(activation_inputs=ALL),
    "ReduceMean": OpRule(),
    "GlobalAveragePool": OpRule(),
    "AveragePool": OpRule(output=OutputScale.SAME_AS_INPUT),
    # same scale in and out
    "MaxPool": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Reshape": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Flatten": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Transpose": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Squeeze": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Unsqueeze": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Slice": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Gather": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Pad": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Resize": OpRule(output=OutputScale.SAME_AS_INPUT),
    "SpaceToDepth": OpRule(output=OutputScale.SAME_AS_INPUT),
    "DepthToSpace": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Split": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Expand": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Identity": OpRule(output=OutputScale.SAME_AS_INPUT),
    "Concat": OpRule(output=OutputScale.SAME_AS_INPUT, activation_inputs=ALL, all_inputs_share_scale=True),
    "Max": OpRule(output=OutputScale.SAME_AS_INPUT, activation_inputs=ALL, all_inputs_share_scale=True),
    "Min": OpRule(output=OutputScale.SAME_AS_INPUT, activation_inputs=ALL, all_inputs_share_scale=True),
    # fixed output parameters
    "Sigmoid": OpRule(output=OutputScale.FIXED, fixed=(1.0 / 256.0, -128)),
    "Softmax": OpRule(output=OutputScale.FIXED, fixed=(1.0 / 256.0, -128)),
    "Tanh": OpRule(output=OutputScale.FIXED, fixed=(1.0 / 128.0, 0)),
    # ops whose outputs are not float activations
    "Shape": OpRule(output=OutputScale.NONE, activation_inputs=()),
    "Size": OpRule(output=OutputScale.NONE, activation_inputs=()),
    "ArgMax": OpRule(output=OutputScale.NONE),
    "ArgMin": OpRule(output=OutputScale.NONE),
    "NonZero": OpRule(output=OutputScale.NONE),
    "TopK": OpRule(output=OutputScale.NONE),
    "Equal": OpRule(output=OutputScale.NONE, activation_inputs=()),
    "Greater": OpRule(output=OutputScale.NONE, activation_inputs=()),
    "Less": OpRule(output=OutputScale.NONE, activation_inputs=()),
    "Cast": OpRule(output=OutputScale.NONE, activation_inputs=()),
    # elementwise unary ops and normalizations: own scale on input 0 only
    "LayerNormalization": OpRule(activation_inputs=(0,)),
    "InstanceNormalization": OpRule(activation_inputs=(0,)),
    "BatchNormalization": OpRule(activation_inputs=(0,)),
    "Clip": OpRule(activation_inputs=(0,)),
    "Where": OpRule(activation_inputs=(1, 2)),
    "Pow": OpRule(activation_inputs=(0,)),
}

ACTIVATIONS_THAT_FUSE = ("Relu", "Clip")  # absorbed into the producer's output range
# Same-scale ops whose output holds exactly the input's values, rearranged: an input without
# statistics of its own may take the output's range (nothing is clipped).
REARRANGE_OPS = frozenset({"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "SpaceToDepth", "DepthToSpace", "Identity"})

# Ops the exporters emit for pure shape arithmetic; their float inputs are never quantized.
SHAPE_OPS = {"Shape", "Size", "ConstantOfShape", "Range", "NonZero"}


def rule_for(op_type: str) -> OpRule:
    return SPEC.get(op_type, OpRule(activation_inputs=ALL))


def activation_input_indices(op_type: str, num_inputs: int) -> list[int]:
    rule = rule_for(op_type)
    if rule.activation_inputs is None:
        return list(range(num_inputs))
    return [i for i in rule.activation_inputs if i < num_inputs]


def weight_axis(op_type: str, attributes: dict, weight_shape: tuple[int, ...]) -> int:
    """The output-channel axis of a weight, where per-channel scales go.

    Conv (depthwise too): axis 0. Gemm: axis 0 if transB else 1. MatMul: the last axis.
    ConvTranspose weight is (C_in, C_out / group, k...): axis 1 when group == 1; for a
    depthwise transposed conv (C_in == group and C_out / group == 1) each input channel feeds
    exactly one output channel, so axis 0 is per output channel; otherwise axis 1, whose
    C_out / group scales are then shared by the groups (an ONNX per-axis scale cannot follow
    two axes). With C_in / group > 1 an axis-0 scale would vary inside one output's sum.
    """
    if op_type == "Conv":
        return 0
    if op_type == "Gemm":
        return 0 if attributes.get("transB", 0) else 1
    if op_type == "MatMul":
        return len(weight_shape) - 1
    if op_type == "ConvTranspose":
        group = attributes.get("group", 1)
        if group > 1 and weight_shape[1] == 1 and weight_shape[0] == group:
            return 0
        return 1
    raise ValueError(f"{op_type} has no weight input")


@dataclass
class FixedParams:
    scale: np.float32
    zero_point: int = field(default=0)
