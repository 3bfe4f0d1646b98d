"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020).

Round-to-nearest minimizes each weight's own error, not the layer's output error. AdaRound learns,
layer by layer, whether each weight rounds down or up: with s the weight's quantization scale (the
planner's, unchanged) and V a free variable per weight,

    W~ = s * clip(floor(W / s) + h(V), -127, 127),   h(V) = clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)

it minimizes  |f(W~ x_q + b) - f(W x + b)|^2 + lambda * sum(1 - |2 h(V) - 1|^beta)  by Adam, where
x_q is the layer's input in the quantized model (all layers before it already rounded), x the
float model's, f the activation absorbed into the layer's output (Relu / Clip) or the identity;
beta anneals from 20 to 2 after a warm-up, pushing h to 0 or 1. Hyperparameters are the paper's
(zeta 1.1, gamma -0.1, lambda 0.01, 20 % warm-up, learning rate 1e-3).

Guarantee: the learned rounding is kept only if its reconstruction error on the collected data is
no larger than round-to-nearest's; otherwise the layer keeps nearest rounding. So AdaRound never
does worse than nearest rounding on its own objective.

The data for one layer (its quantized inputs and float outputs over the calibration samples) is
capped at `max_bytes`; samples beyond the cap are not used for that layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from onnx_backend.techniques.graph import Layer, attrs, const, tensors_on, weighted_layers
from onnx_backend.techniques.pipeline import Prepared

ZETA, GAMMA = 1.1, -0.1
REG = 0.01
WARMUP = 0.2
BETA = (20.0, 2.0)
LR = 1e-3
BATCH = 32
# Each step of a Conv sees a random WINDOW x WINDOW patch of the output of each of its BATCH
# samples, not the whole map: the loss is a sum over output positions, and whole 112 x 112 maps
# made one step of an early EfficientNet-Lite layer cost 49 times more for the same gradient noise.
WINDOW = 16
MAX_BYTES = 256 << 20
SUPPORTED = ("Conv", "Gemm", "MatMul")


@dataclass
class AdaRoundReport:
    layers: dict[str, dict] = field(default_factory=dict)  # layer -> {"nearest": loss, "adaround": loss, "kept": "adaround"|"nearest", "flipped": share}
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "skipped": self.skipped}


class UnsupportedLayer(ValueError):
    """A layer whose computation LayerOp cannot rebuild in torch: AdaRound skips it and reports why."""


class LayerOp:
    """The layer's float computation in torch, from its ONNX node."""

    def __init__(self, layer: Layer, bias: np.ndarray | None):
        self.layer = layer
        self.op = layer.op
        self.bias = None if bias is None else torch.tensor(np.asarray(bias, np.float32))
        a = attrs(layer.node)
        self.trans_b = bool(a.get("transB", 0))
        if self.op == "Conv":
            if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                raise UnsupportedLayer(f"auto_pad={a['auto_pad']}")
            w = const(layer.weight)
            nd = w.ndim - 2
            if nd not in (1, 2):
                raise UnsupportedLayer(f"{nd}-d convolution")
            pads = list(a.get("pads", [0] * (2 * nd)) or [0] * (2 * nd))
            self.nd = nd
            self.stride = list(a.get("strides", [1] * nd))
            self.dilation = list(a.get("dilations", [1] * nd))
            self.groups = int(a.get("group", 1))
            begin, end = pads[:nd], pads[nd:]
            self.padding = begin if begin == end else [0] * nd
            # F.pad takes (last dim begin, last dim end, previous dim begin, ...)
            self.pre_pad = None if begin == end else [p for d in reversed(range(nd)) for p in (begin[d], end[d])]

    def __call__(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        if self.op == "Conv":
            if self.pre_pad is not None:
                x = F.pad(x, self.pre_pad)
            conv = F.conv1d if self.nd == 1 else F.conv2d
            return conv(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)
        y = x @ (w.t() if self.trans_b else w)
        return y if self.bias is None else y + self.bias

    def padded(self, x: torch.Tensor) -> torch.Tensor:
        """A Conv's input padded as the Conv pads it: windows of it then convolve exactly."""
        if self.op != "Conv":
            return x
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad)
        if any(self.padding):
            x = F.pad(x, [p for d in reversed(range(self.nd)) for p in (self.padding[d], self.padding[d])])
        return x

    def window(self, x_padded: torch.Tensor, w: torch.Tensor, starts: list[int], size: list[int]) -> torch.Tensor:
        """The Conv's output at positions starts[d] .. starts[d] + size[d] of each spatial axis,
        from the input window that covers their receptive field (`x_padded` from `padded`)."""
        index = [slice(None), slice(None)]
        for d in range(self.nd):
            k = w.shape[2 + d]
            begin = starts[d] * self.stride[d]
            index.append(slice(begin, begin + (size[d] - 1) * self.stride[d] + (k - 1) * self.dilation[d] + 1))
        conv = F.conv1d if self.nd == 1 else F.conv2d
        return conv(x_padded[tuple(index)], w, self.bias, self.stride, 0, self.dilation, self.groups)

    def channel_axis(self, y: torch.Tensor) -> int:
        return 1 if self.op == "Conv" else y.dim() - 1


