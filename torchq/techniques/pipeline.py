"""The technique pipeline driven by a QuantConfig: for `torchq.export` and for ONNX users.

    qmodel, report = torchq.techniques.quantize_onnx("model.onnx", samples, QuantConfig(equalization=True, adaround=True))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping

import onnx

from onnx_backend.calibrator import get_pure_input_names
from onnx_backend.errors import CalibrationError
from onnx_backend.techniques.pipeline import Options, Prepared, TechniquesReport, run_pipeline

from ..config import QuantConfig, make_config
from .adaround import AdaRoundReport, rounding


# Options fields the pipeline sets itself, not the user's configuration
PIPELINE_ONLY = ("bias_correction_sweeps", "auto_samples")


def options_from_config(config: QuantConfig) -> Options:
    """The pipeline's Options: each one is the QuantConfig field of the same name (not re-typed)."""
    return Options(**{f.name: getattr(config, f.name) for f in dataclasses.fields(Options) if f.name not in PIPELINE_ONLY})


def prepare_onnx(
    model: onnx.ModelProto | str | bytes,
    samples: Iterable,
    config: QuantConfig | dict | None = None,
    *,
    method_for: Callable[[str], tuple[str, bool]] | None = None,
    exclude_nodes: Iterable[str] = (),
    exclude_tensors: Iterable[str] = (),
    statistics: Mapping | None = None,
) -> tuple[Prepared, AdaRoundReport | None]:
    """Run the techniques of `config` on a float ONNX model; quantize with `.quantize()`.
    `statistics` ({tensor: TensorStatistics}) gathered elsewhere set the ranges unless a
    technique changes the activations first (onnx_backend.techniques.pipeline.run_pipeline)."""
    cfg = make_config(config)
    ada = AdaRoundReport() if cfg.adaround else None
    prepared = run_pipeline(
        model,
        samples,
        options_from_config(cfg),
        rounding=rounding(cfg.adaround_iterations, report=ada) if cfg.adaround else None,
        method_for=method_for,
        exclude_nodes=exclude_nodes,
        exclude_tensors=exclude_tensors,
        statistics=statistics,
    )
    if ada is not None:
        prepared.report.steps["adaround"] = ada.to_dict()
    return prepared, ada


def quantize_onnx(model: onnx.ModelProto | str | bytes, samples: Iterable, config: QuantConfig | dict | None = None, *, exclude_nodes: Iterable[str] = ()) -> tuple[onnx.ModelProto, TechniquesReport]:
    """A float ONNX model and calibration samples (as `Calibrator.collect_data` takes them) ->
    INT8 QDQ model with the techniques of `config` (AdaRound included), and the report.
    `config.exclude_nodes` and `exclude_nodes` are node-name or op-type globs kept in float
    (`config.exclude` names PyTorch modules: an error here)."""
    cfg = make_config(config)
    cfg.check_for_onnx_model()
    prepared, _ = prepare_onnx(model, samples, cfg, exclude_nodes=[*exclude_nodes, *cfg.exclude_nodes])
    qmodel, qreport = prepared.quantize()
    prepared.report.quantization = qreport
    return qmodel, prepared.report


def static_batch_sizes(model: onnx.ModelProto) -> dict[str, int | None]:
    out = {}
    for i in model.graph.input:
        dims = i.type.tensor_type.shape.dim
        out[i.name] = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    return out


def exported_feeds(store, model: onnx.ModelProto) -> list[dict]:
    names = get_pure_input_names(model)
    return store.feeds(names, static_batch_sizes(model))


def method_for_bindings(config: QuantConfig, bindings: Mapping[str, list[str]]) -> Callable[[str], tuple[str, bool]]:
    """Each tensor's (method, symmetric) from its PyTorch module's settings (overrides)."""
    from ..export import _module_of

    def pick(tensor: str) -> tuple[str, bool]:
        keys = bindings.get(tensor)
        s = config.settings_for(_module_of(keys[0])) if keys else config.settings_for("")
        return s["method"], s["symmetric"]

    return pick


def run_on_export(module, float_proto: onnx.ModelProto, bindings: Mapping[str, list[str]], float_tensors: set[str], config: QuantConfig, statistics: Mapping | None = None):
    """`torchq.export`'s hook: the techniques on the exported float graph, with the samples that
    `prepare` kept for what needs inputs, and the observers' `statistics` (every calibration
    batch, bound to the exported tensors) for the ranges unless a technique changes the
    activations first. Returns (qmodel, quantizer report, ranges, techniques report)."""
    from .. import samples

    store = samples.store_of(module)
    if store is None:
        raise CalibrationError("no calibration samples were kept for the accuracy techniques: prepare the model with this config before calibrating")
    prepared, _ = prepare_onnx(
        float_proto,
        exported_feeds(store, float_proto),
        config,
        method_for=method_for_bindings(config, bindings),
        exclude_nodes=config.exclude_nodes,
        exclude_tensors=float_tensors,
        statistics=statistics,
    )
    qmodel, qreport = prepared.quantize()
    steps = dict(prepared.report.steps)
    steps["samples"] = {"kept": store.samples, "bytes": store.bytes, "runs": len(prepared.feeds)}
    observed = statistics is not None and prepared.statistics.stats is not None and all(prepared.statistics.stats.get(t) is s for t, s in statistics.items())
    steps["samples"]["ranges_from"] = "observers" if observed else "kept samples"
    return qmodel, qreport, dict(prepared.ranges), steps
