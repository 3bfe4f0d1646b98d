"""export: the calibrated model -> float ONNX with markers -> the ONNX backend -> INT8 QDQ ONNX."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import onnx
import onnx_ir as ir
import torch
from onnxscript.values import Opset

from onnx_backend import markers, masks
from onnx_backend.calibrator import Ranges, save_ranges
from onnx_backend.errors import CalibrationError, ConfigError, TorchqError
from onnx_backend.model_io import save_model, write_text_atomic
from onnx_backend.quantizer import QuantizationReport, quantize_with_report
from onnx_backend.range_selection import map_range_searches, select_range
from onnx_backend.statistics import TensorStatistics, channel_sums_of

from .capture import Phase
from .config import QuantConfig
from .distributed import require_merged
from .prepare import session_of

# ---- the marker, for both exporters ------------------------------------------------------------


@torch.library.custom_op("torchq::mark", mutates_args=())
def _mark_op(x: torch.Tensor, key: str) -> torch.Tensor:
    return x.clone()


@_mark_op.register_fake
def _(x, key):
    return torch.empty_like(x)


_TORCHQ_OPSET = Opset(markers.DOMAIN, markers.VERSION)


def _mark_onnx(x, key: str):
    """Translation of torchq::mark for the dynamo exporter."""
    return _TORCHQ_OPSET.Mark(x, key=key)


class _MarkFunction(torch.autograd.Function):
    """The marker for the TorchScript exporter (dynamo=False)."""

    @staticmethod
    def forward(ctx, x, key):
        return x.clone()

    @staticmethod
    def symbolic(g, x, key):
        out = g.op(f"{markers.DOMAIN}::{markers.OP_TYPE}", x, key_s=key)
        out.setType(x.type())  # an identity: same type and shape as its input
        return out


def _dynamo_marker(x: torch.Tensor, key: str) -> torch.Tensor:
    return torch.ops.torchq.mark(x, key)


def _torchscript_marker(x: torch.Tensor, key: str) -> torch.Tensor:
    return _MarkFunction.apply(x, key)


# ---- the report --------------------------------------------------------------------------------


@dataclass
class ExportReport:
    """What was quantized; every tensor left in float with the reason and its PyTorch origin."""

    backend: QuantizationReport
    keys_of_tensor: dict[str, list[str]] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    exporter: str = "dynamo"
    techniques: dict = field(default_factory=dict)  # what each accuracy technique did, if any ran

    @property
    def float_tensors(self) -> dict[str, str]:
        return self.backend.float_tensors

    def to_dict(self) -> dict:
        d = self.backend.to_dict()
        d["exporter"] = self.exporter
        d["tensor_origins"] = {t: k for t, k in sorted(self.keys_of_tensor.items())}
        d["ranges"] = {t: list(r) for t, r in sorted(self.ranges.items())}
        if self.techniques:
            d["techniques"] = self.techniques
        return d

    def describe(self) -> str:
        return self.backend.describe()


# ---- export ------------------------------------------------------------------------------------


def _as_args(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export", "onnxscript")


@contextlib.contextmanager
def quiet_logs(logger_names=EXPORTER_LOGGERS):
    """Silence these loggers, warnings and prints for the duration (the exporters are chatty)."""
    loggers = [logging.getLogger(n) for n in logger_names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


class _KeywordAdapter(torch.nn.Module):
    """forward(*inputs) -> model(*positional, **{name: input}) for the TorchScript exporter, whose
    tracer cannot pass keyword arguments (a trailing dict arrives as one more positional input).
    The wrapped model's own hooks still see the call exactly as in calibration."""

    def __init__(self, model: torch.nn.Module, keywords: list[str]):
        super().__init__()
        self.model = model
        self.keywords = keywords
        self.train(model.training)

    def forward(self, *inputs):
        n = len(inputs) - len(self.keywords)
        return self.model(*inputs[:n], **dict(zip(self.keywords, inputs[n:])))


def _dynamic_shapes_for_kwargs(model, args: tuple, kwargs: Mapping, input_names, dynamic_axes: Mapping):
    """dynamic_axes as torch.export dynamic_shapes keyed by forward's parameter names.

    torch.onnx converts dynamic_axes to dynamic_shapes positionally, which fails for keyword
    inputs ("TypeError: too many positional arguments"). With plain tensor arguments the i-th
    tensor is the i-th ONNX input, so each named axis maps to its parameter; otherwise None
    (leave the conversion to torch.onnx)."""
    import inspect

    from torch.export import Dim

    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    names = list(input_names or [])
    shapes, i = {}, 0
    for pname, value in bound.arguments.items():
        if isinstance(value, torch.Tensor):
            onnx_name = names[i] if i < len(names) else pname
            axes = dynamic_axes.get(onnx_name)
            shapes[pname] = {int(a): Dim.AUTO for a in axes} if axes else None
            i += 1
        elif any(isinstance(x, torch.Tensor) for x in torch.utils._pytree.tree_leaves(value)):
            return None
        else:
            shapes[pname] = None
    return shapes


