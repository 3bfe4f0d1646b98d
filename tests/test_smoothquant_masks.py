"""SmoothQuant keeps the function and flattens outlier channels; additive attention masks do not
set the ranges of the tensors they flow into."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import torchq
from onnx_backend import Calibrator, assert_valid, optimize_model, quantize
from onnx_backend.qmath import sqnr_db
from onnx_backend.techniques import Options, quantize_with_techniques, run_pipeline
from onnx_backend.techniques.calibration import MASK_MIN
from onnx_backend.techniques.graph import outputs_on, prepare, to_proto
from tests.conftest import run_onnx
from tests.technique_nets import LayerNormLinear, MaskedAttention, export, padded_batches


def _tokens(n, seed=0, batch=4, t=8, d=16):
    g = np.random.default_rng(seed)
    return [[g.standard_normal((batch, t, d)).astype(np.float32)] for _ in range(n)]


def test_smoothquant_keeps_the_function_and_rescues_outlier_channels():
    model = LayerNormLinear()
    calib, test = _tokens(6), _tokens(2, seed=9)
    proto = export(model, (torch.from_numpy(calib[0][0]),), opset=17)
    ref = [run_onnx(proto, {"x": t[0]})[0] for t in test]
    plain = run_pipeline(proto, calib, Options(target=None))
    smooth = run_pipeline(proto, calib, Options(target=None, smoothquant="auto"))
    groups = smooth.report.steps["smoothquant"]["groups"]
    assert groups and all(g["error_after"] <= g["error_before"] for g in groups.values())
    assert any(g["alpha"] is not None for g in groups.values())
    # the smoothed float graph computes the same function
    before = outputs_on(to_proto(prepare(proto)), [{"x": t[0]} for t in test])
    after = outputs_on(smooth.float_model(), [{"x": t[0]} for t in test])
    for a, b in zip(before, after):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-4, atol=1e-4 * np.max(np.abs(a[0])))
    scores = []
    for prepared in (plain, smooth):
        qmodel, _ = prepared.quantize()
        assert_valid(qmodel)
        scores.append(min(sqnr_db(r, run_onnx(qmodel, {"x": t[0]})[0]) for r, t in zip(ref, test)))
    assert scores[1] > scores[0] + 10, scores


def test_a_fixed_alpha_is_applied_as_given():
    calib = _tokens(3)
    proto = export(LayerNormLinear(), (torch.from_numpy(calib[0][0]),), opset=17)
    prepared = run_pipeline(proto, calib, Options(target=None, smoothquant=0.5))
    assert {g["alpha"] for g in prepared.report.steps["smoothquant"]["groups"].values()} == {0.5}


def _masked(kind):
    calib, test = padded_batches(6), padded_batches(2, seed=5)
    model = MaskedAttention(mask_kind=kind)
    proto = export(model, tuple(torch.from_numpy(a) for a in calib[0]), names=("x", "attention_mask"), opset=17)
    return model, proto, calib, test


def _real_positions_sqnr(proto, qmodel, test) -> float:
    scores = []
    for x, m in test:
        ref = run_onnx(proto, {"x": x, "attention_mask": m})[0]
        out = run_onnx(qmodel, {"x": x, "attention_mask": m})[0]
        keep = m.astype(bool)
        scores.append(sqnr_db(ref[keep], out[keep]))
    return min(scores)


def _scores_tensor(prepared) -> str:
    softmax = next(n for n in prepared.model.graph if n.op_type == "Softmax")
    return softmax.inputs[0].name


@pytest.mark.parametrize("kind", ["additive", "finfo"])
def test_attention_masks_do_not_set_ranges(kind):
    _, proto, calib, test = _masked(kind)
    prepared = run_pipeline(proto, calib, Options(target=None))
    scores = _scores_tensor(prepared)
    assert scores in prepared.report.steps["attention_masks"]["masked"]
    lo, hi = prepared.ranges[scores]
    assert lo > -100 and hi - lo >= math.log(512 * 12) - 1e-6  # real scores only, with room for the masked ones
    qmodel, _ = prepared.quantize()
    assert_valid(qmodel)
    ours = _real_positions_sqnr(proto, qmodel, test)
    assert ours > 20, ours
    opt = optimize_model(proto)
    cal = Calibrator(opt, "mse_asym", quiet=True)
    cal.collect_data(calib)
    plain_ranges = cal.compute_range()
    plain = _real_positions_sqnr(proto, quantize(opt, plain_ranges, target=None), test)
    if kind == "additive":  # -1e4 is data to the plain calibrator: it sets the range, the real scores collapse
        assert plain_ranges[scores][0] <= MASK_MIN / 2 and scores not in plain_ranges.mask_values
        assert ours > plain + 10, (ours, plain)
    else:  # finfo.min is a mask value on every path: left out, and still masking in int8
        assert plain_ranges[scores][0] > -100 and plain_ranges.mask_values[scores][0] > 0
        assert plain > 20, plain


def test_an_infinite_mask_is_left_out_on_every_path():
    _, proto, calib, test = _masked("fill")
    opt = optimize_model(proto)
    cal = Calibrator(opt, quiet=True)
    cal.collect_data(calib)  # -inf is a mask value, not an error
    plain_ranges = cal.compute_range()
    scores = next(n.input[0] for n in opt.graph.node if n.op_type == "Softmax")
    padded = sum(int((1 - m).sum()) * m.shape[1] for _, m in calib)  # one -inf per (query, padded key)
    assert plain_ranges.mask_values[scores] == (padded, 0)
    lo, hi = plain_ranges[scores]
    assert -100 < lo and hi - lo >= math.log(512 * 12) - 1e-6  # the softmax's margin (onnx_backend.masks)
    assert _real_positions_sqnr(proto, quantize(opt, plain_ranges, target=None), test) > 20
    qmodel, report = quantize_with_techniques(proto, calib, Options(target=None))
    assert report.steps["attention_masks"]["masked"]
    assert _real_positions_sqnr(proto, qmodel, test) > 20


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_the_pytorch_path_handles_masks_when_asked(dynamo):
    model, proto, calib, test = _masked("additive")
    batches = [tuple(torch.from_numpy(a) for a in b) for b in calib]
    config = torchq.QuantConfig(attention_masks=True, target=None)
    qmodel = torchq.quantize(model, batches, batches[0], config, dynamo=dynamo, input_names=["x", "attention_mask"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "attention_mask": {0: "b"}, "y": {0: "b"}})
    assert_valid(qmodel)
    assert _real_positions_sqnr(proto, qmodel, test) > 20


def test_the_plain_pytorch_path_warns_about_masks():
    model, _, calib, _ = _masked("additive")
    batches = [tuple(torch.from_numpy(a) for a in b) for b in calib]
    torchq.prepare(model, torchq.QuantConfig(target=None))
    try:
        torchq.calibrate(model, batches)
        with pytest.warns(UserWarning, match="attention_masks=True"):
            _, report = torchq.export_with_report(model, batches[0], dynamo=False)
    finally:
        torchq.unprepare(model)
    assert "attention mask" in report.techniques["warnings"][0]
