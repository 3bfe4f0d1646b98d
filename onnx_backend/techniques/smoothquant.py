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

Readers on the host. A reader that the target runs on the host in float (planner.host_nodes:
a post-norm transformer's residual Add, joined to the host LayerNorm after it) reads X/s
multiplied back by s: a Mul by the constant vector s, placed on the host with it, so the
division costs it nothing and X's int8 readers still gain. This also smooths a Linear layer's
*output* when only host ops read it (BERT's FFN output, whose [CLS] token holds one channel
some 40x larger than the rest, into the residual sum): its output channels and bias are divided
by s_k = max(max|X_k| / median_k max|X_k|, 1), which per-channel weights absorb exactly, and the
host multiplies back; X keeps one per-tensor scale, now fitted to the ordinary channels. Kept
only if the relative quantization error of X itself, |s X'_q - X|^2 / |X|^2, goes down.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .. import qmath
from ..planner import HOST_NODE_KEY, host_nodes
from ..range_selection import select_range
from ..statistics import TensorStatistics
from .graph import Feeds, Layer, attrs, const, new_initializer, private_initializer, set_const, tensors_on, to_proto, weighted_layers

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
MAX_ROWS = 4096  # rows of X kept per group to compare the candidates
S_LIMITS = (1e-5, 1e5)
HOST_RESCALE = "SmoothQuant's rescale of a smoothed tensor for a reader on the host: runs there with it, in float"


@dataclass
class Group:
    x: ir.Value
    readers: list[Layer]  # int8 Linear layers reading X as input 0: their weight rows absorb s
    producer: ir.Node
    producer_layer: Layer | None = None
    host_readers: list[tuple[ir.Node, int]] = field(default_factory=list)  # (node, input index) on the host: X/s times s

    @property
    def output_only(self) -> bool:
        """Only host ops read X: s equalizes X's channels, no weight trades against it."""
        return not self.readers


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


def find_groups(model: ir.Model, host: set[str] | frozenset[str] = frozenset()) -> tuple[list[Group], dict[str, str]]:
    """The tensors to smooth: every Linear layer's input, and every int8 Linear layer's output that
    only host ops (`host`: node names) read; input groups first, so that an output group's scales
    see its layer's weights as the input smoothing left them."""
    layers = [layer for layer in weighted_layers(model, ("MatMul", "Gemm"))]
    by_node = {id(layer.node): layer for layer in layers if layer.name not in host}
    by_out = {id(layer.out): layer for layer in weighted_layers(model)}
    candidates = [layer.node.inputs[0] for layer in layers] + [layer.out for layer in layers if layer.name not in host]
    groups, skipped, seen = [], {}, set()
    for x in candidates:
        if id(x) in seen:
            continue
        seen.add(id(x))
        readers, host_readers, others = [], [], []
        for u in x.uses():
            layer = by_node.get(id(u.node))
            if layer is not None and u.idx == 0:
                readers.append(layer)
            elif u.node.name in host:
                host_readers.append((u.node, u.idx))
            else:
                others.append(u.node)
        if others or x.is_graph_output():
            skipped[x.name] = "read by something other than int8 Linear layers and host ops"
            continue
        producer = x.producer()
        if producer is None:
            skipped[x.name] = "a graph input: nothing to fold the scale into"
            continue
        if not readers and (id(x) not in by_out or producer.name in host or not host_readers):
            skipped[x.name] = "computed and read on the host: stays float"
            continue
        if producer.op_type == "LayerNormalization":
            a = attrs(producer)
            rank = x.shape.rank() if x.shape is not None else None
            axis = a.get("axis", -1)
            last = axis == -1 or (rank is not None and axis == rank - 1)
            if not last or const(producer.inputs[1]) is None or (len(producer.inputs) > 2 and producer.inputs[2] is not None and const(producer.inputs[2]) is None):
                skipped[x.name] = "LayerNormalization not over the last axis, or without constant scale/bias"
                continue
            groups.append(Group(x, readers, producer, host_readers=host_readers))
        elif id(x) in by_out:
            groups.append(Group(x, readers, producer, by_out[id(x)], host_readers=host_readers))
        else:
            skipped[x.name] = f"its producer ({producer.op_type}) cannot absorb a per-channel scale"
    groups.sort(key=lambda g: g.output_only)
    return groups, skipped


def _fake_quant_x(x: np.ndarray, method: str, symmetric: bool, **kw) -> np.ndarray:
    st = TensorStatistics()
    st.update(x)
    lo, hi = select_range(st, method, symmetric, **kw)
    if lo == hi:
        return np.zeros_like(x)
    p = qmath.activation_params(lo, hi, symmetric=lo < 0 and lo == -hi)
    return qmath.fake_quantize(x, p)


def _quantized_as_configured(x: np.ndarray, options) -> np.ndarray:
    """X fake-quantized per tensor with the pipeline's range method (auto: mse, its fallback)."""
    kw = {"percentile": options.percentile, "sqnr_gamma": options.sqnr_gamma}
    method = "mse" if options.method == "auto" else options.method
    return _fake_quant_x(x.astype(np.float32), method, options.symmetric, **kw).astype(np.float64)


def _fake_quant_w(w_kn: np.ndarray, per_channel: bool) -> np.ndarray:
    p = qmath.weight_params(w_kn, 1 if per_channel else None)
    return qmath.fake_quantize(w_kn, p)


def group_error(x: np.ndarray, weights: list[np.ndarray], s: np.ndarray | None, options) -> float:
    """sum over readers of |X'W' - XW|^2 / |XW|^2 with X' = X/s quantized, W' = diag(s) W quantized."""
    xq = _quantized_as_configured(x if s is None else x / s, options)
    err = 0.0
    for w in weights:
        ref = x @ w
        ws = w if s is None else w * s[:, None]
        y = xq @ _fake_quant_w(ws.astype(np.float32), options.per_channel).astype(np.float64)
        err += float(np.sum((y - ref) ** 2) / max(np.sum(ref**2), 1e-30))
    return err


def tensor_error(x: np.ndarray, s: np.ndarray | None, options) -> float:
    """|s (X/s)_q - X|^2 / |X|^2: X quantized per tensor after dividing its channels by s."""
    xq = _quantized_as_configured(x if s is None else x / s, options)
    y = xq if s is None else xq * s
    return float(np.sum((y - x) ** 2) / max(np.sum(x**2), 1e-30))


def equalizing_scales(xmax: np.ndarray) -> np.ndarray:
    """Channels above the median channel's range divided down to it; the rest kept."""
    ref = float(np.median(xmax))
    if ref <= 0:
        return np.ones_like(xmax)
    return np.clip(np.maximum(xmax / ref, 1.0), *S_LIMITS)


def smoothing_scales(xmax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    ok = (xmax > 0) & (wmax > 0)
    s = np.ones_like(xmax)
    s[ok] = xmax[ok] ** alpha / wmax[ok] ** (1 - alpha)
    return np.clip(s, *S_LIMITS)


def smooth(model: ir.Model, feeds: list[Feeds], options) -> SmoothQuantReport:
    """Smooth every eligible group of `model` in place; options.smoothquant is a or "auto"."""
    from ..quantizer import resolve_target

    report = SmoothQuantReport()
    host = host_nodes(model, supports=resolve_target(options.target), per_channel=options.per_channel)
    groups, report.skipped = find_groups(model, host)
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
        entry = {"readers": [r.name for r in g.readers], "host_readers": [n.name for n, _ in g.host_readers]}
        if g.output_only:
            s = equalizing_scales(xmax[name])
            before, after = tensor_error(x, None, options), tensor_error(x, s, options)
            alpha = "equalize"
        else:
            weights = [_as_kn(r).astype(np.float64) for r in g.readers]
            wmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            before = group_error(x, weights, None, options)
            candidates = ALPHAS if options.smoothquant == "auto" else (float(options.smoothquant),)
            errors = {a: group_error(x, weights, smoothing_scales(xmax[name], wmax, a), options) for a in candidates}
            alpha = min(errors, key=errors.get)
            s, after = smoothing_scales(xmax[name], wmax, alpha), errors[alpha]
        if after >= before and (g.output_only or options.smoothquant == "auto"):
            report.groups[name] = {"alpha": None, "error_before": before, "error_after": before, **entry}
            continue
        _apply(model, g, s)
        report.groups[name] = {"alpha": alpha, "error_before": before, "error_after": after, **entry}
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
    if g.host_readers:
        _undo_on_host(model, g, s)


def _undo_on_host(model: ir.Model, g: Group, s: np.ndarray) -> None:
    """The host readers read X/s times s: one Mul, placed on the host with them."""
    graph = model.graph
    scale = new_initializer(graph, s.astype(np.float32), f"{g.x.name}_smoothquant_scale")
    mul = ir.node("Mul", [g.x, scale], name=f"{g.x.name}_smoothquant_rescale", metadata_props={HOST_NODE_KEY: HOST_RESCALE})
    out = mul.outputs[0]
    out.name, out.shape, out.type = f"{g.x.name}_smoothquant_rescaled", g.x.shape, g.x.type
    graph.insert_after(g.producer, mul)
    for node, idx in g.host_readers:
        node.replace_input_with(idx, out)
