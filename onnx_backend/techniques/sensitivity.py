"""Sensitivity analysis: how much each layer's quantization costs.

A *layer* is a node that computes in int8 with a scale of its own (Conv, Gemm, MatMul, Add, Mul,
Softmax, ...; not the same-scale data movers like Reshape or MaxPool), together with the Relu /
Clip absorbed into it. For each layer two models are evaluated:

* only     -- only this layer quantized, every other node kept in float;
* all_but  -- every layer quantized except this one.

`metric(model) -> float` is the caller's evaluation (higher is better: accuracy, ...). Without
one, the metric is the output SQNR in dB against the float model on the calibration samples
(the float model itself scores +inf). The drop of a layer is float - only; its gain is
all_but - all quantized.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx

from .. import spec
from ..qmath import sqnr_db
from .graph import Feeds, outputs_on

Metric = Callable[[onnx.ModelProto], float]


def output_sqnr_metric(float_model: onnx.ModelProto, feeds: Sequence[Feeds], samples: int = 32) -> Metric:
    """Output SQNR (dB, the worst output) against `float_model` on the first `samples` feeds."""
    feeds = list(feeds[:samples])
    reference = outputs_on(float_model, feeds)

    def metric(model: onnx.ModelProto) -> float:
        outs = outputs_on(model, feeds)
        n_out = len(reference[0])
        return min(sqnr_db(np.concatenate([r[k].ravel() for r in reference]), np.concatenate([o[k].ravel() for o in outs])) for k in range(n_out))

    return metric


def layer_groups(prepared) -> tuple[dict[str, list[str]], set[str]]:
    """{layer name: its nodes} for every layer that runs in int8 with a scale of its own, and
    the names of all nodes that run in int8."""
    _, report = prepared.quantize()
    plan = report.plan
    nodes = {n.name: n for n in prepared.model.graph}
    absorbed_into: dict[str, list[str]] = {}
    for act, producer in plan.absorbed.items():
        absorbed_into.setdefault(producer, []).append(act)
    bias_adds = _bias_adds(prepared.model)
    groups = {}
    for name in plan.int8_nodes:
        node = nodes.get(name)
        if node is None or name in plan.absorbed or name in bias_adds.values():
            continue
        rule = spec.rule_for(node.op_type)
        if rule.output is spec.OutputScale.SAME_AS_INPUT and not rule.all_inputs_share_scale:
            continue
        members = [name] + absorbed_into.get(name, [])
        if name in bias_adds:  # MatMul + its bias Add are one Linear layer
            add = bias_adds[name]
            members += [add] + absorbed_into.get(add, [])
        groups[name] = members
    return groups, set(plan.int8_nodes) | set(plan.absorbed)


def _bias_adds(model) -> dict[str, str]:
    from .graph import weighted_layers

    return {layer.name: layer.bias[0].name for layer in weighted_layers(model) if layer.bias is not None and layer.bias[0] is not layer.node}


@dataclass
class LayerSensitivity:
    layer: str
    op: str
    only: float  # metric with only this layer quantized
    all_but: float  # metric with every layer but this one quantized


@dataclass
class SensitivityReport:
    float_metric: float
    quantized_metric: float
    layers: list[LayerSensitivity] = field(default_factory=list)

    def ranked(self) -> list[LayerSensitivity]:
        """Most harmful first: largest gain from keeping it float, then largest drop alone."""
        return sorted(self.layers, key=lambda s: (-(s.all_but - self.quantized_metric), s.only))

    def to_dict(self) -> dict:
        return {
            "float": self.float_metric,
            "quantized": self.quantized_metric,
            "layers": [{"layer": s.layer, "op": s.op, "only_this_quantized": s.only, "all_but_this_quantized": s.all_but} for s in self.ranked()],
        }

    def table(self) -> str:
        lines = [f"float {self.float_metric:.4g}, all quantized {self.quantized_metric:.4g}", "| layer | op | only this quantized | all but this quantized |", "|---|---|---|---|"]
        lines += [f"| {s.layer} | {s.op} | {s.only:.4g} | {s.all_but:.4g} |" for s in self.ranked()]
        return "\n".join(lines)


def analyze(prepared, metric: Metric | None = None, *, layers: Sequence[str] | None = None, both: bool = True) -> SensitivityReport:
    """Per-layer sensitivity of `prepared` (a pipeline.Prepared). `both=False` skips the
    only-this-layer models (half the evaluations; the fallback search needs all_but only)."""
    metric = metric or output_sqnr_metric(prepared.float_model(), prepared.feeds)
    groups, all_nodes = layer_groups(prepared)
    if layers is not None:
        groups = {k: v for k, v in groups.items() if k in set(layers)}
    op_of = {n.name: n.op_type for n in prepared.model.graph}
    report = SensitivityReport(metric(prepared.float_model()), metric(prepared.quantize()[0]))
    for name, members in groups.items():
        all_but = metric(prepared.quantize(exclude_nodes=members)[0])
        only = metric(prepared.quantize(exclude_nodes=all_nodes - set(members))[0]) if both else float("nan")
        report.layers.append(LayerSensitivity(name, op_of.get(name, "?"), only, all_but))
    return report
