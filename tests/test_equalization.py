"""Cross-layer equalization: the float function is preserved, ranges are balanced, INT8 gains."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from onnx_backend import assert_valid
from onnx_backend.qmath import sqnr_db
from onnx_backend.techniques import Options, quantize_with_techniques
from onnx_backend.techniques.equalization import equalize, find_pairs, in_ranges, out_ranges
from onnx_backend.techniques.graph import as_feeds, copy_model, outputs_on, prepare, to_proto
from tests.conftest import run_onnx
from tests.technique_nets import ConvChain, export, images
from tests.zoo import ZOO


def _prepared(model, inputs):
    proto = export(model, tuple(torch.from_numpy(a) for a in inputs[0]))
    ir_model = prepare(proto)
    return ir_model, as_feeds(to_proto(ir_model), inputs)


def _max_rel_diff(a_model, b_model, feeds) -> float:
    a, b = outputs_on(to_proto(a_model), feeds), outputs_on(to_proto(b_model), feeds)
    return max(float(np.max(np.abs(x[0] - y[0])) / np.max(np.abs(x[0]))) for x, y in zip(a, b))


@pytest.mark.parametrize("depthwise", [True, False], ids=["depthwise", "full"])
def test_equalization_preserves_the_float_function(depthwise):
    model = ConvChain(depthwise=depthwise)
    ir_model, feeds = _prepared(model, images(4))
    held_out = as_feeds(to_proto(ir_model), images(3, seed=7))
    eq = copy_model(ir_model)
    report = equalize(eq, feeds, absorb_high_bias=False)
    assert len(report.pairs) == 2
    assert _max_rel_diff(ir_model, eq, held_out) < 1e-5


def test_high_bias_absorption_preserves_the_function_on_the_calibration_data():
    model = ConvChain(depthwise=True)
    with torch.no_grad():  # a depthwise layer whose pre-activations never reach 0: a high bias
        model.c2.bias.fill_(3.0)
        model.c2.weight.mul_(0.01)
    ir_model, feeds = _prepared(model, images(4))
    eq = copy_model(ir_model)
    report = equalize(eq, feeds)
    assert report.absorbed, "the depthwise -> 1x1 pair had a bias to absorb"
    assert _max_rel_diff(ir_model, eq, feeds) < 1e-5


def test_equalization_balances_each_pair():
    ir_model, feeds = _prepared(ConvChain(depthwise=True), images(2))
    before = [float(np.max(out_ranges(f)) / np.min(out_ranges(f))) for f, _, _ in find_pairs(ir_model)]
    equalize(ir_model, feeds, absorb_high_bias=False)
    for first, _, second in find_pairs(ir_model):
        np.testing.assert_allclose(out_ranges(first), in_ranges(second), rtol=0.02)
    after = [float(np.max(out_ranges(f)) / np.min(out_ranges(f))) for f, _, _ in find_pairs(ir_model)]
    assert max(after) < min(before) / 10  # the channel ranges of each layer are far closer together


def test_equalization_rescues_per_tensor_weights():
    model = ConvChain(depthwise=True)
    calib, test = images(8), images(2, seed=5)
    proto = export(model, tuple(torch.from_numpy(a) for a in calib[0]))
    ref = [run_onnx(proto, {"x": t[0]})[0] for t in test]
    scores = {}
    for eq in (False, True):
        qmodel, _ = quantize_with_techniques(proto, calib, Options(per_channel=False, equalization=eq, target=None))
        assert_valid(qmodel)
        scores[eq] = min(sqnr_db(r, run_onnx(qmodel, {"x": t[0]})[0]) for r, t in zip(ref, test))
    assert scores[True] > scores[False] + 10, scores


def test_relu6_pairs_are_kept_exact_or_turned_into_relu_with_a_report():
    entry = ZOO["depthwise_separable"]
    model = entry.model()
    data = [[t.numpy() for t in s] for s in entry.calibration(3)]
    proto = export(model, tuple(torch.from_numpy(a) for a in data[0]))
    ir_model = prepare(proto)
    feeds = as_feeds(to_proto(ir_model), data)
    kept = copy_model(ir_model)
    keep_report = equalize(kept, feeds, clip="keep")
    assert keep_report.pairs == [] and len(keep_report.clips_kept) == 2
    assert _max_rel_diff(ir_model, kept, feeds) == 0.0
    relu = copy_model(ir_model)
    report = equalize(relu, feeds, clip="relu")
    assert len(report.pairs) == 2 and set(report.clips_replaced) == set(keep_report.clips_kept)
    assert all(0.0 <= share <= 1.0 for share in report.clips_replaced.values())
    assert sum(n.op_type == "Clip" for n in relu.graph) == 1  # the last one is in no pair
    if all(share == 0.0 for share in report.clips_replaced.values()):  # nothing was clipped: still exact here
        assert _max_rel_diff(ir_model, relu, feeds) < 1e-5


def test_relu6_replacement_changes_only_what_was_clipped():
    model = ConvChain(depthwise=True, act=nn.ReLU6)
    with torch.no_grad():
        model.c1.weight.mul_(20)  # pre-activations well above 6: the clip is active
    ir_model, feeds = _prepared(model, images(3))
    report = equalize(copy_model(ir_model), feeds, clip="relu")
    assert max(report.clips_replaced.values()) > 0.01  # and the report says how often