def export_float_with_markers(
    model: torch.nn.Module,
    args: tuple,
    kwargs: Mapping | None,
    *,
    dynamo: bool,
    opset: int,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping | None = None,
    dynamic_shapes=None,
) -> onnx.ModelProto:
    session, _ = session_of(model)
    was_training = model.training
    model.eval()
    session.marker = _dynamo_marker if dynamo else _torchscript_marker
    try:
        with session.phase_as(Phase.EXPORT), torch.no_grad(), quiet_logs():
            if dynamo and kwargs and dynamic_axes and dynamic_shapes is None:
                dynamic_shapes = _dynamic_shapes_for_kwargs(model, args, kwargs, input_names, dynamic_axes)
            if dynamo:
                program = torch.onnx.export(
                    model,
                    args,
                    kwargs=dict(kwargs or {}),
                    dynamo=True,
                    opset_version=opset,
                    input_names=list(input_names) if input_names else None,
                    output_names=list(output_names) if output_names else None,
                    dynamic_axes=dict(dynamic_axes) if dynamic_axes and dynamic_shapes is None else None,
                    dynamic_shapes=dynamic_shapes,
                    custom_translation_table={torch.ops.torchq.mark.default: _mark_onnx},
                    optimize=True,
                    verbose=False,
                )
                _rename_clashing_values(program.model)
                return program.model_proto
            buffer = io.BytesIO()
            traced, export_args = model, args
            if kwargs:  # tracing passes inputs positionally only
                traced, export_args = _KeywordAdapter(model, list(kwargs)), args + tuple(kwargs.values())
            torch.onnx.export(
                traced,
                export_args,
                buffer,
                dynamo=False,
                opset_version=opset,
                input_names=list(input_names) if input_names else None,
                output_names=list(output_names) if output_names else None,
                dynamic_axes=dict(dynamic_axes) if dynamic_axes else None,
                do_constant_folding=True,
            )
            return onnx.load_from_string(buffer.getvalue())
    except TorchqError:
        raise
    except Exception as exc:
        other = "dynamo=False" if dynamo else "dynamo=True"
        raise TorchqError(f"torch.onnx.export ({'dynamo' if dynamo else 'TorchScript'} exporter) failed: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''} -- try {other}") from exc
    finally:
        session.marker = None
        session.abort_forward()  # a no-op after a clean export; after Ctrl-C it leaves the capture mode
        model.train(was_training)


def _rename_clashing_values(model: ir.Model) -> None:
    """The dynamo exporter names values after their FX nodes (`embedding`, `linear`, ...) and then
    gives the graph's inputs and outputs the user's names, without checking that an inner value
    does not already carry one (torch 2.13: output_names=["embedding"] on a model with an
    nn.Embedding writes invalid ONNX). Rename the inner value: the user's names win."""
    graph = model.graph
    io_values = {id(v) for v in [*graph.inputs, *graph.outputs]}
    io_names = {v.name for v in [*graph.inputs, *graph.outputs]}
    taken = {v.name for node in ir.traversal.RecursiveGraphIterator(graph) for v in node.outputs} | set(graph.initializers) | io_names
    for node in ir.traversal.RecursiveGraphIterator(graph):
        for value in node.outputs:
            if value.name in io_names and id(value) not in io_values:
                k = 1
                while f"{value.name}_{k}" in taken:
                    k += 1
                value.name = f"{value.name}_{k}"
                taken.add(value.name)


def _module_of(key: str) -> str:
    path = key.rsplit(":", 1)[0]
    return "" if path.startswith("<") else path


def statistics_by_tensor(bindings: Mapping[str, list[str]], observers: Mapping, skip: set[str] = frozenset()) -> tuple[dict[str, TensorStatistics], dict[str, str]]:
    """{tensor: statistics} and {tensor: the key they came from} for the bound tensors."""
    stats, source = {}, {}
    for tensor, keys in bindings.items():
        for key in keys:
            obs = None if key in skip else observers.get(key)
            if obs is not None and obs.observed:
                stats[tensor] = obs.to_statistics()
                source[tensor] = key
                break
    return stats, source


