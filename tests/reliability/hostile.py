"""Hostile inputs: a small valid float model, and the broken variants users (or attackers) feed.

Shared by test_hostile_inputs.py (one named case each) and the fuzzer (random mutations).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_SHAPE = [1, 3, 8, 8]


def base_model(opset: int = 17) -> onnx.ModelProto:
    """x -> Conv -> Relu -> Conv -> Add(skip) -> GlobalAveragePool -> Flatten -> Gemm -> y."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32) * 0.3, "w1"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32) * 0.1, "b1"),
        numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32) * 0.3, "w2"),
        numpy_helper.from_array(rng.normal(size=4).astype(np.float32) * 0.1, "b2"),
        numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32) * 0.5, "wf"),
        numpy_helper.from_array(rng.normal(size=5).astype(np.float32) * 0.1, "bf"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("Add", ["c2", "r1"], ["s"], name="add"),
        helper.make_node("GlobalAveragePool", ["s"], ["p"], name="pool"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "base",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, INPUT_SHAPE)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="torchq-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def attention_model(opset: int = 17) -> onnx.ModelProto:
    """x[1,4,8] -> MatMul+Add (a Linear) -> Reshape/Transpose -> MatMul -> Softmax -> MatMul ->
    Concat with a MaxPool branch -> Sigmoid * ... -> y: the same-scale, fixed-scale and bias rules."""
    rng = np.random.default_rng(1)
    f = lambda *s: rng.normal(size=s).astype(np.float32) * 0.5  # noqa: E731
    inits = [
        numpy_helper.from_array(f(8, 8), "wq"),
        numpy_helper.from_array(f(8), "bq"),
        numpy_helper.from_array(np.array([1, 4, 2, 4], np.int64), "shape4"),
        numpy_helper.from_array(np.array([1, 4, 8], np.int64), "shape3"),
        numpy_helper.from_array(f(16, 8), "wo"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q0"], name="q_mm"),
        helper.make_node("Add", ["q0", "bq"], ["q"], name="q_bias"),
        helper.make_node("Reshape", ["q", "shape4"], ["q4"], name="split_heads"),
        helper.make_node("Transpose", ["q4"], ["qt"], name="heads_first", perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["q4"], ["kt"], name="keys", perm=[0, 2, 3, 1]),
        helper.make_node("MatMul", ["qt", "kt"], ["scores"], name="scores"),
        helper.make_node("Softmax", ["scores"], ["att"], name="softmax", axis=-1),
        helper.make_node("MatMul", ["att", "qt"], ["ctx"], name="context"),
        helper.make_node("Transpose", ["ctx"], ["ctx_t"], name="heads_last", perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["ctx_t", "shape3"], ["ctx3"], name="merge_heads"),
        helper.make_node("MaxPool", ["x"], ["pooled"], name="pool", kernel_shape=[3], pads=[1, 1]),
        helper.make_node("Concat", ["ctx3", "pooled"], ["cat"], name="concat", axis=2),
        helper.make_node("Sigmoid", ["cat"], ["gate"], name="gate"),
        helper.make_node("Mul", ["cat", "gate"], ["gated"], name="swish"),
        helper.make_node("MatMul", ["gated", "wo"], ["y"], name="out_proj"),
    ]
    graph = helper.make_graph(
        nodes,
        "attention",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="torchq-tests")
    onnx.checker.check_model(model, full_check=True)
    return model


def calibration_arrays(n: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, *INPUT_SHAPE[1:])).astype(np.float32)


def write_inputs(folder: Path, model: onnx.ModelProto | bytes) -> dict[str, Path]:
    """The model file plus the calibration data and ranges file the CLI cases use."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"model": folder / "model.onnx", "data": folder / "cal.npz", "ranges": folder / "ranges.json"}
    paths["model"].write_bytes(model if isinstance(model, bytes) else model.SerializeToString())
    np.savez(paths["data"], x=calibration_arrays())
    paths["ranges"].write_text(json.dumps(base_ranges_file()))
    return paths


def base_ranges() -> dict[str, list[float]]:
    return {"x": [-3.0, 3.0], "c1": [-2.0, 2.0], "r1": [0.0, 2.0], "c2": [-2.0, 2.0], "s": [-2.0, 3.0], "p": [-1.0, 1.0], "f": [-1.0, 1.0], "y": [-2.0, 2.0]}


def base_ranges_file(ranges: dict | None = None) -> dict:
    return {"format": "torchq-ranges", "version": 1, "method": "min_max_asym", "percentile": None, "ranges": base_ranges() if ranges is None else ranges}


def commands(paths: dict[str, Path], out: Path) -> dict[str, list[str]]:
    """The CLI invocations every hostile model is fed to."""
    return {
        "quantize-onnx --ranges": ["quantize-onnx", str(paths["model"]), "--ranges", str(paths["ranges"]), "--target", "all", "-o", str(out)],
        "quantize-onnx --data": ["quantize-onnx", str(paths["model"]), "--data", str(paths["data"]), "--method", "min_max_asym", "-o", str(out)],
        "calibrate": ["calibrate", str(paths["model"]), "--data", str(paths["data"]), "--method", "mse_sym", "-o", str(out.with_suffix(".json"))],
        "validate": ["validate", str(paths["model"])],
    }


# ---- named hostile models ----------------------------------------------------------------------


def _edit(fn: Callable[[onnx.ModelProto], None]) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        m = base_model()
        fn(m)
        return m

    build.__doc__, build.__name__ = fn.__doc__, fn.__name__
    return build


def _node(m: onnx.ModelProto, name: str) -> onnx.NodeProto:
    return next(n for n in m.graph.node if n.name == name)


def _init(m: onnx.ModelProto, name: str) -> onnx.TensorProto:
    return next(t for t in m.graph.initializer if t.name == name)


@_edit
def cyclic(m):
    """conv1 reads the output of add: a cycle."""
    _node(m, "conv1").input[0] = "s"


@_edit
def dangling_input(m):
    """conv2 reads a tensor nothing produces."""
    _node(m, "conv2").input[0] = "nowhere"


@_edit
def missing_initializer(m):
    """The weights of conv2 are referenced but not stored."""
    m.graph.initializer.remove(_init(m, "w2"))


@_edit
def int_weights(m):
    """conv1's weights are int32 (Conv does not take them)."""
    t = _init(m, "w1")
    t.CopyFrom(numpy_helper.from_array(np.ones((4, 3, 3, 3), np.int32), "w1"))


@_edit
def weight_dtype_lies(m):
    """The weight initializer says DOUBLE but holds float32 bytes."""
    _init(m, "w1").data_type = TensorProto.DOUBLE


@_edit
def weight_bytes_short(m):
    """The weight's raw data is shorter than its dims say."""
    t = _init(m, "w2")
    t.raw_data = t.raw_data[:10]


@_edit
def string_input(m):
    """The graph input is declared as a string tensor."""
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.STRING


@_edit
def double_input(m):
    """The graph input is float64 while the model computes in float32."""
    m.graph.input[0].type.tensor_type.elem_type = TensorProto.DOUBLE


@_edit
def enormous_input_dim(m):
    """The input declares a dimension of 2**50."""
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2**50


@_edit
def enormous_initializer_dims(m):
    """An initializer claims 2**40 x 2**40 elements and holds 16 bytes."""
    t = _init(m, "wf")
    del t.dims[:]
    t.dims.extend([2**40, 2**40])


@_edit
def huge_constant_of_shape(m):
    """A ConstantOfShape that would allocate 2**45 floats, feeding the Add."""
    shape = numpy_helper.from_array(np.array([2**15, 2**15, 2**15], np.int64), "big_shape")
    m.graph.initializer.append(shape)
    m.graph.node.insert(0, helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="big"))
    _node(m, "add").input[1] = "big"


