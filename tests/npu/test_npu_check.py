"""npu.check on purpose-built QDQ models, one per reason category, and on a quantized zoo model."""

from __future__ import annotations

import json

import numpy as np
import pytest

import npu
from tests.npu.qdq_models import QDQBuilder, conv_unit, unary_unit


def _rows(report):
    return {r.node: r for r in report.rows}


def test_conv_relu_unit_runs_on_the_npu_with_the_relu_fused():
    rows = _rows(npu.check(conv_unit(activation="Relu"), "warboy"))
    assert (rows["conv"].placement, rows["conv"].category) == ("npu", "npu")
    assert (rows["act"].placement, rows["act"].fused_into) == ("npu", "conv")


def test_unfusable_activation_between_op_and_quantize():
    # tflite.yaml fuses Conv + Relu but not ConvTranspose + Relu
    rows = _rows(npu.check(conv_unit(producer="ConvTranspose", activation="Relu"), "tflite"))
    for name in ("conv", "act"):
        assert (rows[name].placement, rows[name].category) == ("host", "unfusable QDQ pattern")
    assert "ConvTranspose + Relu" in rows["conv"].reason
    assert _rows(npu.check(conv_unit(producer="ConvTranspose", activation="Relu"), "warboy"))["conv"].placement == "npu"


def test_attribute_out_of_range_names_the_limit():
    rows = _rows(npu.check(conv_unit(channels=256, groups=256, activation=None), "warboy"))
    assert rows["conv"].category == "attribute out of range"
    assert "groups must be <= 128" in rows["conv"].reason and "256" in rows["conv"].reason
    assert _rows(npu.check(conv_unit(channels=128, groups=128, activation=None), "warboy"))["conv"].placement == "npu"


def test_concat_axis_limit():
    b = QDQBuilder()
    x = b.quantize(b.input("x", [1, 2, 4, 4]), 0.1, 0)
    b.output(b.quantize(b.node("Concat", [x, x], name="cat", axis=3), 0.1, 0))
    row = _rows(npu.check(b.model(), "warboy"))["cat"]
    assert (row.category, row.reason) == ("attribute out of range", "Concat only on the C or H axis (got 3; allowed [1, 2])")


def test_unsupported_op():
    row = _rows(npu.check(unary_unit("HardSwish"), "warboy"))["op"]
    assert (row.placement, row.category) == ("host", "unsupported op")
    assert _rows(npu.check(unary_unit("HardSwish"), "tflite"))["op"].placement == "npu"


@pytest.mark.parametrize("kw, needle", [(dict(quantize_input=False), "input 'x' is float"), (dict(quantize_output=False, activation=None), "is not quantized")])
def test_not_quantized(kw, needle):
    row = _rows(npu.check(conv_unit(**kw), "warboy"))["conv"]
    assert (row.placement, row.category) == ("host", "not quantized")
    assert needle in row.reason


def test_float_constant_operand_is_not_quantized():
    b = QDQBuilder()
    x = b.quantize(b.input("x", [1, 4]), 0.1, 0)
    y = b.node("Mul", [x, b.const("k", np.full((1, 4), 0.5, np.float32))], name="mul")
    b.output(b.quantize(y, 0.05, 0))
    row = _rows(npu.check(b.model()))["mul"]
    assert row.category == "not quantized" and "constant input 'k' is float" in row.reason


def test_shape_arithmetic_is_not_counted():
    b = QDQBuilder()
    x = b.quantize(b.input("x", [2, 3, 4]), 0.1, 0)
    shape = b.node("Shape", [x], name="shape")
    y = b.node("Reshape", [x, shape], name="reshape")
    b.output(b.quantize(y, 0.1, 0))
    report = npu.check(b.model())
    rows = _rows(report)
    assert (rows["shape"].placement, rows["shape"].category) == ("-", "shape/constant")
    assert rows["reshape"].placement == "npu"
    assert report.summary()["npu"] == 1 and report.summary()["shape_or_constant"] == 1
    names = lambda text: [line.split()[0] for line in text.splitlines()[4:] if line and not line.startswith("(")]  # noqa: E731
    assert names(report.to_text()) == ["reshape"]
    assert names(report.to_text(show_shape=True)) == ["shape", "reshape"]
    assert report.to_text().endswith("(1 shape/constant nodes not shown)")


def test_a_target_is_data(tmp_path):
    """The same model under a description written here: no Relu fusion, Conv groups <= 2."""
    (tmp_path / "tiny.yaml").write_text("name: tiny\nops:\n  Conv:\n    limits: [{attr: group, max: 2}]\n  Relu: {}\n", encoding="utf-8")
    rows = _rows(npu.check(conv_unit(activation="Relu"), str(tmp_path / "tiny.yaml")))
    assert rows["conv"].category == "unfusable QDQ pattern"
    rows = _rows(npu.check(conv_unit(channels=4, groups=4, activation=None), str(tmp_path / "tiny.yaml")))
    assert rows["conv"].reason == "Conv group out of range (got 4)"


def test_report_json_and_text():
    report = npu.check(conv_unit(channels=256, groups=256, activation=None))
    d = json.loads(json.dumps(report.to_dict()))
    assert d["target"] == "warboy"
    assert d["summary"] == {"npu": 0, "host": 1, "shape_or_constant": 0, "host_by_reason": {"attribute out of range": 1}}
    assert d["nodes"][0] == {"node": "conv", "op_type": "Conv", "placement": "host", "category": "attribute out of range", "reason": "Conv groups must be <= 128 (got 256)", "fused_into": None}
    text = report.to_text().splitlines()
    assert text[0] == "target warboy: 0 of 1 ops run on the NPU, 1 on the host (1 attribute out of range)"
    assert text[2].split() == ["node", "op", "runs", "on", "reason"]
    assert text[4].split()[:3] == ["conv", "Conv", "host"]


def test_quantized_zoo_model_with_the_default_target(quantized_zoo):
    """Default QuantConfig (warboy): HardSwish is not a warboy op, so the planner left it float
    and the checker says so; everything else runs on the NPU."""
    model = quantized_zoo("squeeze_excitation", dynamo=True, target="warboy")
    report = npu.check(model)
    host = {r.op_type: r.category for r in report.host_nodes}
    assert host == {"HardSwish": "unsupported op"}
    assert {r.op_type for r in report.npu_nodes} >= {"Conv", "Sigmoid", "Mul", "GlobalAveragePool"}