def choose_ranges(stats: Mapping[str, TensorStatistics], source: Mapping[str, str], config: QuantConfig) -> tuple[dict, set[str]]:
    """Ranges by each tensor's module settings, and the tensors whose modules stay float (a
    tensor that held nothing but mask values gets no range)."""
    stats = {tensor: st for tensor, st in stats.items() if not st.empty}
    settings = {tensor: config.settings_for(_module_of(source[tensor])) for tensor in stats}
    float_tensors = {tensor for tensor, s in settings.items() if s["float"]}
    method = {tensor: "mse" if s["method"] == "auto" else s["method"] for tensor, s in settings.items()}  # auto is chosen by the technique pipeline

    def chosen(tensor: str) -> tuple[float, float]:
        s = settings[tensor]
        return select_range(stats[tensor], method[tensor], s["symmetric"], percentile=s["percentile"], sqnr_gamma=config.sqnr_gamma)

    tensors = list(stats)
    return dict(zip(tensors, map_range_searches(chosen, tensors, lambda t: (method[t], settings[t]["symmetric"])))), float_tensors


def calibrated_ranges(ir_model: ir.Model, stats: Mapping[str, TensorStatistics], source: Mapping[str, str], config: QuantConfig) -> tuple[Ranges, set[str]]:
    """choose_ranges, with attention masks kept masking, and the mask counts and per-channel
    sums (for the analytic bias correction) of the statistics carried along."""
    ranges, float_tensors = choose_ranges(stats, source, config)
    return Ranges(masks.keep_masking(ir_model, stats, ranges), mask_values=masks.mask_counts(stats), channel_sums=channel_sums_of(stats)), float_tensors


@dataclass
class _Calibrated:
    """The float export with markers stripped, and everything bound to its tensors."""

    model: ir.Model | None  # released once serialized, to keep one float model in memory
    bindings: dict[str, list[str]]
    ranges: Ranges
    float_tensors: set[str]
    mismatched: set[str]
    statistics: dict[str, TensorStatistics]  # the observers', by exported tensor


def _export_and_bind(model, example_inputs, kwargs, dynamo, export_options) -> _Calibrated:
    session, config = session_of(model)
    if session.batches == 0:
        raise CalibrationError("export before any calibration batch: run the prepared model on calibration data first")
    require_merged(session)
    args = _as_args(example_inputs)
    _check_example_inputs(model, session, args, kwargs)
    session.mismatched.clear()
    proto = export_float_with_markers(model, args, kwargs, dynamo=dynamo, opset=config.opset, **export_options)
    ir_model = ir.serde.deserialize_model(proto)
    bindings = markers.strip_markers(ir_model)
    stats, source = statistics_by_tensor(bindings, session.observers, skip=session.mismatched)
    ranges, float_tensors = calibrated_ranges(ir_model, stats, source, config)
    return _Calibrated(ir_model, bindings, ranges, float_tensors, set(session.mismatched), stats)


def export_float(
    model: torch.nn.Module,
    example_inputs,
    path: str | os.PathLike | None = None,
    *,
    ranges_path: str | os.PathLike | None = None,
    kwargs: Mapping | None = None,
    dynamo: bool = True,
    **export_options,
) -> tuple[onnx.ModelProto, Ranges]:
    """The float ONNX model and the calibrated ranges of its tensors, for the ONNX backend.

    `torchq quantize-onnx FLOAT.onnx --ranges RANGES.json` (or onnx_backend.quantize) then gives
    the same INT8 model as `torchq.export`. Both files are written atomically if paths are given.
    """
    _, config = session_of(model)
    c = _export_and_bind(model, example_inputs, kwargs, dynamo, export_options)
    proto = ir.serde.serialize_model(c.model)
    ranges = Ranges(c.ranges, method=f"{config.method}_{'sym' if config.symmetric else 'asym'}", percentile=config.percentile, mask_values=c.ranges.mask_values, channel_sums=c.ranges.channel_sums)
    if path is not None:
        save_model(proto, path)
    if ranges_path is not None:
        save_ranges(ranges, ranges_path)
    return proto, ranges


