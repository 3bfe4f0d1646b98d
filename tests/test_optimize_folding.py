"""Graph optimization folds every constant affine step the float graph allows into the layers
next to it (BatchNorm, Mul / Add / Sub / Div by constants), whatever form the exporter gave the
weights: initializers, Constant nodes, Identity chains; and it keeps the float function."""

from __future__ import annotations

import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_backend import optimize_model

RNG = np.random.default_rng(0)


def run(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


# ---- the same torch model from several exporters ------------------------------------------------


class Net(torch.nn.Module):
    """BatchNorms after Conv, depthwise Conv and Linear; a learnable scale and shift after a
    Conv (LCNet-style) and before an unpadded Conv."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.conv3 = torch.nn.Conv2d(8, 16, 1)
        self.scale = torch.nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.shift = torch.nn.Parameter(torch.randn(1, 16, 1, 1))
        self.pre_scale = torch.nn.Parameter(torch.rand(1) + 0.5)
        self.pre_shift = torch.nn.Parameter(torch.randn(1))
        self.conv4 = torch.nn.Conv2d(16, 16, 1)
        self.fc = torch.nn.Linear(16, 10)
        self.bn4 = torch.nn.BatchNorm1d(10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x) * self.scale + self.shift)
        x = torch.relu(self.conv4(x * self.pre_scale + self.pre_shift))
        return self.bn4(self.fc(x.mean((2, 3))))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    model = Net().eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2, model.bn4):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def export(model, x, dynamo: bool, opset: int) -> onnx.ModelProto:
    buf = io.BytesIO()
    with torch.no_grad():
        if dynamo:
            torch.onnx.export(model, (x,), buf, dynamo=True, opset_version=opset, input_names=["x"], output_names=["y"])
        else:
            # do_constant_folding=False: the BatchNorms reach the backend as the graph has them
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"], do_constant_folding=False)
    return onnx.load_from_string(buf.getvalue())


def as_constant_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer a Constant node instead (as paddle2onnx writes weights)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in out.graph.initializer]
    del out.graph.initializer[:]
    kept = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(nodes + kept)
    return out


def through_identity_chains(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every initializer read through two Identity nodes."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    chains, renamed = [], {}
    for t in out.graph.initializer:
        mid, end = f"{t.name}__id1", f"{t.name}__id2"
        chains += [helper.make_node("Identity", [t.name], [mid]), helper.make_node("Identity", [mid], [end])]
        renamed[t.name] = end
    for node in out.graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)
    kept = list(out.graph.node)
    del out.graph.node[:]
    out.graph.node.extend(chains + kept)
    return out


def layers(model: onnx.ModelProto) -> list[tuple[str, list[np.ndarray]]]:
    """Each node's op type and its constant inputs, in graph order."""
    consts = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    return [(n.op_type, [consts[i] for i in n.input if i in consts]) for n in model.graph.node]


def test_every_exporter_form_gives_the_same_optimized_graph(net):
    x = torch.randn(2, 3, 12, 12)
    ts17 = export(net, x, dynamo=False, opset=17)
    forms = {
        "dynamo": export(net, x, dynamo=True, opset=18),
        "torchscript opset 17": ts17,
        "torchscript opset 11": export(net, x, dynamo=False, opset=11),
        "Constant-node weights": as_constant_nodes(ts17),
        "Identity-chained weights": through_identity_chains(ts17),
    }
    assert sum(n.op_type == "BatchNormalization" for n in ts17.graph.node) == 3
    assert any(n.op_type == "Constant" for n in forms["Constant-node weights"].graph.node)
    with torch.no_grad():
        expected = net(x).numpy()
    reference = None
    for name, model in forms.items():
        optimized = optimize_model(model)
        got = layers(optimized)
        ops = [op for op, _ in got]
        # every BatchNorm and affine step folded: only the layers, their activations and the pooling
        # (the Squeeze's axes are an initializer: optimizing the optimized graph changes nothing)
        assert ops == ["Conv", "Relu", "Conv", "Relu", "Conv", "Relu", "Conv", "Relu", "GlobalAveragePool", "Squeeze", "Gemm"], (name, ops)
        assert optimize_model(optimized).SerializeToString() == optimized.SerializeToString(), name
        np.testing.assert_allclose(run(optimized, {"x": x.numpy()}), expected, rtol=1e-4, atol=1e-5, err_msg=name)
        if reference is None:
            reference = got
            continue
        for (op, consts), (ref_op, ref_consts) in zip(got, reference):
            if op in ("Conv", "Gemm"):
                assert len(consts) == len(ref_consts) == 2, (name, op)
                for a, b in zip(consts, ref_consts):
                    np.testing.assert_allclose(a.reshape(b.shape) if a.size == b.size else a, b, rtol=1e-5, atol=1e-6, err_msg=f"{name}: {op}")


# ---- one rule at a time, on graphs written by hand ---------------------------------------------


def const(name: str, value: np.ndarray, as_node: bool):
    t = numpy_helper.from_array(np.asarray(value, np.float32), name)
    return (helper.make_node("Constant", [], [name], value=t), None) if as_node else (None, t)


def graph_model(nodes: list, consts: dict[str, np.ndarray], in_shape, out_shape, as_nodes: bool, opset: int = 17) -> onnx.ModelProto:
    made = [const(k, v, as_nodes) for k, v in consts.items()]
    graph = helper.make_graph(
        [n for n, _ in made if n is not None] + nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)],
        initializer=[t for _, t in made if t is not None],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def conv_weights(cout, cin, k, groups=1):
    return RNG.standard_normal((cout, cin // groups, k, k)).astype(np.float32) * 0.3


CASES = {
    # Conv -> Mul (per channel, constant first) -> Add (per channel): both fold
    "conv then scale and shift": (
        [helper.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1]), helper.make_node("Mul", ["s", "c"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])],
        {"w": conv_weights(6, 4, 3), "b": RNG.standard_normal(6), "s": RNG.uniform(0.5, 2, (1, 6, 1, 1)), "t": RNG.standard_normal((6, 1, 1))},
        [1, 4, 8, 8], [1, 6, 8, 8], ["Conv"],
    ),
    # Conv without bias -> Div and Sub by scalars: both fold
    "conv then divide and subtract": (
        [helper.make_node("Conv", ["x", "w"], ["c"]), helper.make_node("Div", ["c", "d"], ["m"]), helper.make_node("Sub", ["m", "t"], ["y"])],
        {"w": conv_weights(6, 4, 3), "d": np.array(6.0), "t": np.array([0.5])},
        [1, 4, 8, 8], [1, 6, 6, 6], ["Conv"],
    ),
    # scale and shift before an unpadded grouped Conv: both fold (a shift into the bias)
    "scale and shift before an unpadded grouped conv": (
        [helper.make_node("Mul", ["x", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["a"]), helper.make_node("Conv", ["a", "w", "b"], ["y"], group=2)],
        {"s": RNG.uniform(0.5, 2, (1, 4, 1, 1)), "t": RNG.standard_normal((1, 4, 1, 1)), "w": conv_weights(6, 4, 3, groups=2), "b": RNG.standard_normal(6)},
        [1, 4, 8, 8], [1, 6, 6, 6], ["Conv"],
    ),
    # x / 6 * s + t before a padded depthwise Conv: the two scales merge into one Mul; the shift
    # cannot move into the bias, so the scale before it stays too
    "scale and shift before a padded depthwise conv": (
        [
            helper.make_node("Div", ["x", "d"], ["q"]),
            helper.make_node("Mul", ["q", "s"], ["m"]),
            helper.make_node("Add", ["m", "t"], ["a"]),
            helper.make_node("Conv", ["a", "w", "b"], ["y"], group=4, pads=[1, 1, 1, 1]),
        ],
        {"d": np.array(6.0), "s": np.array([1.7]), "t": np.array([0.3]), "w": conv_weights(4, 4, 3, groups=4), "b": RNG.standard_normal(4)},
        [1, 4, 8, 8], [1, 4, 8, 8], ["Mul", "Add", "Conv"],
    ),
    # a constant that varies along H is no per-channel step: nothing folds
    "a step varying along height": (
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Mul", ["c", "s"], ["y"])],
        {"w": conv_weights(6, 4, 3), "b": RNG.standard_normal(6), "s": RNG.uniform(0.5, 2, (1, 1, 6, 1))},
        [1, 4, 8, 8], [1, 6, 6, 6], ["Conv", "Mul"],
    ),
    # the Conv's output is read twice: folding would change the other reader
    "a conv output with two readers": (
        [helper.make_node("Conv", ["x", "w", "b"], ["c"]), helper.make_node("Mul", ["c", "s"], ["m"]), helper.make_node("Add", ["m", "c"], ["y"])],
        {"w": conv_weights(6, 4, 3), "b": RNG.standard_normal(6), "s": RNG.uniform(0.5, 2, (1, 6, 1, 1))},
        [1, 4, 8, 8], [1, 6, 6, 6], ["Conv", "Mul", "Add"],
    ),
    # Gemm (transB, alpha, beta) -> Mul and Add per output feature
    "gemm then scale and shift": (
        [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1, alpha=0.5, beta=2.0), helper.make_node("Mul", ["g", "s"], ["m"]), helper.make_node("Add", ["t", "m"], ["y"])],
        {"w": RNG.standard_normal((5, 7)), "b": RNG.standard_normal(5), "s": RNG.uniform(0.5, 2, 5), "t": RNG.standard_normal((1, 5))},
        [3, 7], [3, 5], ["Gemm"],
    ),
    # MatMul -> Mul per column folds; the Add after it stays (a MatMul has no bias)
    "matmul then scale and shift": (
        [helper.make_node("MatMul", ["x", "w"], ["g"]), helper.make_node("Mul", ["g", "s"], ["m"]), helper.make_node("Add", ["m", "t"], ["y"])],
        {"w": RNG.standard_normal((7, 5)), "s": RNG.uniform(0.5, 2, 5), "t": RNG.standard_normal(5)},
        [2, 3, 7], [2, 3, 5], ["MatMul", "Add"],
    ),
    # grouped ConvTranspose -> Mul per output channel
    "grouped conv transpose then scale": (
        [helper.make_node("ConvTranspose", ["x", "w", "b"], ["c"], group=2, strides=[2, 2]), helper.make_node("Mul", ["c", "s"], ["y"])],
        {"w": RNG.standard_normal((4, 3, 2, 2)) * 0.3, "b": RNG.standard_normal(6), "s": RNG.uniform(0.5, 2, (6, 1, 1))},
        [1, 4, 5, 5], [1, 6, 10, 10], ["ConvTranspose"],
    ),
}