@_edit
def unknown_op(m):
    """An op type no opset defines."""
    _node(m, "relu1").op_type = "Frobnicate"


@_edit
def wrong_op_type(m):
    """Relu replaced by Softmax with a bad axis attribute."""
    n = _node(m, "relu1")
    n.op_type = "Softmax"
    n.attribute.append(helper.make_attribute("axis", 17))


@_edit
def bad_attribute(m):
    """conv1 has strides of 0 and a string group."""
    n = _node(m, "conv1")
    n.attribute.append(helper.make_attribute("strides", [0, 0]))
    n.attribute.append(helper.make_attribute("group", "four"))


@_edit
def wrong_kernel_shape(m):
    """conv2's weight has 5 input channels but its input has 4."""
    _init(m, "w2").CopyFrom(numpy_helper.from_array(np.ones((4, 5, 3, 3), np.float32), "w2"))


@_edit
def duplicate_output_name(m):
    """Two nodes write the same tensor."""
    _node(m, "conv2").output[0] = "r1"


@_edit
def no_opset(m):
    """No opset import at all."""
    del m.opset_import[:]


@_edit
def future_opset(m):
    """An opset from the future."""
    m.opset_import[0].version = 999


@_edit
def ancient_opset(m):
    """Opset 1: too old to upgrade."""
    m.opset_import[0].version = 1