def export_with_report(
    model: torch.nn.Module,
    example_inputs,
    path: str | os.PathLike | None = None,
    *,
    kwargs: Mapping | None = None,
    input_names: Sequence[str] | None = None,
    output_names: Sequence[str] | None = None,
    dynamic_axes: Mapping | None = None,
    dynamic_shapes=None,
    dynamo: bool = True,
    report_path: str | os.PathLike | None = None,
) -> tuple[onnx.ModelProto, ExportReport]:
    session, config = session_of(model)
    if session.qat is not None:  # a QAT model: its learned scales, not the calibrated ranges
        from .qat.export import export_with_report as export_qat

        return export_qat(model, example_inputs, path, kwargs=kwargs, dynamo=dynamo, report_path=report_path, input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes, dynamic_shapes=dynamic_shapes)
    options = dict(input_names=input_names, output_names=output_names, dynamic_axes=dynamic_axes, dynamic_shapes=dynamic_shapes)
    c = _export_and_bind(model, example_inputs, kwargs, dynamo, options)
    float_proto, c.model = ir.serde.serialize_model(c.model), None  # drop the exporter's copy now
    techniques: dict = {}
    if config.needs_samples:  # accuracy techniques: run on the ONNX graph with the kept samples
        from .techniques.pipeline import run_on_export

        qmodel, backend_report, c.ranges, techniques = run_on_export(model, float_proto, c.bindings, c.float_tensors, config, c.statistics)
    else:
        techniques = _mask_warning(float_proto, c.ranges)  # before quantize consumes float_proto
        qmodel, backend_report = quantize_with_report(
            float_proto,
            c.ranges,
            per_channel=config.per_channel,
            target=config.target,
            exclude_nodes=config.exclude_nodes,
            exclude_tensors=c.float_tensors,
            opset=config.opset,
            optimize=config.optimize,
            activation_dtype=config.activation_dtype,
            mean_correction=config.mean_correction,
            consume_input=True,  # ours: reused, not copied
        )
    del float_proto
    for warning in backend_report.warnings:  # the spec kept at a cost: say so
        warnings.warn(warning, stacklevel=2)
    for tensor, keys in c.bindings.items():
        if tensor in backend_report.float_tensors and any(k in c.mismatched for k in keys):
            backend_report.float_tensors[tensor] = f"calibration and export took different code paths at {keys[0]!r}; its statistics were not used"
    return write_export(qmodel, ExportReport(backend_report, {t: list(k) for t, k in c.bindings.items()}, c.ranges, "dynamo" if dynamo else "torchscript", techniques), path, report_path)


def write_export(qmodel: onnx.ModelProto, report: ExportReport, path=None, report_path=None) -> tuple[onnx.ModelProto, ExportReport]:
    """Save the INT8 model and its JSON report where asked (each atomically); return both."""
    if path is not None:
        save_model(qmodel, path)
    if report_path is not None:
        write_text_atomic(report_path, json.dumps(report.to_dict(), indent=1) + "\n")
    return qmodel, report


def _mask_warning(float_model: onnx.ModelProto, ranges) -> dict:
    """Padded attention on the plain path: say so, and what to do (docs/ACCURACY.md)."""
    from onnx_backend.techniques.calibration import masked_by_ranges

    masked = masked_by_ranges(float_model, ranges)
    if not masked:
        return {}
    message = (
        f"an additive attention mask sets the range of {len(masked)} tensor(s) on the way to a Softmax "
        f"({', '.join(masked[:3])}{', ...' if len(masked) > 3 else ''}), so the real scores get a handful of levels; "
        "quantize with QuantConfig(attention_masks=True) (or any accuracy technique) to leave the mask out"
    )
    warnings.warn(message, stacklevel=3)
    return {"warnings": [message]}


def _check_example_inputs(model, session, args, kwargs) -> None:
    with session.phase_as(Phase.PAUSED), torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            model(*args, **dict(kwargs or {}))
        except Exception as exc:
            raise ConfigError(f"example_inputs do not fit the model: {type(exc).__name__}: {exc}") from None
        finally:
            model.train(was_training)


def export(model: torch.nn.Module, example_inputs, path: str | os.PathLike | None = None, **options) -> onnx.ModelProto:
    """Export the calibrated model to a TFLite-spec INT8 QDQ ONNX model (written to `path` if given).

    Options as torch.onnx.export: `input_names`, `output_names`, `dynamic_axes`
    ({input name: {axis: name}}), `dynamic_shapes` (dynamo only), `kwargs`, and `dynamo`
    (True: the default exporter; False: the TorchScript exporter). `report_path` writes the
    JSON report of what stayed in float and why.
    """
    return export_with_report(model, example_inputs, path, **options)[0]
