"""method auto picks each tensor's best-scoring range; sensitivity finds the harmful layers; the
accuracy-targeted fallback meets its target with a minimal float set, or returns the best model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import npu
from onnx_backend import assert_valid
from onnx_backend.techniques import Options, analyze, quantize_to_target, run_pipeline
from onnx_backend.techniques.auto_method import CANDIDATES
from onnx_backend.techniques.graph import outputs_on
from tests.technique_nets import OutlierMLP, export
from tests.zoo import ZOO


def _zoo(name, n=6):
    e = ZOO[name]
    data = [[t.numpy() for t in s] for s in e.calibration(n)]
    return export(e.model(), tuple(torch.from_numpy(a) for a in data[0]), names=e.input_names, outputs=e.output_names), data


def test_auto_gives_each_tensor_its_best_scoring_candidate():
    proto, data = _zoo("squeeze_excitation")
    prepared = run_pipeline(proto, data, Options(method="auto", target=None))
    auto = prepared.report.steps["method_auto"]
    labels = {f"{m}_{'sym' if s else 'asym'}" for m, s in CANDIDATES}
    assert set(auto["chosen"].values()) <= labels and len(set(auto["chosen"].values())) > 1
    stats = prepared.statistics
    for tensor, label in auto["chosen"].items():
        method, sym = label.rsplit("_", 1)
        assert prepared.ranges[tensor] == stats.range_of(tensor, method, sym == "sym", percentile=99.99, sqnr_gamma=3.0)
    from onnx_backend.techniques.auto_method import choose

    result = choose(prepared, percentile=99.99, sqnr_gamma=3.0)
    assert result.scores, "tensors with several distinct candidate ranges were scored"
    for tensor, scores in result.scores.items():
        assert scores[result.chosen[tensor]] == min(scores.values())
    qmodel, _ = prepared.quantize()
    assert_valid(qmodel)


def _mlp_task(seed=0):
    model = OutlierMLP(seed)
    g = np.random.default_rng(seed)
    calib = [[g.standard_normal((32, 16)).astype(np.float32)] for _ in range(4)]
    test_x = g.standard_normal((512, 16)).astype(np.float32)
    proto = export(model, (torch.from_numpy(calib[0][0]),))
    labels = outputs_on(proto, [{"x": test_x}])[0][0].argmax(1)  # the float model is right by definition

    def accuracy(m) -> float:
        return float((outputs_on(m, [{"x": test_x}])[0][0].argmax(1) == labels).mean() * 100)

    return proto, calib, accuracy


def test_sensitivity_points_at_the_layers_around_the_outlier_tensor():
    proto, calib, accuracy = _mlp_task()
    prepared = run_pipeline(proto, calib, Options(target=None))
    report = analyze(prepared, accuracy)
    assert report.float_metric == 100.0 and report.quantized_metric < 90
    by_only = sorted(report.layers, key=lambda s: s.only)
    worst_two = {s.layer for s in by_only[:2]}
    assert worst_two == {"/fc1/Gemm", "/fc2/Gemm"}, report.table()
    assert all(s.only > 95 for s in by_only[2:])
    default = analyze(prepared)  # no metric: output SQNR against float
    assert default.float_metric == float("inf") and {s.layer for s in sorted(default.layers, key=lambda s: s.only)[:2]} == worst_two


def test_fallback_meets_the_target_with_a_minimal_float_set():
    proto, calib, accuracy = _mlp_task()
    prepared = run_pipeline(proto, calib, Options(target="warboy"))
    qmodel, report = quantize_to_target(prepared, accuracy, relative=0.995)
    assert report.met and report.metric >= 99.5 and report.metric == accuracy(qmodel)
    # the hidden tensor with the outlier stays float only if both layers next to it do
    assert set(report.float_layers) == {"/fc1/Gemm", "/fc2/Gemm"}
    assert_valid(qmodel)
    for layer in report.float_layers:  # minimal: putting any one back in int8 misses the target
        trial, _ = prepared.quantize(exclude_nodes=[n for k in report.float_layers if k != layer for n in _members(prepared, k)])
        assert accuracy(trial) < 99.5
    _, qreport = prepared.quantize(exclude_nodes=report.float_nodes)
    assert set(report.float_nodes) <= set(qreport.float_nodes)  # reported as float
    host = {r.node for r in npu.check(qmodel, "warboy").host_nodes}
    assert set(report.float_layers) <= host  # and the NPU check shows them as host fallback
    assert "float" in report.describe() and "met" in report.describe()


def _members(prepared, layer):
    from onnx_backend.techniques.sensitivity import layer_groups

    return layer_groups(prepared)[0][layer]


def test_an_unreachable_target_returns_the_best_model_found_and_says_so():
    proto, calib, accuracy = _mlp_task()
    prepared = run_pipeline(proto, calib, Options(target=None))
    qmodel, report = quantize_to_target(prepared, accuracy, absolute=101.0)
    assert not report.met and qmodel is not None
    assert report.metric == max(h["metric"] for h in report.history) == accuracy(qmodel)
    assert "NOT met" in report.describe()
    assert_valid(qmodel)


def test_a_target_already_met_keeps_everything_in_int8():
    proto, data = _zoo("conv_bn_relu", n=3)
    prepared = run_pipeline(proto, data, Options(target=None))
    qmodel, report = quantize_to_target(prepared, lambda m: 1.0, relative=0.5)
    assert report.met and report.float_layers == [] and len(report.history) == 1


@pytest.mark.parametrize("bad", [{"relative": None, "absolute": None}])
def test_a_target_must_be_given(bad):
    proto, data = _zoo("conv_bn_relu", n=2)
    prepared = run_pipeline(proto, data, Options(target=None))
    with pytest.raises(ValueError, match="relative or an absolute"):
        quantize_to_target(prepared, lambda m: 1.0, **bad)
