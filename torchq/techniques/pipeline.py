"""The technique pipeline driven by a QuantConfig: for `torchq.export` and for ONNX users.

    qmodel, report = torchq.techniques.quantize_onnx("model.onnx", samples, QuantConfig(equalization=True, adaround=True))
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import onnx

from onnx_backend.calibrator import get_pure_input_names
from onnx_backend.errors import CalibrationError
from onnx_backend.techniques.pipeline import Options, Prepared, TechniquesReport, run_pipeline

from ..config import QuantConfig, make_config
from .adaround import AdaRoundReport, rounding


def options_from_config(config: QuantConfig) -> Options:
    return Options(
        method=config.method,
        symmetric=config.symmetric,
        percentile=config.percentile,
        sqnr_gamma=config.sqnr_gamma,
        mean_correction=config.mean_correction,
        per_channel=config.per_channel,
        target=config.target,
        activation_dtype=config.activation_dtype,
        opset=config.opset,
        histogram_bins=config.histogram_bins,
        equalization=config.equalization,
        equalization_clip=config.equalization_clip,
        bias_correction=config.bias_correction,
        smoothquant=config.smoothquant,
    )


def prepare_onnx(
    model: onnx.ModelProto | str | bytes,
    samples: Iterable,
    config: QuantConfig | dict | None = None,
    *,
    method_for: Callable[[str], tuple[str, bool]] | None = None,
    exclude_nodes: Iterable[str] = (),
    exclude_tensors: Iterable[str] = (),
) -> tuple[Prepared, AdaRoundReport | None]:
    """Run the techniques of `config` on a float ONNX model; quantize with `.quantize()`."""
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
    )
    if ada is not None:
        prepared.report.steps["adaround"] = ada.to_dict()
    return prepared, ada


def quantize_onnx(model: onnx.ModelProto | str | bytes, samples: Iterable, config: QuantConfig | dict | None = None, *, exclude_nodes: Iterable[str] = ()) -> tuple[onnx.ModelProto, TechniquesReport]:
    """A float ONNX model and calibration samples (as `Calibrator.collect_data` takes them) ->
    INT8 QDQ model with the techniques of `config` (AdaRound included), and the report.
    `config.exclude` and `exclude_nodes` are node-name or op-type globs kept in float."""
    cfg = make_config(config)
    prepared, _ = prepare_onnx(model, samples, cfg, exclude_nodes=[*exclude_nodes, *cfg.exclude])
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


def run_on_export(module, float_proto: onnx.ModelProto, bindings: Mapping[str, list[str]], float_tensors: set[str], config: QuantConfig):
    """`torchq.export`'s hook: the techniques on the exported float graph, with the samples that
    `prepare` kept. Returns (qmodel, quantizer report, ranges, techniques report)."""
    from .. import samples

    store = samples.store_of(module)
    if store is None:
        raise CalibrationError("no calibration samples were kept for the accuracy techniques: prepare the model with this config before calibrating")
    prepared, _ = prepare_onnx(float_proto, exported_feeds(store, float_proto), config, method_for=method_for_bindings(config, bindings), exclude_tensors=float_tensors)
    qmodel, qreport = prepared.quantize()
    steps = dict(prepared.report.steps)
    steps["samples"] = {"kept": store.samples, "bytes": store.bytes, "runs": len(prepared.feeds)}
    return qmodel, qreport, dict(prepared.ranges), steps
