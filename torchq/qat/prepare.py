"""prepare_qat: the calibrated model's forward becomes the exported INT8 model's arithmetic."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import onnx
import onnx_ir as ir
import torch

from onnx_backend.calibrator import Ranges
from onnx_backend.errors import CalibrationError, ConfigError
from onnx_backend.planner import QuantPlan
from onnx_backend.quantizer import plan_model

from ..capture import Phase
from ..prepare import is_prepared, prepare, session_of
from .binding import Binding, Probe, bind
from .config import QATConfig, make_qat_config
from .state import QATState

SUBMODULE = "torchq_qat"


def is_qat(model: torch.nn.Module) -> bool:
    return is_prepared(model) and isinstance(session_of(model)[0].qat, QATState)


def qat_state(model: torch.nn.Module) -> QATState:
    if not is_qat(model):
        raise ConfigError("the model is not prepared for QAT; call torchq.prepare_qat(model, ...) first")
    return session_of(model)[0].qat


@dataclass
class Planned:
    binding: Binding
    ops: dict[str, str]  # op key -> op name, from the probe forward
    calibrated: object  # torchq.export._Calibrated: the export's tensor bindings and float tensors
    ranges: Ranges
    proto: onnx.ModelProto  # the float export, markers stripped
    graph: ir.Model  # the optimized graph the plan is made on
    plan: QuantPlan


def plan_and_probe(model: torch.nn.Module, example_inputs, kwargs: Mapping | None, dynamo: bool, **export_options) -> Planned:
    """Export the prepared model with markers, plan its quantization as `torchq.export` would,
    and bind the plan to the PyTorch ops."""
    from ..export import _export_and_bind

    session, config = session_of(model)
    qat, phase = session.qat, session.phase
    session.phase = Phase.OBSERVE  # the export path as for PTQ (it switches to EXPORT itself)
    try:
        c = _export_and_bind(model, example_inputs, kwargs, dynamo, export_options)
    finally:
        session.phase = phase
    ranges = c.ranges
    if isinstance(qat, QATState):
        ranges = learned_ranges(qat, c.bindings, ranges)
    proto = ir.serde.serialize_model(c.model)
    c.model = None
    graph_model, plan = plan_model(
        proto, ranges, per_channel=config.per_channel, target=config.target, exclude_tensors=c.float_tensors, opset=config.opset,
        mean_correction=False,  # QAT trains the rounded weights themselves: no bias shift on top (see export)
    )
    probe = Probe(model)
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    was_training = model.training
    session.qat, session.phase = probe, Phase.QAT
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **dict(kwargs or {}))
    finally:
        session.qat, session.phase = qat, phase
        session.abort_forward()
        model.train(was_training)
    binding = bind(model, graph_model.graph, plan, c.bindings, probe)
    ops = {k: call.op for k, call in probe.calls.items()}
    return Planned(binding, ops, c, ranges, proto, graph_model, plan)


def learned_ranges(state: QATState, bindings: Mapping[str, list[str]], ranges: Mapping) -> dict:
    """The calibrated ranges, with every tensor a QAT quantizer covers set to its learned grid."""
    out = Ranges(ranges, method="qat", mask_values=getattr(ranges, "mask_values", None))
    for tensor, keys in bindings.items():
        i = next((state.binding.activation_of_key[k] for k in keys if k in state.binding.activation_of_key), None)
        if i is not None:
            out[tensor] = state.activation_range(i)
    return out


def prepare_qat(
    model: torch.nn.Module,
    config: QATConfig | dict | None = None,
    *,
    example_inputs,
    kwargs: Mapping | None = None,
    calibration_data: Iterable | None = None,
    quant_config=None,
) -> torch.nn.Module:
    """Make the forward of a calibrated model compute what its exported INT8 model computes.

    `model` is prepared and calibrated (torchq.prepare + calibration batches), or
    `calibration_data` is given and it is prepared (with `quant_config`) and calibrated here.
    The model is exported to ONNX once, the backend's planner decides every quantization point,
    and each decision is bound back onto the PyTorch ops (torchq.qat.binding). Afterwards the
    forward fake-quantizes with straight-through gradients; the learnable scales are parameters
    of the submodule `model.torchq_qat` (train them with the rest: `model.parameters()`).
    BatchNorm runs on its running statistics (the exported model folds it). `torchq.export`
    writes the QDQ model with the learned scales and weights; `torchq.unprepare` undoes it all.
    """
    cfg = make_qat_config(config)
    if not is_prepared(model):
        if calibration_data is None:
            raise ConfigError("prepare_qat needs a calibrated model: call torchq.prepare and run calibration batches, or pass calibration_data")
        from ..api import calibrate

        prepare(model, quant_config)
        calibrate(model, calibration_data)
    elif calibration_data is not None:
        raise ConfigError("the model is already prepared; run its calibration batches yourself or pass calibration_data to an unprepared model")
    session, qconfig = session_of(model)
    if session.qat is not None:
        raise ConfigError("the model is already prepared for QAT")
    if session.batches == 0:
        raise CalibrationError("prepare_qat before any calibration batch: run the prepared model on calibration data first")
    if qconfig.needs_samples:
        raise ConfigError("QAT starts from the plain calibrated plan: turn the accuracy techniques (and method auto) off in the QuantConfig")
    planned = plan_and_probe(model, example_inputs, kwargs, cfg.dynamo)
    binding = planned.binding
    state = QATState(binding, model, planned.ops, learn_ranges=cfg.learn_ranges, learn_weight_scales=cfg.learn_weight_scales)
    device = _device_of(model)
    state.to(device)
    state.frozen = _freeze_constants(model, binding)
    state.config = cfg
    model.add_module(SUBMODULE, state)
    session.qat, session.phase = state, Phase.QAT
    return model


def release(model: torch.nn.Module, state: QATState) -> None:
    """Undo prepare_qat (torchq.unprepare calls it): the submodule goes, frozen parameters thaw."""
    for name in getattr(state, "frozen", []):
        model.get_parameter(name).requires_grad_(True)
    if getattr(model, SUBMODULE, None) is state:
        delattr(model, SUBMODULE)


def _freeze_constants(model: torch.nn.Module, binding: Binding) -> list[str]:
    frozen = []
    for inputs in binding.constants.values():
        for c in inputs:
            if c.frozen is not None:
                p = model.get_parameter(c.frozen)
                if p.requires_grad:
                    p.requires_grad_(False)
                    frozen.append(c.frozen)
    return frozen


def _device_of(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
