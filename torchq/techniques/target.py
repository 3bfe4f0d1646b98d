"""Accuracy-targeted quantization: the fewest float layers that meet an accuracy target.

    def accuracy(onnx_model) -> float: ...          # your evaluation, higher is better
    qmodel, report = torchq.quantize_to_target(model, loader, example_inputs, accuracy, target=0.995)
    print(report.describe())                        # met or not, the metric, the float layers

The same evaluation function scores the float export and every candidate INT8 model, so the
target is relative to the float model's own score. Whatever happens, a model comes back: the
first that meets the target with a minimal set of float layers, or else the best one found,
with `report.met == False`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence

import onnx
import torch

from onnx_backend.model_io import save_model, write_text_atomic
from onnx_backend.techniques.fallback import TargetReport
from onnx_backend.techniques.fallback import quantize_to_target as _search

from ..config import QuantConfig, make_config
from .pipeline import exported_feeds, method_for_bindings, prepare_onnx

Evaluate = Callable[[onnx.ModelProto], float]


def _finish(qmodel: onnx.ModelProto, report: TargetReport, path, report_path) -> None:
    import json

    if path is not None:
        save_model(qmodel, path)
    if report_path is not None:
        write_text_atomic(report_path, json.dumps(report.to_dict(), indent=1) + "\n")


def quantize_to_target(
    model: torch.nn.Module,
    calibration_data: Iterable,
    example_inputs,
    evaluate: Evaluate,
    *,
    target: float | None = 0.995,
    absolute: float | None = None,
    config: QuantConfig | dict | None = None,
    path: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    candidates: Sequence[str] | None = None,
    max_batches: int | None = None,
    quiet: bool | None = None,
    **export_options,
) -> tuple[onnx.ModelProto, TargetReport]:
    """prepare -> calibrate -> export -> techniques of `config` -> fallback search -> unprepare.

    `evaluate(onnx_model) -> float` scores a model (higher is better). The goal is
    `target` x evaluate(float export), or `absolute` if given. `candidates` (node names of the
    optimized graph) limits the layers that may stay float. The model is left exactly as it was.
    """
    from .. import samples
    from ..api import calibrate
    from ..export import _export_and_bind
    from ..prepare import prepare, session_of, unprepare

    cfg = make_config(config)
    prepare(model, cfg)
    try:
        if samples.store_of(model) is None:
            samples.attach(model, session_of(model)[0], cfg.max_samples, cfg.max_sample_bytes)
        calibrate(model, calibration_data, max_batches=max_batches, quiet=quiet)
        dynamo = export_options.pop("dynamo", True)
        kwargs = export_options.pop("kwargs", None)
        c = _export_and_bind(model, example_inputs, kwargs, dynamo, export_options)
        float_proto = onnx.ModelProto()
        float_proto.CopyFrom(_serialize(c.model))
        prepared, _ = prepare_onnx(float_proto, exported_feeds(samples.store_of(model), float_proto), cfg, method_for=method_for_bindings(cfg, c.bindings), exclude_tensors=c.float_tensors)
        qmodel, report = _search(prepared, evaluate, relative=target, absolute=absolute, float_metric=float(evaluate(float_proto)), candidates=candidates)
    finally:
        unprepare(model)
    _finish(qmodel, report, path, report_path)
    return qmodel, report


def quantize_onnx_to_target(
    model: onnx.ModelProto | str | bytes,
    samples: Iterable,
    evaluate: Evaluate,
    *,
    target: float | None = 0.995,
    absolute: float | None = None,
    config: QuantConfig | dict | None = None,
    path: str | os.PathLike | None = None,
    report_path: str | os.PathLike | None = None,
    candidates: Sequence[str] | None = None,
) -> tuple[onnx.ModelProto, TargetReport]:
    """The same for a float ONNX model and calibration samples (as Calibrator.collect_data takes)."""
    from onnx_backend.model_io import load_model

    cfg = make_config(config)
    cfg.check_for_onnx_model()
    proto = load_model(model)
    prepared, _ = prepare_onnx(proto, samples, cfg, exclude_nodes=cfg.exclude_nodes)
    qmodel, report = _search(prepared, evaluate, relative=target, absolute=absolute, float_metric=float(evaluate(proto)), candidates=candidates)
    _finish(qmodel, report, path, report_path)
    return qmodel, report


def _serialize(model) -> onnx.ModelProto:
    import onnx_ir as ir

    return ir.serde.serialize_model(model)
