"""A benchmark subject: a model with its data, metric and export settings, and how torchq and
the float exporter treat it. Sections iterate over subjects; nothing here knows about tables."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

from .common import Settings, quiet


@dataclass
class Subject:
    name: str
    family: str
    build: Callable[[], torch.nn.Module]  # the float model (trained, or random-init)
    calibration: Callable[[], list[tuple[torch.Tensor, ...]]]  # model-input tuples
    example: Callable[[], tuple[torch.Tensor, ...]]  # batch-1 inputs (export and latency)
    input_names: list[str]
    output_names: list[str]
    evaluate: Callable[[object], float] | None = None  # metric of a torch module or an ONNX model
    metric: str = ""
    conv_net: bool = True
    dynamic_axes: dict = field(default_factory=dict)
    notes: str = ""
    embed: Callable[[object], np.ndarray] | None = None  # embedding models: outputs to compare by cosine
    pt2e_dynamic: tuple[int, ...] = (0,)  # dims of every input that vary between calibration items
    methods: tuple[tuple[str, bool], ...] = ()  # a subset of the ten, where time is short

    def calibration_feeds(self) -> list[dict[str, np.ndarray]]:
        return [{n: t.numpy() for n, t in zip(self.input_names, batch)} for batch in self.calibration()]

    def example_feeds(self) -> dict[str, np.ndarray]:
        return {n: t.numpy() for n, t in zip(self.input_names, self.example())}


def batch_axes(names: Sequence[str]) -> dict:
    return {n: {0: "batch"} for n in names}


def export_float(subject: Subject, model: torch.nn.Module, path: Path) -> onnx.ModelProto:
    """The float ONNX model (same exporter and opset as torchq's), the baseline for everything."""
    from onnx_backend.model_io import save_model

    with quiet(), torch.no_grad():
        program = torch.onnx.export(
            model,
            subject.example(),
            dynamo=True,
            opset_version=18,
            input_names=subject.input_names,
            output_names=subject.output_names,
            dynamic_axes=subject.dynamic_axes or None,
            optimize=True,
            verbose=False,
        )
    proto = program.model_proto
    save_model(proto, path)
    return proto


@dataclass
class OursResult:
    method: str
    symmetric: bool
    model: onnx.ModelProto
    seconds: float
    int8_nodes: int
    float_nodes: int
    float_tensors: int
    violations: list

    @property
    def label(self) -> str:
        return f"{self.method}_{'sym' if self.symmetric else 'asym'}"


def quantize_ours(subject: Subject, model: torch.nn.Module, method: str, symmetric: bool, path: Path | None = None, calibration=None) -> OursResult:
    """prepare -> the user's calibration loop -> export (torchq's public API), timed end to end."""
    import torchq
    from onnx_backend import validate

    config = torchq.QuantConfig(method=method, symmetric=symmetric)
    batches = calibration if calibration is not None else subject.calibration()
    t0 = time.perf_counter()
    with quiet():
        torchq.prepare(model, config)
        try:
            with torch.no_grad():
                for batch in batches:
                    model(*batch)
            qmodel, report = torchq.export_with_report(
                model, subject.example(), path, input_names=subject.input_names, output_names=subject.output_names, dynamic_axes=subject.dynamic_axes or None
            )
        finally:
            torchq.unprepare(model)
    seconds = time.perf_counter() - t0
    s = report.backend.plan.summary()
    return OursResult(method, symmetric, qmodel, seconds, s["int8_nodes"], len(report.backend.float_nodes), len(report.float_tensors), validate(qmodel))


def quantize_methods(subject: Subject, model: torch.nn.Module, methods, calibration=None) -> tuple[dict[str, OursResult], float]:
    """All `methods` from ONE calibration pass and ONE export: torchq's export_with_report, split
    where the method enters (choose_ranges), so ten methods cost one export plus ten quantizations.
    Returns ({label: result}, seconds of the shared calibration + export). `result.seconds` is the
    shared part plus that method's range selection and quantization.

    Same functions as the public path (torchq.export_with_report); `measure` checks that the
    default method gives a byte-identical model both ways.
    """
    import onnx_ir as ir

    import torchq
    from onnx_backend import markers, validate
    from onnx_backend.quantizer import quantize_with_report
    from torchq.config import make_config
    from torchq.export import calibrated_ranges, export_float_with_markers, statistics_by_tensor
    from torchq.prepare import session_of

    base = torchq.QuantConfig()
    batches = calibration if calibration is not None else subject.calibration()
    t0 = time.perf_counter()
    with quiet():
        torchq.prepare(model, base)
        try:
            with torch.no_grad():
                for batch in batches:
                    model(*batch)
            session, cfg = session_of(model)
            session.mismatched.clear()
            proto = export_float_with_markers(
                model, subject.example(), None, dynamo=True, opset=cfg.opset, input_names=subject.input_names, output_names=subject.output_names, dynamic_axes=subject.dynamic_axes or None
            )
            ir_model = ir.serde.deserialize_model(proto)
            bindings = markers.strip_markers(ir_model)
            stats, source = statistics_by_tensor(bindings, session.observers, skip=session.mismatched)
        finally:
            torchq.unprepare(model)
    stripped = ir.serde.serialize_model(ir_model)
    shared = time.perf_counter() - t0
    results = {}
    for method, symmetric in methods:
        t1 = time.perf_counter()
        config = make_config(base, method=method, symmetric=symmetric)
        ranges, float_tensors = calibrated_ranges(ir_model, stats, source, config)
        with quiet():
            qmodel, report = quantize_with_report(
                stripped, ranges, per_channel=config.per_channel, target=config.target, exclude_tensors=float_tensors, opset=config.opset, mean_correction=config.mean_correction
            )
        s = report.plan.summary()
        results[method_label(method, symmetric)] = OursResult(
            method, symmetric, qmodel, shared + time.perf_counter() - t1, s["int8_nodes"], len(report.float_nodes), len(report.float_tensors), validate(qmodel)
        )
    return results, shared


METHODS: tuple[tuple[str, bool], ...] = tuple((m, s) for m in ("min_max", "entropy", "percentile", "mse", "sqnr") for s in (False, True))


def method_label(method: str, symmetric: bool) -> str:
    return f"{method}_{'sym' if symmetric else 'asym'}"


QUICK_METHODS: tuple[tuple[str, bool], ...] = (("min_max", False), ("mse", False))


def methods_for(settings: Settings, subject: Subject | None = None) -> tuple[tuple[str, bool], ...]:
    """All ten methods (or the subject's own subset); two in quick mode (the tests check the
    tables' form, not the numbers)."""
    if settings.quick:
        return QUICK_METHODS
    return subject.methods if subject is not None and subject.methods else METHODS
