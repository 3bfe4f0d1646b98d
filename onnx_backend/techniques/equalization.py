"""Cross-layer equalization with high-bias absorption (Nagel et al., "Data-Free Quantization
Through Weight Equalization and Bias Correction", ICCV 2019).

For two layers joined by a positively homogeneous activation (Relu, or nothing),
    y = W2 f(W1 x + b1) + b2,  f(s z) = s f(z) for s > 0,
scaling output channel i of layer 1 by 1/s_i and input channel i of layer 2 by s_i leaves y
unchanged. s_i = sqrt(r1_i / r2_i), with r the channel's largest |weight|, makes both channels'
ranges sqrt(r1_i r2_i): per-tensor weights (and the activation between) lose far less to the
one scale they share. Chains (conv -> depthwise -> pointwise) are swept until the scales settle.

Depthwise and grouped convolutions are handled: input channel i of a grouped Conv is column
i % (C_in / group) of its group's output channels.

Clip(0, c) (ReLU6) is not positively homogeneous: clip(s z, 0, c) != s clip(z, 0, c), and ONNX's
Clip takes one bound per tensor, so no per-channel bound can follow the scales. `clip="keep"`
leaves such pairs alone (the function is preserved exactly); `clip="relu"` replaces the Clip by a
Relu first, as AIMET does, which changes the function wherever a pre-activation exceeded c: the
report gives the share of calibration values that did.

High-bias absorption: after equalization a channel's bias may push its whole distribution far
from 0, wasting the range of the activation. With h_i = max(0, smallest pre-activation of channel
i seen on the calibration data), relu(z - h) + h = relu(z) wherever z >= h, so h_i moves from
b1 into layer 2's bias (b2 += W2 h). Only into a layer without zero padding (a 1x1 / unpadded
Conv, Gemm, MatMul): padding would see the shifted zeros. Exact on the calibration data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from .graph import Feeds, Layer, attrs, const, ensure_bias, private_initializer, set_const, sole_use, tensors_on, to_proto, weighted_layers

HOMOGENEOUS = ("Relu",)
MAX_SWEEPS = 20


@dataclass
class Pair:
    first: Layer
    act: ir.Node | None  # Relu / Clip between the two, or None
    second: Layer


@dataclass
class EqualizationReport:
    pairs: list[tuple[str, str]] = field(default_factory=list)
    sweeps: int = 0
    clips_replaced: dict[str, float] = field(default_factory=dict)  # clip node -> share of values above its bound
    clips_kept: list[str] = field(default_factory=list)
    absorbed: dict[str, float] = field(default_factory=dict)  # first layer -> mean |h| moved

    def to_dict(self) -> dict:
        return {
            "pairs": [list(p) for p in self.pairs],
            "sweeps": self.sweeps,
            "clips_replaced_by_relu": self.clips_replaced,
            "clips_kept": self.clips_kept,
            "high_bias_absorbed": self.absorbed,
        }


def _clip_bounds(node: ir.Node) -> tuple[float, float] | None:
    if node.op_type != "Clip":
        return None
    lo = const(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else np.float32(-np.inf)
    hi = const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2] is not None else np.float32(np.inf)
    if lo is None or hi is None:
        return None
    return float(lo), float(hi)


def find_pairs(model: ir.Model) -> list[tuple[Layer, ir.Node | None, Layer]]:
    """Layer -> [Relu | Clip(0, c)] -> layer, every intermediate tensor read by one node only."""
    layers = weighted_layers(model)
    by_node = {id(layer.node): layer for layer in layers}
    pairs = []
    for first in layers:
        nxt = sole_use(first.out)
        act = None
        if nxt is not None and (nxt.op_type in HOMOGENEOUS or (_clip_bounds(nxt) or (None,))[0] == 0.0):
            act, nxt = nxt, sole_use(nxt.outputs[0])
        if nxt is None or id(nxt) not in by_node:
            continue
        second = by_node[id(nxt)]
        if second.node.inputs[0] is not (act.outputs[0] if act is not None else first.out):
            continue
        if first.n_out() != _in_channels(second):
            continue
        pairs.append((first, act, second))
    return pairs


# ---- channel views of the weights ----------------------------------------------------------------


def _in_channels(layer: Layer) -> int:
    w = const(layer.weight)
    if layer.op == "Conv":
        return w.shape[1] * attrs(layer.node).get("group", 1)
    if layer.op == "Gemm":
        return w.shape[1] if attrs(layer.node).get("transB", 0) else w.shape[0]
    return w.shape[0]  # MatMul


def _grouped(layer: Layer, w: np.ndarray) -> np.ndarray:
    """Conv weight [C_out, C_in/g, k...] as [g, C_out/g, C_in/g, k...]."""
    g = attrs(layer.node).get("group", 1)
    return w.reshape(g, w.shape[0] // g, *w.shape[1:])


def in_ranges(layer: Layer) -> np.ndarray:
    """Largest |weight| per input channel."""
    w = np.abs(const(layer.weight))
    if layer.op == "Conv":
        wg = _grouped(layer, w)  # [g, o, i, k...]
        red = (1,) + tuple(range(3, wg.ndim))
        return wg.max(axis=red).reshape(-1)
    axis = 1 if layer.op == "Gemm" and attrs(layer.node).get("transB", 0) else 0
    return w.max(axis=1 - axis)


def out_ranges(layer: Layer) -> np.ndarray:
    w = np.abs(const(layer.weight))
    axis = layer.out_axis()
    return w.max(axis=tuple(i for i in range(w.ndim) if i != axis))


def scale_in(model: ir.Model, layer: Layer, s: np.ndarray) -> None:
    """Multiply input channel i of the weight by s_i."""
    v = private_initializer(model.graph, layer.node, 1)
    w = const(v).astype(np.float64)
    if layer.op == "Conv":
        wg = _grouped(layer, w)
        g, _, cin_g = wg.shape[:3]
        wg = wg * s.reshape(g, 1, cin_g, *([1] * (wg.ndim - 3)))
        w = wg.reshape(w.shape)
    else:
        axis = 1 if layer.op == "Gemm" and attrs(layer.node).get("transB", 0) else 0
        w = w * (s[None, :] if axis == 1 else s[:, None])
    set_const(v, w)


def scale_out(model: ir.Model, layer: Layer, s: np.ndarray) -> None:
    """Multiply output channel i of the weight and the bias by s_i."""
    v = private_initializer(model.graph, layer.node, 1)
    w = const(v).astype(np.float64)
    axis = layer.out_axis()
    shape = [1] * w.ndim
    shape[axis] = -1
    set_const(v, w * s.reshape(shape))
    if layer.bias is not None:
        node, idx = layer.bias
        b = private_initializer(model.graph, node, idx)
        set_const(b, const(b).astype(np.float64) * s)


# ---- the pass --------------------------------------------------------------------------------------


def _replace_clip(model: ir.Model, clip: ir.Node) -> ir.Node:
    relu = ir.node("Relu", [clip.inputs[0]], name=clip.name)
    out = clip.outputs[0]
    relu.outputs[0].name = None
    model.graph.insert_after(clip, relu)
    ir.convenience.replace_all_uses_with(out, relu.outputs[0])
    name = out.name
    model.graph.remove(clip, safe=True)
    relu.outputs[0].name = name
    relu.outputs[0].type, relu.outputs[0].shape = out.type, out.shape
    return relu


def _share_above(model: ir.Model, feeds: list[Feeds] | None, tensors: dict[str, float]) -> dict[str, float]:
    if not feeds or not tensors:
        return {}
    above = dict.fromkeys(tensors, 0)
    total = dict.fromkeys(tensors, 0)
    for values in tensors_on(to_proto(model), feeds, list(tensors)):
        for name, bound in tensors.items():
            above[name] += int(np.count_nonzero(values[name] > bound))
            total[name] += values[name].size
    return {n: above[n] / max(total[n], 1) for n in tensors}


def equalize(model: ir.Model, feeds: list[Feeds] | None = None, *, clip: str = "keep", absorb_high_bias: bool = True) -> EqualizationReport:
    """Equalize every layer pair of `model` in place. `feeds` (calibration samples) are needed for
    high-bias absorption and for the report on replaced clips; without them only the exact,
    data-free equalization runs."""
    if clip not in ("keep", "relu"):
        raise ValueError(f"clip must be 'keep' or 'relu', got {clip!r}")
    report = EqualizationReport()
    pairs = []
    clip_inputs = {}
    for first, act, second in find_pairs(model):
        if act is not None and act.op_type == "Clip" and np.isfinite(_clip_bounds(act)[1]):
            if clip == "keep":
                report.clips_kept.append(act.name)
                continue
            clip_inputs[act.name] = (act, act.inputs[0].name, _clip_bounds(act)[1])
        pairs.append(Pair(first, act, second))
    if clip_inputs:
        shares = _share_above(model, feeds, {t: b for _, t, b in clip_inputs.values()})
        for name, (node, tensor, _) in clip_inputs.items():
            report.clips_replaced[name] = shares.get(tensor, float("nan"))
            relu = _replace_clip(model, node)
            for p in pairs:
                if p.act is node:
                    p.act = relu
    report.pairs = [(p.first.name, p.second.name) for p in pairs]
    for sweep in range(MAX_SWEEPS):
        largest = 0.0
        for p in pairs:
            r1, r2 = out_ranges(p.first).astype(np.float64), in_ranges(p.second).astype(np.float64)
            ok = (r1 > 0) & (r2 > 0)
            s = np.ones_like(r1)
            s[ok] = np.sqrt(r1[ok] / r2[ok])
            scale_out(model, p.first, 1.0 / s)
            scale_in(model, p.second, s)
            largest = max(largest, float(np.max(np.abs(np.log(s)))) if s.size else 0.0)
        report.sweeps = sweep + 1
        if largest < 1e-3:
            break
    if absorb_high_bias and feeds:
        _absorb_high_biases(model, pairs, feeds, report)
    return report


def _unpadded(layer: Layer) -> bool:
    if layer.op != "Conv":
        return True
    a = attrs(layer.node)
    return a.get("auto_pad", "NOTSET") in ("NOTSET", "VALID") and not any(a.get("pads", []) or [])


def _absorb_high_biases(model: ir.Model, pairs: list[Pair], feeds: list[Feeds], report: EqualizationReport) -> None:
    todo = [p for p in pairs if p.act is not None and p.act.op_type == "Relu" and p.first.bias is not None and _unpadded(p.second)]
    if not todo:
        return
    mins: dict[str, np.ndarray] = {}
    for values in tensors_on(to_proto(model), feeds, [p.first.out.name for p in todo]):
        for p in todo:
            z = values[p.first.out.name]
            axis = 1 if p.first.op == "Conv" else z.ndim - 1
            m = np.moveaxis(z, axis, 0).reshape(z.shape[axis], -1).min(axis=1)
            name = p.first.out.name
            mins[name] = m if name not in mins else np.minimum(mins[name], m)
    for p in todo:
        h = np.maximum(mins[p.first.out.name].astype(np.float64), 0.0)
        if not np.any(h > 0):
            continue
        node, idx = p.first.bias
        b1 = private_initializer(model.graph, node, idx)
        set_const(b1, const(b1).astype(np.float64) - h)
        second = ensure_bias(model, p.second)
        if second.bias is None:
            set_const(b1, const(b1).astype(np.float64) + h)  # nowhere to move it: undo
            continue
        node2, idx2 = second.bias
        b2 = private_initializer(model.graph, node2, idx2)
        set_const(b2, const(b2).astype(np.float64) + _weight_times(second, h))
        report.absorbed[p.first.name] = float(np.mean(h))


def _weight_times(layer: Layer, h: np.ndarray) -> np.ndarray:
    """W2 applied to a constant input h (per input channel): sum over inputs and kernel taps."""
    w = const(layer.weight).astype(np.float64)
    if layer.op == "Conv":
        wg = _grouped(layer, w)  # [g, o, i, k...]
        g, o, cin_g = wg.shape[:3]
        hg = h.reshape(g, 1, cin_g, *([1] * (wg.ndim - 3)))
        return (wg * hg).sum(axis=tuple(range(2, wg.ndim))).reshape(g * o)
    if layer.op == "Gemm" and attrs(layer.node).get("transB", 0):
        return w @ h
    return h @ w
