"""The spec validator finds every broken rule, on hand-made models and on other tools' output."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import torchq
from onnx_backend import validate
from tests.zoo import ZOO

F = onnx.TensorProto.FLOAT


def _qdq_conv(*, w_zero=0, w_min=-127, axis=0, bias_scale_factor=1.0, out_scale=0.05, in_zero_dtype=np.int8):
    """x -> Q/DQ -> Conv(DQ(w), DQ(b)) -> Q/DQ -> y, with knobs to break single rules."""
    in_scale, w_scale = np.float32(0.02), np.full(4, 0.01, np.float32)
    w = np.full((4, 3, 1, 1), 5, np.int8)
    w[0, 0, 0, 0] = w_min
    inits = [
        numpy_helper.from_array(in_scale, "xs"),
        numpy_helper.from_array(np.array(0, in_zero_dtype), "xz"),
        numpy_helper.from_array(w, "w"),
        numpy_helper.from_array(w_scale, "ws"),
        numpy_helper.from_array(np.full(4, w_zero, np.int8), "wz"),
        numpy_helper.from_array(np.arange(4, dtype=np.int32), "b"),
        numpy_helper.from_array((in_scale * w_scale * bias_scale_factor).astype(np.float32), "bs"),
        numpy_helper.from_array(np.zeros(4, np.int32), "bz"),
        numpy_helper.from_array(np.float32(out_scale), "ys"),
        numpy_helper.from_array(np.int8(0), "yz"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="q_x"),
        helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dq_x"),
        helper.make_node("DequantizeLinear", ["w", "ws", "wz"], ["wd"], name="dq_w", axis=axis),
        helper.make_node("DequantizeLinear", ["b", "bs", "bz"], ["bd"], name="dq_b", axis=0),
        helper.make_node("Conv", ["xd", "wd", "bd"], ["c"], name="conv"),
        helper.make_node("QuantizeLinear", ["c", "ys", "yz"], ["cq"], name="q_c"),
        helper.make_node("DequantizeLinear", ["cq", "ys", "yz"], ["y"], name="dq_c"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3, 4, 4])], [helper.make_tensor_value_info("y", F, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def rules(model) -> set[str]:
    return {v.rule for v in validate(model)}


def test_a_correct_conv_passes():
    assert validate(_qdq_conv()) == []


@pytest.mark.parametrize(
    "knobs, rule",
    [
        ({"w_zero": 3}, "weight"),
        ({"w_min": -128}, "weight"),
        ({"axis": 1}, "weight"),
        ({"bias_scale_factor": 1.5}, "bias"),
        ({"out_scale": 0.0}, "scale"),
        ({"in_zero_dtype": np.int32}, "activation-int8"),
    ],
)
def test_each_broken_rule_is_reported_with_the_node(knobs, rule):
    violations = validate(_qdq_conv(**knobs))
    assert rule in {v.rule for v in violations}
    assert all(v.node for v in violations)


def _two_input_op(op, scales, out_scale, out_zero=0):
    inits = [numpy_helper.from_array(np.float32(s), f"s{i}") for i, s in enumerate(scales)]
    inits += [numpy_helper.from_array(np.int8(0), "z"), numpy_helper.from_array(np.float32(out_scale), "so"), numpy_helper.from_array(np.int8(out_zero), "zo")]
    nodes = []
    for i in range(len(scales)):
        nodes += [helper.make_node("QuantizeLinear", [f"x{i}", f"s{i}", "z"], [f"q{i}"]), helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", "z"], [f"d{i}"])]
    attrs = {"axis": 1} if op in ("Concat", "Softmax") else {}
    nodes += [helper.make_node(op, [f"d{i}" for i in range(len(scales))], ["o"], name="target", **attrs)]
    nodes += [helper.make_node("QuantizeLinear", ["o", "so", "zo"], ["oq"]), helper.make_node("DequantizeLinear", ["oq", "so", "zo"], ["y"])]
    inputs = [helper.make_tensor_value_info(f"x{i}", F, [1, 2]) for i in range(len(scales))]
    return helper.make_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", F, None)], inits), opset_imports=[helper.make_opsetid("", 17)])


def test_concat_inputs_must_share_the_output_scale():
    assert rules(_two_input_op("Concat", [0.1, 0.1], 0.1)) == set()
    assert rules(_two_input_op("Concat", [0.1, 0.2], 0.1)) == {"same-scale"}


def test_sigmoid_and_softmax_outputs_are_fixed():
    assert rules(_two_input_op("Sigmoid", [0.1], 1 / 256, -128)) == set()
    assert rules(_two_input_op("Softmax", [0.1], 1 / 255, -128)) == {"fixed-output"}
    assert rules(_two_input_op("Sigmoid", [0.1], 1 / 256, 0)) == {"fixed-output"}


def test_onnxruntime_quantizer_breaks_spec_rules_that_ours_keeps():
    """onnxruntime's quantize_static gives Concat inputs their own scales and Softmax 1/255-ish
    outputs; the validator says so, and our model of the same network passes."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Conv2d(3, 4, 1), torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.softmax(torch.cat([self.a(x), 3 * self.b(x)], 1).flatten(1), -1)

    model = Net().eval()
    xs = [torch.randn(1, 3, 6, 6) for _ in range(4)]
    buf = io.BytesIO()
    torch.onnx.export(model, xs[0], buf, dynamo=False, opset_version=17, input_names=["x"])
    float_model = onnx.load_from_string(buf.getvalue())

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"x": x.numpy()} for x in xs])

        def get_next(self):
            return next(self.it, None)

    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        onnx.save(float_model, Path(d) / "f.onnx")
        quantize_static(str(Path(d) / "f.onnx"), str(Path(d) / "q.onnx"), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True)
        ort_model = onnx.load(Path(d) / "q.onnx")
    broken = rules(ort_model)
    assert {"same-scale", "fixed-output"} <= broken

    torchq.prepare(model, target=None)
    torchq.calibrate(model, xs)
    ours = torchq.export(model, xs[0], dynamo=False)
    torchq.unprepare(model)
    assert validate(ours) == []
