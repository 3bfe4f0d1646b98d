"""Empirical bias correction (Nagel et al. 2019, section 4.2; AIMET's empirical variant).

Quantizing weights (and the activations feeding a layer) shifts the expected value of the
layer's output: E[W_q x_q] != E[W x]. With the calibration data the shift is measured directly:
for every weighted layer, the per-output-channel mean of its output (after the bias, before any
activation) in the quantized model minus the same mean in the float model. Subtracting it from
the bias removes it.

A correction changes the inputs of every layer downstream, so layers are corrected in waves by
depth (the number of weighted layers on the longest path from the inputs): one quantization and
one pass over the calibration data per wave, each wave measured with all waves before it
corrected. `sweeps` > 1 repeats the whole thing (corrections accumulate) to mop up the small
changes that re-rounding the corrected int32 biases causes.

Every quantization also applies the analytic correction of weight rounding
(onnx_backend/mean_correction.py, on by default), so this starts from it: the shifts measured are
what is left after it, and a corrected bias is set so that the bias the quantized model uses
moves by exactly the measured shift.

A Conv / Gemm without a bias gets a zero bias first; a MatMul with no bias Add after it is left
alone (there is nowhere to put the correction without adding an op) and reported.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir

from ..quantizer import QuantizationReport
from .graph import Feeds, Layer, channel_means, const, ensure_bias, output_channel_axis, private_initializer, set_const, tensors_on, to_proto, weighted_layers

Quantize = Callable[[ir.Model], tuple[onnx.ModelProto, QuantizationReport]]


@dataclass
class BiasCorrectionReport:
    layers: dict[str, dict] = field(default_factory=dict)  # layer -> {"before": max |shift|, "after": ...}
    skipped: dict[str, str] = field(default_factory=dict)
    iterations: int = 0
    waves: int = 0

    def to_dict(self) -> dict:
        return {"layers": self.layers, "skipped": self.skipped, "sweeps": self.iterations, "waves": self.waves}


def _out_node(layer: Layer) -> str:
    """Name of the node whose first output is the layer's biased output."""
    return layer.bias[0].name if layer.bias is not None else layer.node.name


def _node_outputs(model: onnx.ModelProto, nodes: Sequence[str]) -> dict[str, str]:
    by_name = {n.name: n.output[0] for n in model.graph.node}
    return {n: by_name[n] for n in nodes if n in by_name}


def channel_shifts(model: onnx.ModelProto, reference: dict[str, np.ndarray], layers: Sequence[Layer], feeds: Sequence[Feeds]) -> dict[str, np.ndarray]:
    """Per-channel mean of each layer's output in `model`, minus `reference` (by layer name)."""
    outs = _node_outputs(model, [_out_node(layer) for layer in layers])
    names = {layer.name: outs[_out_node(layer)] for layer in layers if _out_node(layer) in outs}
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for values in tensors_on(model, feeds, list(names.values())):
        for layer in layers:
            if layer.name not in names:
                continue
            x = values[names[layer.name]]
            s, c = channel_means(x, output_channel_axis(layer, x))
            sums[layer.name] = sums.get(layer.name, 0) + s
            counts[layer.name] = counts.get(layer.name, 0) + c
    return {n: sums[n] / counts[n] - reference[n] for n in sums if n in reference}


def float_means(model: ir.Model, layers: Sequence[Layer], feeds: Sequence[Feeds]) -> dict[str, np.ndarray]:
    proto = to_proto(model)
    zero = {layer.name: 0.0 for layer in layers}
    return channel_shifts(proto, zero, layers, feeds)


def depth_waves(model: ir.Model, layers: Sequence[Layer]) -> list[list[Layer]]:
    """Layers grouped by depth: wave k holds the layers with k weighted layers upstream."""
    level_of_node = {id(layer.node): layer for layer in layers}
    depth: dict[int, int] = {}  # id(value) -> weighted layers upstream of it
    waves: dict[int, list[Layer]] = {}
    for node in model.graph:  # topological order
        d = max((depth.get(id(v), 0) for v in node.inputs if v is not None), default=0)
        layer = level_of_node.get(id(node))
        if layer is not None:
            waves.setdefault(d, []).append(layer)
            d += 1
        for o in node.outputs:
            depth[id(o)] = d
    return [waves[k] for k in sorted(waves)]


def correct_bias(model: ir.Model, feeds: Sequence[Feeds], quantize: Quantize, *, sweeps: int = 1, int8_nodes: set[str] | None = None) -> BiasCorrectionReport:
    """Correct the biases of `model` in place so that the quantized model's layer outputs have the
    float model's per-channel means on `feeds`. `quantize(model)` gives the QDQ model."""
    report = BiasCorrectionReport()
    layers = []
    for layer in weighted_layers(model):
        if int8_nodes is not None and layer.name not in int8_nodes:
            continue
        layer = ensure_bias(model, layer)
        if layer.bias is None:
            report.skipped[layer.name] = "MatMul without a bias Add: no place for the correction"
            continue
        layers.append(layer)
    if not layers:
        return report
    reference = float_means(model, layers, feeds)
    waves = depth_waves(model, layers)
    report.waves = len(waves)
    for name, shift in channel_shifts(quantize(model)[0], reference, layers, feeds).items():
        report.layers[name] = {"before": float(np.max(np.abs(shift)))}
    for sweep in range(sweeps):
        for wave in waves:
            qmodel, qreport = quantize(model)
            steps = {(c.node, c.input_index): c.params.scale.astype(np.float64) for c in qreport.plan.constants if c.kind == "bias"}
            analytic = qreport.plan.mean_shifts  # taken out of the bias again at every quantization
            shifts = channel_shifts(qmodel, reference, wave, feeds)
            for layer in wave:
                shift = shifts.get(layer.name)
                if shift is None:
                    report.skipped.setdefault(layer.name, "its output is not in the quantized model")
                    continue
                node, idx = layer.bias
                b = private_initializer(model.graph, node, idx)
                old = const(b).astype(np.float64)
                step = steps.get((node.name, idx))
                c = analytic.get((node.name, idx), 0.0)
                if step is not None:  # correct the bias the quantized model uses, so what is left is < half a step
                    old = np.rint((old - c) / step) * step + c
                set_const(b, old - shift)
        report.iterations = sweep + 1
    final = channel_shifts(quantize(model)[0], reference, layers, feeds)
    for name, shift in final.items():
        if name in report.layers:
            report.layers[name]["after"] = float(np.max(np.abs(shift)))
    return report
