"""The technique pipeline: float ONNX + calibration samples -> techniques -> INT8 QDQ ONNX.

Order, each step optional:
  1. prepare     the optimized float graph (BatchNorm folded, names fixed)
  2. equalize    cross-layer equalization + high-bias absorption (changes weights, not the function)
  3. smooth      SmoothQuant: activation outliers moved into the weights (changes weights, not the function)
  4. calibrate   statistics of the *modified* graph (what came before changed its activations),
                 attention masks left out of the ranges they would otherwise set
  5. ranges      one method for every tensor, or `auto`: per tensor, the method whose range best
                 preserves the tensor's consumers' outputs
  6. round       AdaRound weight rounding (a callable from the PyTorch side: onnx_backend has no torch)
  7. correct     empirical bias correction, measured with everything above in place
  8. quantize    the spine's planner and QDQ writer, with the rounding as weight overrides

`Prepared` holds the result of 1-7 so that quantizing again (sensitivity analysis, the
accuracy-targeted fallback) does not repeat them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx
import onnx_ir as ir

from .. import masks
from ..calibrator import Ranges
from ..quantizer import QuantizationReport, quantize_with_report
from ..range_selection import DEFAULT_PERCENTILE, DEFAULT_SQNR_GAMMA
from ..statistics import DEFAULT_BINS, TensorStatistics, channel_sums_of
from . import bias_correction, calibration, equalization
from .graph import Feeds, as_feeds, prepare, to_proto

METHODS = ("min_max", "percentile", "mse", "entropy", "sqnr")


@dataclass(frozen=True)
class Options:
    """What the pipeline does. Defaults: nothing beyond plain calibration."""

    method: str = "mse"  # one of METHODS, or "auto"
    symmetric: bool = False
    percentile: float = DEFAULT_PERCENTILE
    sqnr_gamma: float = DEFAULT_SQNR_GAMMA
    mean_correction: bool = True  # analytic bias correction of weight rounding (onnx_backend/mean_correction.py)
    per_channel: bool = True
    target: object = "warboy"
    activation_dtype: str = "int8"
    opset: int | None = None
    histogram_bins: int = DEFAULT_BINS
    optimize: bool = True  # graph optimization before calibration (onnx_backend.optimize)
    equalization: bool = False
    equalization_clip: Literal["keep", "relu"] = "keep"
    bias_correction: bool = False
    bias_correction_sweeps: int = 1
    smoothquant: float | Literal["auto"] | None = None
    auto_samples: int = 32  # samples used to compare methods for method="auto"

    def __post_init__(self):
        if self.method not in METHODS + ("auto",):
            raise ValueError(f"method must be one of {', '.join(METHODS + ('auto',))}, got {self.method!r}")


@dataclass
class TechniquesReport:
    """What each technique did, and the quantizer's report of the final model."""

    steps: dict[str, dict] = field(default_factory=dict)
    quantization: QuantizationReport | None = None

    def to_dict(self) -> dict:
        d = {"techniques": self.steps}
        if self.quantization is not None:
            d["quantization"] = self.quantization.to_dict()
        return d


# (model, prepared state) -> {weight name: integer array}; see torchq.techniques.adaround
Rounding = Callable[["Prepared"], Mapping[str, np.ndarray]]


@dataclass
class Prepared:
    """The float graph after the techniques, its ranges and weight rounding: ready to quantize."""

    model: ir.Model
    feeds: list[Feeds]
    options: Options
    ranges: dict[str, tuple[float, float]]
    statistics: calibration.Statistics | None = None
    weight_overrides: dict[str, np.ndarray] = field(default_factory=dict)
    exclude_nodes: frozenset[str] = frozenset()
    exclude_tensors: frozenset[str] = frozenset()
    report: TechniquesReport = field(default_factory=TechniquesReport)

    def quantize(self, *, exclude_nodes: Iterable[str] = (), weight_overrides: Mapping[str, np.ndarray] | None = None, model: ir.Model | None = None) -> tuple[onnx.ModelProto, QuantizationReport]:
        """The INT8 QDQ model of this state (with extra nodes kept in float, if given)."""
        return quantize_with_report(
            to_proto(model if model is not None else self.model),
            self.ranges,
            per_channel=self.options.per_channel,
            target=self.options.target,
            exclude_nodes=set(self.exclude_nodes) | set(exclude_nodes),
            exclude_tensors=self.exclude_tensors,
            opset=self.options.opset,
            optimize=False,
            activation_dtype=self.options.activation_dtype,
            weight_overrides=self.weight_overrides if weight_overrides is None else weight_overrides,
            mean_correction=self.options.mean_correction,
        )

    def float_model(self) -> onnx.ModelProto:
        return to_proto(self.model)


