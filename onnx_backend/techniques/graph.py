"""What every technique needs: the prepared graph, its constants, and its tensors on real data.

Techniques edit an `onnx_ir` model of the optimized float graph (BatchNorm folded, names fixed)
and read tensors by running it in onnxruntime with those tensors exposed as extra outputs, the
way the Calibrator does. Nothing here changes the float function.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from ..calibrator import get_pure_input_names, sample_feeds
from ..errors import CalibrationError
from ..quantizer import _prepare_ir
from ..sessions import open_session

Feeds = dict[str, np.ndarray]


def prepare(model: onnx.ModelProto | str | bytes, opset: int | None = None, *, optimize: bool = True) -> ir.Model:
    """The float graph every technique works on (the quantizer's own preparation)."""
    return _prepare_ir(model, opset, optimize=optimize)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def copy_model(model: ir.Model) -> ir.Model:
    return ir.serde.deserialize_model(ir.serde.serialize_model(model))


def as_feeds(model: onnx.ModelProto, samples: Iterable) -> list[Feeds]:
    """Calibration samples (lists of inputs in input order, single arrays, or {name: array}) as
    feed dicts. Techniques pass over the data several times, so the list is materialized."""
    names = get_pure_input_names(model)
    out = []
    for i, s in enumerate(samples):
        feeds = sample_feeds(s, names, i)
        out.append({k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in feeds.items() if k in names})
    if not out:
        raise CalibrationError("the calibration dataset is empty")
    return out


def session(model: onnx.ModelProto, expose: Sequence[str] = (), types: Mapping[str, int] | None = None) -> ort.InferenceSession:
    """An onnxruntime session whose outputs are the model's outputs plus `expose` (float tensors
    unless `types` gives another ONNX element type): Q/DQ kept as written, one thread."""
    return open_session(model, expose=expose, types=types, threads=1)


def tensors_on(model: onnx.ModelProto, feeds: Sequence[Feeds], names: Sequence[str], types: Mapping[str, int] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """{name: value} of the named tensors, sample by sample."""
    names = list(dict.fromkeys(names))
    sess = session(model, names, types)
    inputs = {i.name for i in sess.get_inputs()}
    for i, f in enumerate(feeds):
        try:
            values = sess.run(names, {k: v for k, v in f.items() if k in inputs})
        except Exception as exc:
            raise CalibrationError(f"onnxruntime failed on calibration sample {i}: {exc}") from None
        yield dict(zip(names, values))


def outputs_on(model: onnx.ModelProto, feeds: Sequence[Feeds]) -> list[list[np.ndarray]]:
    sess = session(model)
    inputs = {i.name for i in sess.get_inputs()}
    return [sess.run(None, {k: v for k, v in f.items() if k in inputs}) for f in feeds]


# ---- constants ---------------------------------------------------------------------------------


def const(v: ir.Value | None) -> np.ndarray | None:
    if v is None:
        return None
    t = ir.convenience.get_const_tensor(v)
    return None if t is None else t.numpy()


def set_const(v: ir.Value, array: np.ndarray) -> None:
    """Replace an initializer's value (same name, dtype kept)."""
    if not v.is_initializer():
        raise ValueError(f"{v.name} is not an initializer")
    old = v.const_value.numpy()
    array = np.asarray(array, dtype=old.dtype)
    v.const_value = ir.tensor(array, name=v.name)
    v.shape = ir.Shape(array.shape)


def new_initializer(graph: ir.Graph, array: np.ndarray, base: str) -> ir.Value:
    names = set(graph.initializers) | {o.name for n in graph for o in n.outputs if o is not None} | {i.name for i in graph.inputs}
    name, k = base, 1
    while name in names:
        name, k = f"{base}_{k}", k + 1
    value = ir.Value(name=name, const_value=ir.tensor(np.asarray(array), name=name))
    value.shape = ir.Shape(np.asarray(array).shape)
    value.type = ir.TensorType(ir.DataType.from_numpy(np.asarray(array).dtype))
    graph.register_initializer(value)
    return value


def private_initializer(graph: ir.Graph, node: ir.Node, index: int) -> ir.Value:
    """The constant at node.inputs[index], copied first if anything else reads it, so that
    editing it changes this node only."""
    v = node.inputs[index]
    if v.is_initializer() and len(v.uses()) == 1 and not v.is_graph_input() and not v.is_graph_output():
        return v
    copy = new_initializer(graph, const(v).copy(), f"{v.name}_{node.name}")
    node.replace_input_with(index, copy)
    return copy


def sole_use(v: ir.Value | None) -> ir.Node | None:
    """The only node reading `v`, if there is exactly one and `v` is not a graph output."""
    if v is None or v.is_graph_output():
        return None
    uses = list(v.uses())
    if len(uses) != 1:
        return None
    return uses[0].node


def attrs(node: ir.Node) -> dict:
    return {k: a.value for k, a in node.attributes.items()}


# ---- weighted layers ---------------------------------------------------------------------------


class Layer:
    """A node with a constant weight: Conv, ConvTranspose, Gemm or MatMul (B constant).

    `bias` is where its per-output-channel bias lives: Conv/Gemm input 2, or the Add of a constant
    vector right after a MatMul (a Linear layer), or None. `out` is the tensor after the bias.
    """

    def __init__(self, node: ir.Node, bias: tuple[ir.Node, int] | None, out: ir.Value):
        self.node = node
        self.bias = bias
        self.out = out

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def weight(self) -> ir.Value:
        return self.node.inputs[1]

    @property
    def op(self) -> str:
        return self.node.op_type

    def out_axis(self) -> int:
        """Output-channel axis of the weight."""
        a = attrs(self.node)
        if self.op == "Conv":
            return 0
        if self.op == "Gemm":
            return 0 if a.get("transB", 0) else 1
        if self.op == "MatMul":
            return const(self.weight).ndim - 1
        raise ValueError(self.op)

    def n_out(self) -> int:
        w = const(self.weight)
        if self.op == "ConvTranspose":
            return w.shape[1] * attrs(self.node).get("group", 1)
        return w.shape[self.out_axis()]

    def bias_array(self) -> np.ndarray | None:
        if self.bias is None:
            return None
        node, idx = self.bias
        return const(node.inputs[idx])


def weighted_layers(model: ir.Model, ops: Iterable[str] = ("Conv", "Gemm", "MatMul")) -> list[Layer]:
    """The layers with a constant float weight, in graph order."""
    ops = set(ops)
    layers = []
    for node in model.graph:
        if node.op_type not in ops or len(node.inputs) < 2:
            continue
        w = const(node.inputs[1])
        if w is None or w.dtype != np.float32 or w.ndim < 2 or const(node.inputs[0]) is not None:
            continue
        a = attrs(node)
        if node.op_type == "Gemm" and (a.get("transA", 0) or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            continue
        if node.op_type == "MatMul" and w.ndim != 2:
            continue
        bias, out = None, node.outputs[0]
        if node.op_type in ("Conv", "ConvTranspose", "Gemm"):
            b = const(node.inputs[2]) if len(node.inputs) > 2 else None
            if b is not None and b.ndim == 1:
                bias = (node, 2)
        else:
            add = sole_use(node.outputs[0])
            if add is not None and add.op_type == "Add":
                idx = 1 if add.inputs[0] is node.outputs[0] else 0
                b = const(add.inputs[idx])
                if b is not None and b.ndim == 1 and b.shape[0] == w.shape[-1] and b.dtype == np.float32:
                    bias, out = (add, idx), add.outputs[0]
        layers.append(Layer(node, bias, out))
    return layers


def ensure_bias(model: ir.Model, layer: Layer) -> Layer:
    """Give a Conv/Gemm without a bias a zero bias input (the float function is unchanged)."""
    if layer.bias is not None or layer.op not in ("Conv", "Gemm"):
        return layer
    node = layer.node
    zero = new_initializer(model.graph, np.zeros(layer.n_out(), np.float32), f"{node.name}_bias")
    if len(node.inputs) < 3:
        node.resize_inputs(3)
    node.replace_input_with(2, zero)
    layer.bias = (node, 2)
    return layer


def channel_means(x: np.ndarray, axis: int) -> tuple[np.ndarray, int]:
    """Sum over every axis but `axis`, and the count per channel."""
    axis = axis % x.ndim
    red = tuple(i for i in range(x.ndim) if i != axis)
    return x.sum(axis=red, dtype=np.float64), int(x.size // x.shape[axis])


def output_channel_axis(layer: Layer, out: np.ndarray) -> int:
    """Channel axis of a layer's output tensor: 1 for convolutions, the last one for matmuls."""
    return 1 if layer.op in ("Conv", "ConvTranspose") else out.ndim - 1
