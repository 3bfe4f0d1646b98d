"""A Linear layer that writes a model output stays in float on the host (planner rule 8): a
classifier's largest logits are exactly what an int8 range fitted on calibration data clips."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch

import npu
import torchq
from onnx_backend import CalibrationMethod, Calibrator, assert_valid, optimize_model
from onnx_backend.quantizer import quantize_with_report
from tests.conftest import run_onnx


class Classifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 16, 3)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _float_model(model, x) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["logits"], dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    return optimize_model(onnx.load_from_string(buf.getvalue()))


def test_confident_inputs_past_the_calibration_range_keep_their_argmax():
    """The calibration data's logits stay below the evaluation data's (a few hundred crops
    reach logits that 32 calibration samples did not): with the output rounded to int8 the top
    logits saturate at the range's end and tie; with the head in float they keep their order."""
    torch.manual_seed(0)
    model = Classifier().eval()
    with torch.no_grad():
        model.fc.weight.mul_(8)  # a trained head's margins: the logits spread far wider than the features
        data = torch.randn(512, 3, 8, 8)
        logits = model(data).amax(1)
    order = logits.argsort()
    calibration, confident = data[order[:32]], data[order[-64:]]  # the least and the most confident
    float_model = _float_model(model, calibration[:1])
    cal = Calibrator(float_model, CalibrationMethod.MIN_MAX_ASYM, quiet=True)
    cal.collect_data([[data[i : i + 64].numpy()] for i in range(0, 512, 64)])  # every feature range seen ...
    ranges = dict(cal.compute_range())
    head = Calibrator(float_model, CalibrationMethod.MIN_MAX_ASYM, quiet=True)
    head.collect_data([[calibration.numpy()]])
    ranges["logits"] = head.compute_range()["logits"]  # ... but the logits only as far as the calibration set's
    with torch.no_grad():
        reference = model(confident).numpy()
    assert reference.max() > ranges["logits"][1]

    qmodel, report = quantize_with_report(float_model, ranges, target="warboy")
    assert_valid(qmodel)
    gemm = next(n for n in qmodel.graph.node if n.op_type == "Gemm")
    assert "writing a model output" in report.float_nodes[gemm.name]
    inits = {t.name for t in qmodel.graph.initializer}
    assert gemm.input[1] in inits  # float weights, not a DequantizeLinear
    assert not [n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gemm.output[0]]
    (logits,) = run_onnx(qmodel, {"x": confident.numpy()})
    kept = (logits.argmax(1) == reference.argmax(1)).mean()
    assert kept >= 0.95

    # the same model with its output rounded to int8: the top logits saturate and tie
    clipped, _ = quantize_with_report(float_model, ranges, target="warboy", float_output_layers=False)
    (q_logits,) = run_onnx(clipped, {"x": confident.numpy()})
    assert (q_logits.argmax(1) == reference.argmax(1)).mean() < kept - 0.1

    rows = {r.node: r for r in npu.check(qmodel, "warboy").rows}
    assert rows[gemm.name].placement == "host"
    assert [r.op_type for r in rows.values() if r.placement == "host"] == ["Gemm"]


def test_pytorch_path_keeps_the_head_float_with_both_exporters():
    torch.manual_seed(1)
    model = Classifier().eval()
    xs = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    for dynamo in (False, True):
        qmodel, report = torchq.export_with_report(_calibrated(model, xs), (xs[0],), dynamo=dynamo, input_names=["x"], output_names=["logits"])
        torchq.unprepare(model)
        heads = [n for n in qmodel.graph.node if n.op_type in ("Gemm", "MatMul")]
        assert heads and all(any("writing a model output" in why for why in report.backend.float_nodes.values()) for _ in heads)
        with torch.no_grad():
            ref = model(xs[0]).numpy()
        (out,) = run_onnx(qmodel, {"x": xs[0].numpy()})
        assert np.array_equal(out.argmax(1), ref.argmax(1))


def _calibrated(model, xs):
    prepared = torchq.prepare(model, torchq.QuantConfig())
    torchq.calibrate(prepared, xs)
    return prepared
