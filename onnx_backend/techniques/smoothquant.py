"""SmoothQuant (Xiao et al., ICML 2023): move activation outliers into the weights.

A Linear layer's input X (tokens x K) often has a few channels far larger than the rest
(transformers' outlier features); one per-tensor int8 scale for X then leaves the ordinary
channels a handful of levels. With s_k = max|X_k|^a / max|W_k|^(1-a),
    X W = (X diag(1/s)) (diag(s) W),
so dividing channel k of X by s_k and multiplying row k of every weight that reads X by s_k keeps
the function and flattens X's channels; per-channel weight scales absorb most of the growth of W.

The division must be folded into what produces X, so a group is smoothed only when
* every reader of X is a Linear layer (MatMul with constant B, or Gemm) reading it as input 0, and
* X's producer absorbs a per-channel scale: LayerNormalization over the last axis (gamma and
  beta divided by s) or a Linear layer (its output channels and bias divided by s).

a (alpha) is either fixed, or chosen per group on the calibration data ("auto"): each candidate
is simulated in numpy (X' quantized per tensor with the pipeline's range method, W' per channel)
and the one with the smallest relative output error sum_consumers |X'W' - XW|^2 / |XW|^2 wins;
"no smoothing" is always a candidate, so auto never makes a group worse on that measure.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .. import qmath
from ..range_selection import select_range
from ..statistics import TensorStatistics
from .graph import Feeds, Layer, attrs, const, private_initializer, set_const, tensors_on, to_proto, weighted_layers

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_ROWS = 4096  # rows of X kept per group to compare the candidates
S_LIMITS = (1e-5, 1e5)


@dataclass
class Group:
    x: ir.Value
    readers: list[Layer]
    producer: ir.Node
    producer_layer: Layer | None = None


@dataclass
class SmoothQuantReport:
    groups: dict[str, dict] = field(default_factory=dict)  # X -> {"alpha": a | None, "error_before", "error_after", "readers"}
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"groups": self.groups, "skipped": self.skipped}


def _as_kn(layer: Layer) -> np.ndarray:
    """The weight as [K (input), N (output)]."""
    w = const(layer.weight)
    if layer.op == "Gemm" and attrs(layer.node).get("transB", 0):
        return w.T
    return w


def find_groups(model: ir.Model) -> tuple[list[Group], dict[str, str]]:
    layers = [layer for layer in weighted_layers(model, ("MatMul", "Gemm"))]
    by_node = {id(layer.node): layer for layer in layers}
    by_out = {id(layer.out): layer for layer in weighted_layers(model)}
    groups, skipped, seen = [], {}, set()
    for layer in layers:
        x = layer.node.inputs[0]
        if id(x) in seen:
            continue
        seen.add(id(x))
        readers = [by_node.get(id(u.node)) for u in x.uses()]
        if any(r is None or r.node.inputs[0] is not x for r in readers) or x.is_graph_output():
            skipped[x.name] = "read by something other than Linear layers"
            continue
        producer = x.producer()
        if producer is None:
            skipped[x.name] = "a graph input: nothing to fold the scale into"
            continue
        if producer.op_type == "LayerNormalization":
            a = attrs(producer)
            rank = x.shape.rank() if x.shape is not None else None
            axis = a.get("axis", -1)
            last = axis == -1 or (rank is not None and axis == rank - 1)
            if not last or const(producer.inputs[1]) is None or (len(producer.inputs) > 2 and producer.inputs[2] is not None and const(producer.inputs[2]) is None):
                skipped[x.name] = "LayerNormalization not over the last axis, or without constant scale/bias"
                continue
            groups.append(Group(x, readers, producer))
        elif id(x) in by_out:
            groups.append(Group(x, readers, producer, by_out[id(x)]))
        else:
            skipped[x.name] = f"its producer ({producer.op_type}) cannot absorb a per-channel scale"
    return groups, skipped


def _fake_quant_x(x: np.ndarray, method: str, symmetric: bool, **kw) -> np.ndarray:
    st = TensorStatistics()
    st.update(x)
    lo, hi = select_range(st, method, symmetric, **kw)
    if lo == hi:
        return np.zeros_like(x)
    p = qmath.activation_params(lo, hi, symmetric=lo < 0 and lo == -hi)
    return qmath.fake_quantize(x, p)


def _fake_quant_w(w_kn: np.ndarray, per_channel: bool) -> np.ndarray:
    p = qmath.weight_params(w_kn, 1 if per_channel else None)
    return qmath.fake_quantize(w_kn, p)


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, options) -> float:
    """sum over readers of |X'W' - XW|^2 / |XW|^2 with X' = X/s quantized, W' = diag(s) W quantized."""
    kw = {"percentile": options.percentile, "sqnr_gamma": options.sqnr_gamma}
    method = "mse" if options.method == "auto" else options.method
    xs = x if s is None else x / s
    xq = _fake_quant_x(xs.astype(np.float32), method, options.symmetric, **kw).astype(np.float64)
    err = 0.0
    for w in weights:
        ref = x @ w
        ws = w if s is None else w * s[:, None]
        y = xq @ _fake_quant_w(ws.astype(np.float32), options.per_channel).astype(np.float64)
        err += float(np.sum((y - ref) ** 2) / max(np.sum(ref**2), 1e-30))
    return err


def smoothing_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    ok = (xmax > 0) & (wmax > 0)
    s = np.ones_like(xmax)
    s[ok] = xmax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, *S_LIMITS)


def smooth(model: ir.Model, feeds: list[Feeds], options) -> SmoothQuantReport:
    """Smooth every eligible group of `model` in place; options.smoothquant is a or "auto"."""
    report = SmoothQuantReport()
    groups, report.skipped = find_groups(model)
    if not groups:
        return report
    xmax: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {g.x.name: [] for g in groups}
    kept = dict.fromkeys(rows, 0)
    for values in tensors_on(to_proto(model), feeds, list(rows)):
        for name, x in values.items():
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            m = np.abs(x2).max(axis=0)
            xmax[name] = m if name not in xmax else np.maximum(xmax[name], m)
            if kept[name] < MAX_ROWS:
                take = x2[: MAX_ROWS - kept[name]]
                rows[name].append(take)
                kept[name] += take.shape[0]
    for g in groups:
        name = g.x.name
        x = np.concatenate(rows[name])
        weights = [_as_kn(r).astype(np.float64) for r in g.readers]
        wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        before = group_error(x, weights, None, options)
        candidates = ALPHAS if options.smoothquant == "auto" else (float(options.smoothquant),)
        errors = {a: group_error(x, weights, smoothing_scales(xmax[name], wmax, a), options) for a in candidates}
        alpha = min(errors, key=errors.get)
        if options.smoothquant == "auto" and errors[alpha] >= before:
            report.groups[name] = {"alpha": None, "error_before": before, "error_after": before, "readers": [r.name for r in g.readers]}
            continue
        s = smoothing_scales(xmax[name], wmax, alpha)
        _apply(model, g, s)
        report.groups[name] = {"alpha": alpha, "error_before": before, "error_after": errors[alpha], "readers": [r.name for r in g.readers]}
    return report


def _apply(model: ir.Model, g: Group, s: np.ndarray) -> None:
    graph = model.graph
    if g.producer_layer is None:  # LayerNormalization: gamma, beta / s
        for idx in (1, 2):
            if idx < len(g.producer.inputs) and g.producer.inputs[idx] is not None:
                v = private_initializer(graph, g.producer, idx)
                set_const(v, const(v).astype(np.float64) / s)
    else:
        from .equalization import scale_out

        scale_out(model, g.producer_layer, 1.0 / s)
    for r in g.readers:
        v = private_initializer(graph, r.node, 1)
        w = const(v).astype(np.float64)
        if r.op == "Gemm" and attrs(r.node).get("transB", 0):
            set_const(v, w * s[None, :])
        else:
            set_const(v, w * s[:, None])