def _activation(prepared_plan, layer: Layer):
    """The clamp absorbed into the layer's output, as a torch function (or None)."""
    out_node = layer.bias[0] if layer.bias is not None and layer.bias[0] is not layer.node else layer.node
    for use in out_node.outputs[0].uses():
        act = use.node
        if act.name in prepared_plan.absorbed:
            if act.op_type == "Relu":
                return torch.relu
            lo = const(act.inputs[1]) if len(act.inputs) > 1 and act.inputs[1] is not None else -np.inf
            hi = const(act.inputs[2]) if len(act.inputs) > 2 and act.inputs[2] is not None else np.inf
            return lambda y, lo=float(lo), hi=float(hi): y.clamp(lo, hi)
    return None


def _collect(model_proto, feeds, tensor: str, max_bytes: int) -> torch.Tensor:
    parts, size = [], 0
    for values in tensors_on(model_proto, feeds, [tensor]):
        x = values[tensor]
        if size + x.nbytes > max_bytes and parts:
            break
        parts.append(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)))
        size += x.nbytes
    return torch.cat(parts, 0)


def _node_io(proto, node_name: str) -> tuple[str, str]:
    for n in proto.graph.node:
        if n.name == node_name:
            return n.input[0], n.output[0]
    raise KeyError(node_name)


