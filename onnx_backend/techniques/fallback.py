"""Accuracy-targeted fallback: keep the fewest layers in float that meet an accuracy target.

Given `metric(model) -> float` (higher is better) and a goal (a share of the float model's
metric, e.g. 0.995, or an absolute value), the search

1. quantizes everything; if the goal is met, nothing stays float;
2. measures, for every layer (see sensitivity.layer_groups), the metric with only that layer
   kept in float and the metric with only that layer quantized, and ranks the layers by how much
   their quantization costs: the gain from keeping it float plus the drop when it alone is
   quantized (the second shows where the error is spread thin over many layers);
3. keeps layers in float in that order, one more each step, until the goal is met;
4. then tries to return each of them to int8 (latest first) and does so wherever the goal is
   still met, so the set it returns is minimal: no layer in it can go back to int8 alone.

The float layers are ordinary excluded nodes: the quantized model leaves them unquantized, the
report lists them ("excluded by configuration") and the NPU check shows them as host fallback.
If the goal is never met, the best model seen (highest metric; fewer float layers on ties) is
returned with `met = False`: there is always a model and a report. Cost: one evaluation for the
full model, two per layer, one per step, one per pruning try.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import onnx

from .sensitivity import LayerSensitivity, Metric, SensitivityReport, layer_groups


@dataclass
class TargetReport:
    goal: float
    float_metric: float
    met: bool
    metric: float
    float_layers: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    history: list[dict] = field(default_factory=list)  # every model evaluated: {"float_layers": [...], "metric": m}
    sensitivity: SensitivityReport | None = None

    def to_dict(self) -> dict:
        return {
            "goal": self.goal,
            "float_metric": self.float_metric,
            "met": self.met,
            "metric": self.metric,
            "float_layers": self.float_layers,
            "float_nodes": self.float_nodes,
            "evaluations": len(self.history),
            "history": self.history,
            "sensitivity": None if self.sensitivity is None else self.sensitivity.to_dict(),
        }

    def describe(self) -> str:
        status = "met" if self.met else "NOT met (best model found returned)"
        keep = ", ".join(self.float_layers) or "none"
        return f"target {self.goal:.4g} {status}: metric {self.metric:.4g} (float {self.float_metric:.4g}); layers kept in float: {keep}"


def _harm(s: LayerSensitivity, base: float, f_metric: float, rank: str) -> float:
    """How much a layer's quantization costs: its gain from staying float, plus (rank "both") its
    drop when quantized alone."""
    gain = s.all_but - base
    if rank != "both":
        return gain
    return gain + (f_metric - s.only if math.isfinite(f_metric) else -s.only)


def quantize_to_target(
    prepared,
    metric: Metric,
    *,
    relative: float | None = 0.995,
    absolute: float | None = None,
    float_metric: float | None = None,
    candidates: Sequence[str] | None = None,
    rank: str = "both",
) -> tuple[onnx.ModelProto, TargetReport]:
    """The quantized model with the fewest float layers that meets the goal (or the best found).

    `prepared` is a pipeline.Prepared; `float_metric` defaults to metric(prepared's float model);
    `candidates` restricts which layers may stay float. `rank` "both" orders the layers by their
    gain from staying float plus their drop when quantized alone (two evaluations per layer: errors
    spread over many layers show in the second); "all_but" by the gain alone (one).
    """
    if rank not in ("both", "all_but"):
        raise ValueError(f"rank must be 'both' or 'all_but', got {rank!r}")
    if absolute is None and relative is None:
        raise ValueError("give a relative or an absolute target")
    f_metric = metric(prepared.float_model()) if float_metric is None else float_metric
    goal = absolute if absolute is not None else relative * f_metric
    groups, _ = layer_groups(prepared)
    if candidates is not None:
        groups = {k: v for k, v in groups.items() if k in set(candidates)}
    cache: dict[frozenset, float] = {}  # metrics only: models are rebuilt, not kept in memory
    history: list[dict] = []

    def nodes_of(keep) -> list[str]:
        return sorted(n for k in keep for n in groups[k])

    def evaluate(keep: Sequence[str]) -> float:
        key = frozenset(keep)
        if key not in cache:
            model, _ = prepared.quantize(exclude_nodes=nodes_of(keep))
            cache[key] = float(metric(model))
            history.append({"float_layers": sorted(keep), "metric": cache[key]})
        return cache[key]

    def result(keep: list[str], met: bool) -> tuple[onnx.ModelProto, TargetReport]:
        model, _ = prepared.quantize(exclude_nodes=nodes_of(keep))
        return model, TargetReport(goal, f_metric, met, cache[frozenset(keep)], list(keep), nodes_of(keep), history, sensitivity)

    sensitivity = None
    base = evaluate([])
    if base >= goal:
        return result([], True)
    sensitivity = SensitivityReport(f_metric, base)
    op_of = {n.name: n.op_type for n in prepared.model.graph}
    for name in groups:
        only = evaluate([k for k in groups if k != name]) if rank == "both" else float("nan")
        sensitivity.layers.append(LayerSensitivity(name, op_of.get(name, "?"), only, evaluate([name])))
    order = [s.layer for s in sorted(sensitivity.layers, key=lambda s: -_harm(s, base, f_metric, rank))]
    keep: list[str] = []
    met = False
    for name in order:
        keep.append(name)
        if evaluate(keep) >= goal:
            met = True
            break
    if not met:
        best = max(cache, key=lambda k: (cache[k], -len(k)))
        return result(sorted(best, key=order.index), False)
    for name in list(reversed(keep)):
        trial = [k for k in keep if k != name]
        if evaluate(trial) >= goal:
            keep = trial
    return result(keep, True)