@_edit
def unsorted_nodes(m):
    """Nodes not in topological order (valid ONNX requires it)."""
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))


@_edit
def no_outputs(m):
    """A graph without outputs."""
    del m.graph.output[:]


@_edit
def empty_graph(m):
    """No nodes at all."""
    del m.graph.node[:]


@_edit
def nested_subgraph_bomb(m):
    """An If whose then-branches nest 30 deep."""
    def leaf(i):
        return helper.make_graph([helper.make_node("Identity", ["r1"], [f"e{i}"])], f"e{i}", [], [helper.make_tensor_value_info(f"e{i}", TensorProto.FLOAT, None)])

    inner = leaf(0)
    for i in range(1, 30):  # protobuf itself refuses more than 100 levels of nesting
        cond = numpy_helper.from_array(np.array(True), f"c{i}")
        node = helper.make_node("If", [f"c{i}"], [f"o{i}"], then_branch=inner, else_branch=leaf(i))
        inner = helper.make_graph([node], f"g{i}", [], [helper.make_tensor_value_info(f"o{i}", TensorProto.FLOAT, None)], [cond])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "c_top"))
    m.graph.node.insert(2, helper.make_node("If", ["c_top"], ["deep"], then_branch=inner, else_branch=leaf(30), name="deep_if"))
    m.graph.output.append(helper.make_tensor_value_info("deep", TensorProto.FLOAT, None))


HOSTILE_MODELS: dict[str, Callable[[], onnx.ModelProto]] = {
    f.__name__: f
    for f in (
        cyclic,
        dangling_input,
        missing_initializer,
        int_weights,
        weight_dtype_lies,
        weight_bytes_short,
        string_input,
        double_input,
        enormous_input_dim,
        enormous_initializer_dims,
        huge_constant_of_shape,
        unknown_op,
        wrong_op_type,
        bad_attribute,
        wrong_kernel_shape,
        duplicate_output_name,
        no_opset,
        future_opset,
        ancient_opset,
        unsorted_nodes,
        no_outputs,
        empty_graph,
        nested_subgraph_bomb,
    )
}


def hostile_bytes(good: bytes) -> dict[str, bytes]:
    """Broken files at the byte level."""
    return {
        "empty": b"",
        "truncated_half": good[: len(good) // 2],
        "truncated_one_byte": good[:-1],
        "text": b"this is not an onnx model\n",
        "zeros": bytes(4096),
        "random": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "json": b'{"graph": {}}',
    }