def _rows(op: LayerOp, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Linear layers: every token row is a sample."""
    if op.op == "Conv":
        return x, y
    return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])


def _h(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0, 1)


def _recon(op: LayerOp, act, x: torch.Tensor, w: torch.Tensor, target: torch.Tensor, batch: int = 256) -> float:
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, x.shape[0], batch):
            y = op(x[i : i + batch], w)
            if act is not None:
                y = act(y)
            d = (y - target[i : i + batch]).pow(2)
            total += float(d.sum(op.channel_axis(d)).sum())
            n += d.shape[0] * (d[0].numel() // d.shape[op.channel_axis(d)])
    return total / max(n, 1)


def round_layer(op: LayerOp, act, w: np.ndarray, scale: np.ndarray, axis: int, x: torch.Tensor, target: torch.Tensor, iterations: int, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Integer weights for one layer, and what the optimization achieved."""
    shape = [1] * w.ndim
    shape[axis] = -1
    s = torch.tensor(np.asarray(scale, np.float32).reshape(shape))
    wt = torch.tensor(np.asarray(w, np.float32))
    q_near = torch.clamp(torch.round(wt / s), -127, 127)
    w_floor = torch.floor(wt / s)
    rest = (wt / s - w_floor).clamp(1e-4, 1 - 1e-4)
    v = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).clone().requires_grad_(True)
    opt = torch.optim.Adam([v], lr=LR)
    if act is not None:
        target = act(target)
    gen = torch.Generator().manual_seed(seed)
    warm = int(WARMUP * iterations)
    conv = op.op == "Conv"
    x_in = op.padded(x) if conv else x
    out_size = list(target.shape[2:]) if conv else []
    size = [min(WINDOW, n) for n in out_size]
    for it in range(iterations):
        idx = torch.randint(0, x.shape[0], (min(BATCH, x.shape[0]),), generator=gen)
        h = _h(v)
        w_soft = s * torch.clamp(w_floor + h, -127, 127)
        if conv:
            starts = [int(torch.randint(0, n - m + 1, (1,), generator=gen)) for n, m in zip(out_size, size)]
            y = op.window(x_in[idx], w_soft, starts, size)
            want = target[idx][(slice(None), slice(None), *(slice(a, a + m) for a, m in zip(starts, size)))]
        else:
            y, want = op(x_in[idx], w_soft), target[idx]
        if act is not None:
            y = act(y)
        rec = (y - want).pow(2).sum(op.channel_axis(y)).mean()
        if it < warm:
            loss = rec
        else:
            beta = BETA[1] + (BETA[0] - BETA[1]) * (1 - (it - warm) / max(iterations - warm, 1))
            loss = rec + REG * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        q_ada = torch.clamp(w_floor + (_h(v) >= 0.5).float(), -127, 127)
    near = _recon(op, act, x, s * q_near, target)
    ada = _recon(op, act, x, s * q_ada, target)
    kept = "adaround" if ada <= near else "nearest"
    q = q_ada if kept == "adaround" else q_near
    info = {"nearest": near, "adaround": ada, "kept": kept, "flipped": float((q_ada != q_near).float().mean())}
    return q.numpy().astype(np.int8), info


def adaround(prepared: Prepared, *, iterations: int = 1000, max_bytes: int = MAX_BYTES, report: AdaRoundReport | None = None) -> dict[str, np.ndarray]:
    """Learned integer weights {weight initializer name: int8 array} for every quantized layer."""
    report = report if report is not None else AdaRoundReport()
    _, qreport = prepared.quantize()
    plan = qreport.plan
    weight_params = {c.node: c.params for c in plan.constants if c.kind == "weight"}
    float_proto = prepared.float_model()
    overrides: dict[str, np.ndarray] = {}
    for layer in weighted_layers(prepared.model, SUPPORTED):
        params = weight_params.get(layer.name)
        if params is None:
            continue
        name = layer.weight.name
        if name in overrides:
            continue  # a shared weight: rounded once, for its first reader
        try:
            op = LayerOp(layer, None if layer.bias is None else layer.bias_array())
        except UnsupportedLayer as exc:
            report.skipped[layer.name] = str(exc)
            continue
        qproto, _ = prepared.quantize(weight_overrides=overrides)
        q_in, _ = _node_io(qproto, layer.name)
        _, f_out = _node_io(float_proto, layer.bias[0].name if layer.bias is not None else layer.name)
        x = _collect(qproto, prepared.feeds, q_in, max_bytes // 2)
        y = _collect(float_proto, prepared.feeds, f_out, max_bytes // 2)
        n = min(x.shape[0], y.shape[0])
        x, y = _rows(op, x[:n], y[:n])
        axis = params.axis if params.axis is not None else 0
        scale = params.scale if params.scale.ndim else np.full(const(layer.weight).shape[axis], float(params.scale), np.float32)
        q, info = round_layer(op, _activation(plan, layer), const(layer.weight), scale, axis, x, y, iterations, seed=len(overrides))
        overrides[name] = q
        report.layers[layer.name] = info
    return overrides


def rounding(iterations: int = 1000, max_bytes: int = MAX_BYTES, report: AdaRoundReport | None = None):
    """The pipeline's `rounding` callable."""
    return lambda prepared: adaround(prepared, iterations=iterations, max_bytes=max_bytes, report=report)


__all__ = ["AdaRoundReport", "adaround", "round_layer", "rounding"]