@pytest.mark.parametrize("as_nodes", [False, True], ids=["initializers", "Constant nodes"])
@pytest.mark.parametrize("case", list(CASES))
def test_affine_steps_fold_where_exact(case, as_nodes):
    nodes, consts, in_shape, out_shape, expected_ops = CASES[case]
    model = graph_model(nodes, consts, in_shape, out_shape, as_nodes)
    optimized = optimize_model(model)
    assert [n.op_type for n in optimized.graph.node] == expected_ops
    x = RNG.standard_normal(in_shape).astype(np.float32)
    np.testing.assert_allclose(run(optimized, {"x": x}), run(model, {"x": x}), rtol=1e-5, atol=1e-5)
    assert model.graph.node[-1].op_type == nodes[-1].op_type  # the user's model is not modified


# ---- real models as paddle2onnx wrote them --------------------------------------------------------


@pytest.mark.parametrize("name, batchnorms", [("ch_ppocr_mobile_v2.0_cls_infer.onnx", 35), ("ch_PP-OCRv4_rec_infer.onnx", 6)])
def test_paddleocr_models_keep_no_batchnorm_step(name, batchnorms):
    """PaddleOCR's classifier and recognizer (rapidocr-onnxruntime, the bench extra): weights are
    Constant nodes; every BatchNorm folds, no constant step is left right after a layer, and the
    function is kept."""
    pytest.importorskip("rapidocr_onnxruntime", reason="the PaddleOCR models ship in rapidocr-onnxruntime (pip install -e '.[bench]')")
    from bench import ocr

    model = ocr.load(name)
    assert sum(n.op_type == "BatchNormalization" for n in model.graph.node) == batchnorms
    optimized = optimize_model(model)
    producers = {o: n.op_type for n in optimized.graph.node for o in n.output}
    constants = {t.name for t in optimized.graph.initializer}
    readers: dict[str, int] = {}
    for n in optimized.graph.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    assert not any(n.op_type == "BatchNormalization" for n in optimized.graph.node)
    after_layer = [
        n.name
        for n in optimized.graph.node
        if n.op_type in ("Mul", "Add")
        and any(i in constants for i in n.input)
        and any(producers.get(i) in ("Conv", "Gemm") and readers[i] == 1 for i in n.input)
    ]
    assert after_layer == []
    shape = ocr.CLS_SHAPE if "cls" in name else ocr.REC_SHAPE
    x = np.stack([ocr.preprocess(im, shape) for im in ocr.lines(2, seed=5).images])
    np.testing.assert_allclose(run(optimized, {"x": x}), run(model, {"x": x}), rtol=1e-3, atol=1e-4)