def run_pipeline(
    model: onnx.ModelProto | str | bytes,
    samples: Iterable,
    options: Options = Options(),
    *,
    rounding: Rounding | None = None,
    method_for: Callable[[str], tuple[str, bool]] | None = None,
    exclude_nodes: Iterable[str] = (),
    exclude_tensors: Iterable[str] = (),
    statistics: Mapping[str, TensorStatistics] | None = None,
) -> Prepared:
    """Steps 1-7 (see the module docstring). `method_for(tensor)` may give a tensor its own
    (method, symmetric), e.g. from per-module overrides; `exclude_*` stay float throughout.
    `statistics` of the float graph's tensors, gathered elsewhere, replace step 4 unless a step
    before it changed the activations (equalization, SmoothQuant)."""
    ir_model = prepare(model, options.opset, optimize=options.optimize)
    feeds = as_feeds(to_proto(ir_model), samples)
    report = TechniquesReport()
    if options.equalization:
        report.steps["equalization"] = equalization.equalize(ir_model, feeds, clip=options.equalization_clip).to_dict()
    if options.smoothquant is not None:
        from . import smoothquant

        report.steps["smoothquant"] = smoothquant.smooth(ir_model, feeds, options).to_dict()
    changed = options.equalization or options.smoothquant is not None
    stats = None if statistics is None or changed else calibration.given(to_proto(ir_model), dict(statistics), len(feeds))
    if stats is None:
        stats = calibration.collect(to_proto(ir_model), feeds, bins=options.histogram_bins)
    if stats.masked:
        report.steps["attention_masks"] = {
            "masked": {t: {"left_out_below": m.floor, "softmax_length": m.softmax_length} for t, m in stats.masked.items()},
            "masks": sorted(stats.mask_operands),
        }
    default = (options.method, options.symmetric)
    pick = method_for or (lambda _t: default)
    prepared = Prepared(ir_model, feeds, options, {}, stats, exclude_nodes=frozenset(exclude_nodes), exclude_tensors=frozenset(exclude_tensors), report=report)
    if options.method == "auto":
        from . import auto_method

        chosen = auto_method.choose(prepared, percentile=options.percentile, sqnr_gamma=options.sqnr_gamma, fixed=method_for)
        prepared.ranges = Ranges(chosen.ranges, mask_values=masks.mask_counts(stats.stats), channel_sums=channel_sums_of(stats.stats))  # the mask values reach the report
        report.steps["method_auto"] = chosen.to_dict()
    else:
        prepared.ranges = stats.ranges(pick, percentile=options.percentile, sqnr_gamma=options.sqnr_gamma)
    if rounding is not None:
        prepared.weight_overrides = dict(rounding(prepared))
        report.steps.setdefault("adaround", {})["layers"] = len(prepared.weight_overrides)
    if options.bias_correction:
        int8 = set(prepared.quantize()[1].plan.int8_nodes)
        report.steps["bias_correction"] = bias_correction.correct_bias(
            ir_model, feeds, lambda m: prepared.quantize(model=m), sweeps=options.bias_correction_sweeps, int8_nodes=int8
        ).to_dict()
    return prepared


def quantize_with_techniques(
    model: onnx.ModelProto | str | bytes,
    samples: Iterable,
    options: Options = Options(),
    *,
    rounding: Rounding | None = None,
    method_for: Callable[[str], tuple[str, bool]] | None = None,
    exclude_nodes: Iterable[str] = (),
    exclude_tensors: Iterable[str] = (),
) -> tuple[onnx.ModelProto, TechniquesReport]:
    """Float ONNX + calibration samples -> INT8 QDQ ONNX with the chosen techniques, and a report.

    `samples` are what `Calibrator.collect_data` takes (lists of inputs, or {name: array}).
    """
    prepared = run_pipeline(model, samples, options, rounding=rounding, method_for=method_for, exclude_nodes=exclude_nodes, exclude_tensors=exclude_tensors)
    qmodel, qreport = prepared.quantize()
    prepared.report.quantization = qreport
    return qmodel, prepared.report
