"""Bind the planner's decisions on the exported graph back onto the PyTorch model's tensors.

The calibrated model is exported with markers exactly as `torchq.export` does; the backend's
planner (onnx_backend.planner) decides every quantization point on the optimized graph; this
module carries each decision to the PyTorch side through the observer keys the markers name:

* an activation the plan quantizes -> a fake-quantizer on every key bound to that tensor; tensors
  whose parameters the planner shares (Concat inputs, same-scale ops) share one quantizer, and
  fixed-output ops (Softmax, Sigmoid, Tanh) get a frozen one;
* an int8 weight (per channel, [-127, 127]) -> the Parameter the PyTorch op reads, found through a
  probe forward that records which op reads which tensor; a BatchNorm the optimizer folded into
  the weight is folded the same way on the PyTorch side (its statistics frozen); the int32 bias
  follows at input scale x weight scale;
* a requantized edge (a Concat input that cannot take the shared scale) -> a fake-quantizer on
  that op input;
* a constant quantized per tensor from its values (an embedding table) -> the tensor the op reads,
  which is then frozen so that the exported parameters stay the ones trained with.

Nothing of the spec is decided here: every number comes from the plan. What cannot be bound
(a tensor the exporter creates inside one PyTorch op) is listed in `Binding.unbound`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
import torch

from onnx_backend import spec
from onnx_backend.planner import QuantPlan, clip_bounds
from onnx_backend.qmath import QuantParams

from ..capture import op_name

WEIGHT_OPS = {"conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm", "bmm", "addmm"}
BIAS_POSITION = 2  # F.conv*d / F.conv_transpose*d / F.linear: (input, weight, bias, ...)


@dataclass
class ActivationQuant:
    """One activation grid: scale and zero point from the plan."""

    scale: float
    zero_point: int
    learnable: bool
    hi_cap: float | None = None  # an absorbed Clip(0, c): the range may not exceed c
    tensors: list[str] = field(default_factory=list)


@dataclass
class WeightQuant:
    """The int8 per-channel weight (and int32 bias) of one PyTorch op."""

    key: str
    weight: str  # parameter name in the model
    position: int | str  # where the op reads it
    axis: int | None  # per-channel axis in the PyTorch layout
    scale: np.ndarray  # the plan's scales, one per channel
    input_activation: int | None  # index of the input's ActivationQuant (bias scale)
    has_bias: bool  # the op reads a bias argument (or a folded BatchNorm supplies one)
    fold: str | None = None  # the BatchNorm module folded into this weight
    node: str = ""  # the ONNX node
    out_axis: int = 0  # the weight's output-channel axis in PyTorch's layout (the fold scales it)


@dataclass
class ConstantInput:
    key: str
    position: int | str
    activation: ActivationQuant
    frozen: str | None  # the parameter that must stay as calibrated


@dataclass
class Binding:
    activations: list[ActivationQuant] = field(default_factory=list)
    activation_of_key: dict[str, int] = field(default_factory=dict)
    weights: dict[str, WeightQuant] = field(default_factory=dict)  # by op key
    constants: dict[str, list[ConstantInput]] = field(default_factory=dict)
    requantize: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # key -> [(input, activation)]
    unbound: dict[str, str] = field(default_factory=dict)  # what stays unsimulated, and why

    def summary(self) -> dict:
        return {
            "activation_quantizers": len(self.activations),
            "learnable_activation_scales": sum(a.learnable for a in self.activations),
            "bound_keys": len(self.activation_of_key),
            "weights": len(self.weights),
            "folded_batchnorms": sum(w.fold is not None for w in self.weights.values()),
            "requantized_inputs": sum(len(v) for v in self.requantize.values()),
            "unbound": len(self.unbound),
        }


# ---- the probe forward -----------------------------------------------------------------------


@dataclass
class Call:
    op: str
    inputs: dict  # position -> ("param"|"buffer", name) | ("tensor", producer key or None)
    tensors: dict  # position -> the tensor (probe only)


class Probe:
    """Records, in one forward, which op (by key) reads which parameter or produced tensor."""

    def __init__(self, model: torch.nn.Module):
        self.names = {id(p): ("param", n) for n, p in model.named_parameters()}
        self.names.update({id(b): ("buffer", n) for n, b in model.named_buffers()})
        self.produced: dict[int, str] = {}
        self.keep: list[torch.Tensor] = []  # ids stay unique while the probe runs
        self.calls: dict[str, Call] = {}

    def before(self, session, func, args, kwargs):
        inputs, tensors = {}, {}
        for pos, value in [*enumerate(args), *kwargs.items()]:
            if isinstance(value, torch.Tensor):
                inputs[pos] = self.names.get(id(value)) or ("tensor", self.produced.get(id(value)))
                tensors[pos] = value
        self.calls[session.peek_key(func)] = Call(op_name(func), inputs, tensors)
        return args, kwargs

    def after(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        self.produced[id(tensor)] = key
        self.keep.append(tensor)
        return tensor


# ---- binding ---------------------------------------------------------------------------------


def _const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


class _Binder:
    def __init__(self, model: torch.nn.Module, graph: ir.Graph, plan: QuantPlan, bindings: dict[str, list[str]], probe: Probe):
        self.model, self.graph, self.plan, self.bindings, self.probe = model, graph, plan, bindings, probe
        self.nodes = {n.name: n for n in graph}
        self.values = {v.name: v for n in graph for v in n.outputs if v is not None} | {v.name: v for v in graph.inputs}
        self.out = Binding()
        self.index_of: dict[int, int] = {}  # id(QuantParams) -> activation index

    def run(self) -> Binding:
        self._activations()
        self._requantized_edges()
        for c in self.plan.constants:
            if c.kind == "weight":
                self._weight(c)
            elif c.kind == "constant":
                self._constant(c)
        return self.out

    # activations

    def _activation_index(self, p: QuantParams) -> int:
        i = self.index_of.get(id(p))
        if i is None:
            i = self.index_of[id(p)] = len(self.out.activations)
            self.out.activations.append(ActivationQuant(float(p.scale), int(p.zero_point), learnable=True))
        return i

    def _activations(self) -> None:
        bound_params: set[int] = set()
        for tensor, p in self.plan.activations.items():
            i = self._activation_index(p)
            a = self.out.activations[i]
            a.tensors.append(tensor)
            producer = self.values[tensor].producer() if tensor in self.values else None
            if producer is not None:
                rule = spec.rule_for(producer.op_type)
                if rule.output is spec.OutputScale.FIXED or (rule.output is spec.OutputScale.SAME_AS_INPUT and producer.inputs and _const(producer.inputs[0]) is not None):
                    a.learnable = False  # a fixed grid, or a constant's (frozen with it)
                if producer.name in self.plan.absorbed:
                    bounds = clip_bounds(producer)
                    if bounds is not None and math.isfinite(bounds[1]):
                        a.hi_cap = bounds[1]
            for key in self.bindings.get(tensor, []):
                self.out.activation_of_key[key] = i
                bound_params.add(id(p))
        for tensor, p in self.plan.activations.items():
            if id(p) not in bound_params and not self.bindings.get(tensor):
                self.out.unbound[tensor] = "quantized in the exported model, but computed inside one PyTorch op: not rounded in the fake-quantized forward"

    def _requantized_edges(self) -> None:
        for node_name, index, p in self.plan.requantize:
            node = self.nodes[node_name]
            keys = self.bindings.get(node.outputs[0].name, [])
            call = next((k for k in keys if k in self.probe.calls), None)
            if call is None:
                self.out.unbound[f"{node_name}[{index}]"] = "a requantized input whose PyTorch op was not found"
                continue
            self.out.requantize.setdefault(call, []).append((index, self._activation_index(p)))

    # weights and constants

    def _keys_of_node(self, node: ir.Node) -> list[str]:
        """Keys bound to the node's output, or to the output of the bias Add / absorbed
        activation that is its only reader (a Linear exported as MatMul + Add)."""
        out = node.outputs[0]
        keys = list(self.bindings.get(out.name, []))
        uses = list(out.uses())
        if len(uses) == 1 and uses[0].node.op_type == "Add":
            keys += self.bindings.get(uses[0].node.outputs[0].name, [])
        return [k for k in keys if k in self.probe.calls]

    def _weight(self, c) -> None:
        node = self.nodes[c.node]
        w_onnx = _const(node.inputs[c.input_index])
        for key in self._keys_of_node(node):
            found = self._weight_call(key, w_onnx)
            if found is not None:
                call_key, name, transposed, fold = found
                axis = c.params.axis if c.params.axis is None or not transposed else 1 - c.params.axis
                bias = self.probe.calls[call_key].inputs.get(BIAS_POSITION) or self.probe.calls[call_key].inputs.get("bias")
                x = node.inputs[0]
                p_in = self.plan.activations.get(x.name) if x is not None else None
                if bias is not None and bias[0] != "param":
                    self.out.unbound[c.node + ".bias"] = "its bias is not a parameter: int32 rounding not simulated"
                    bias = None
                self.out.weights[call_key] = WeightQuant(
                    call_key, name[0], name[1], axis, np.asarray(c.params.scale, np.float32).reshape(-1),
                    None if p_in is None else self._activation_index(p_in), bias is not None or fold is not None, fold, c.node, output_axis(self.probe.calls[call_key].op),
                )
                return
        self.out.unbound[node.inputs[c.input_index].name] = f"int8 weight of {c.node}: no PyTorch parameter found with its values (or its BatchNorm-folded values)"

    @torch.no_grad()
    def _weight_call(self, key: str, w_onnx: np.ndarray):
        """(op key, parameter name, per-channel axis in PyTorch layout, folded BatchNorm) or None."""
        call = self.probe.calls[key]
        fold = None
        if call.op == "batch_norm":
            module_path = key.rsplit(":", 1)[0].partition("@")[0]
            module = self.model.get_submodule(module_path) if module_path and not module_path.startswith("<") else None
            source = call.inputs.get(0)
            if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm) or source is None or source[0] != "tensor" or source[1] not in self.probe.calls:
                return None
            fold, key, call = module_path, source[1], self.probe.calls[source[1]]
        if call.op not in WEIGHT_OPS:
            return None
        for pos, (kind, name) in call.inputs.items():
            if kind != "param" or call.tensors[pos].numel() != w_onnx.size:
                continue
            w = call.tensors[pos].detach()
            if fold is not None:
                factor = _bn_factor(self.model.get_submodule(fold))
                if factor.numel() != w.shape[output_axis(call.op)]:
                    continue  # grouped ConvTranspose: the fold is not per weight slice
                w = w * _bn_factor(self.model.get_submodule(fold)).reshape(channel_axis_shape(w.dim(), output_axis(call.op)))
            w = w.cpu().numpy()
            if w.shape == w_onnx.shape and _close(w, w_onnx):
                return key, (name, pos), False, fold
            if w.ndim == 2 and w.T.shape == w_onnx.shape and _close(w.T, w_onnx):
                return key, (name, pos), True, fold  # F.linear's (out, in) is ONNX MatMul's B transposed
        return None

    def _constant(self, c) -> None:
        node = self.nodes[c.node]
        arr = _const(node.inputs[c.input_index])
        act = ActivationQuant(float(c.params.scale), int(c.params.zero_point), learnable=False)
        for key in self._keys_of_node(node):
            call = self.probe.calls[key]
            for pos, (kind, name) in call.inputs.items():
                if kind == "tensor":
                    continue
                t = call.tensors[pos].detach().cpu().numpy()
                if t.shape == arr.shape and np.array_equal(t, arr):
                    self.out.constants.setdefault(key, []).append(ConstantInput(key, pos, act, name if kind == "param" else None))
                    return
        from onnx_backend.qmath import fake_quantize

        if not np.allclose(fake_quantize(arr, c.params), arr, rtol=1e-6, atol=0):
            self.out.unbound[node.inputs[c.input_index].name] = f"constant input of {c.node}, quantized per tensor, not found among the PyTorch op's inputs: not rounded in the fake-quantized forward"


def output_axis(op: str) -> int:
    """The output-channel axis of the weight in PyTorch's layout (a folded BatchNorm scales it)."""
    return 1 if "transpose" in op or op in ("matmul", "mm", "bmm", "addmm") else 0


def channel_axis_shape(ndim: int, axis: int) -> tuple[int, ...]:
    shape = [1] * ndim
    shape[axis] = -1
    return tuple(shape)


def _bn_factor(bn: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """gamma / sqrt(var + eps): the per-channel factor a folded BatchNorm multiplies weights by."""
    inv = torch.rsqrt(bn.running_var + bn.eps)
    return inv * bn.weight if bn.weight is not None else inv


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    scale = float(np.max(np.abs(b))) if b.size else 0.0
    return bool(np.allclose(a, b, rtol=1e-4, atol=1e-6 * max(scale, 1e-30)))


def bind(model, graph: ir.Graph, plan: QuantPlan, bindings: dict[str, list[str]], probe: Probe) -> Binding:
    return _Binder(model, graph, plan, bindings, probe).run()
