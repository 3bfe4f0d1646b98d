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


METHODS: tuple[tuple[str, bool], ...] = tuple((m, s) for m in ("min_max", "entropy", "percentile", "mse", "sqnr") for s in (False, True))


def method_label(method: str, symmetric: bool) -> str:
    return f"{method}_{'sym' if symmetric else 'asym'}"


QUICK_METHODS: tuple[tuple[str, bool], ...] = (("min_max", False), ("mse", True))


def methods_for(settings: Settings) -> tuple[tuple[str, bool], ...]:
    """All ten methods; two in quick mode (the tests check the tables' form, not the numbers)."""
    return QUICK_METHODS if settings.quick else METHODS
