"""torchq.export of a QAT model: the QDQ ONNX with the learned scales and the trained weights."""

from __future__ import annotations

import warnings

from onnx_backend.quantizer import quantize_with_report

from ..prepare import session_of
from .prepare import plan_and_probe, qat_state


def export_with_report(model, example_inputs, path=None, *, kwargs=None, dynamo: bool = True, report_path=None, **export_options):
    from ..export import ExportReport, write_export

    state = qat_state(model)
    _, config = session_of(model)
    planned = plan_and_probe(model, example_inputs, kwargs, dynamo, **export_options)
    if _structure(planned.binding) != _structure(state.binding):
        warnings.warn(f"the plan of this export quantizes other tensors than the one QAT was prepared on: {planned.binding.summary()} vs {state.binding.summary()}", stacklevel=3)
    # Activations reach the backend as their learned ranges (plan_and_probe), weights as the
    # planner's weight_scales, by the initializer each weighted node reads in this export's graph.
    nodes = {n.name: n for n in planned.graph.graph}
    scales = {}
    for key, w in planned.binding.weights.items():
        if key in state._weight_index:
            c = next(c for c in planned.plan.constants if c.node == w.node and c.kind == "weight")
            scales[nodes[w.node].inputs[c.input_index].name] = state.weight_scale(key).detach().cpu().double().numpy()
    c = planned.calibrated
    qmodel, backend_report = quantize_with_report(
        planned.proto, planned.ranges, per_channel=config.per_channel, target=config.target, exclude_tensors=c.float_tensors, opset=config.opset,
        activation_dtype=config.activation_dtype, weight_scales=scales, consume_input=True,
        # the fake-quantized forward that was trained has no analytic mean correction; the
        # exported model must compute exactly that forward
        mean_correction=False,
    )
    techniques = {"qat": {**state.binding.summary(), "unbound": dict(state.binding.unbound)}}
    return write_export(qmodel, ExportReport(backend_report, {t: list(k) for t, k in c.bindings.items()}, planned.ranges, "dynamo" if dynamo else "torchscript", techniques), path, report_path)


def _structure(binding) -> tuple:
    """Which ops the plan touches (not how its parameter objects happen to be shared)."""
    return set(binding.activation_of_key), set(binding.weights), {k: len(v) for k, v in binding.requantize.items()}
