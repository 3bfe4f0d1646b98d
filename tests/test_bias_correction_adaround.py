"""Bias correction removes the measured mean shift; AdaRound never loses to nearest rounding on its
own objective; the weight-override hook only accepts roundings of weight / scale."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from onnx_backend import InvalidModelError, assert_valid, quantize_with_report
from onnx_backend.techniques import Options, run_pipeline
from onnx_backend.techniques.bias_correction import channel_shifts, correct_bias, float_means
from onnx_backend.techniques.graph import const, copy_model, weighted_layers
from torchq.techniques.adaround import AdaRoundReport, LayerOp, adaround, round_layer
from tests.technique_nets import ConvChain, export, images
from tests.zoo import ZOO


def _zoo_pipeline(name: str, **options):
    entry = ZOO[name]
    data = [[t.numpy() for t in s] for s in entry.calibration(6)]
    proto = export(entry.model(), tuple(torch.from_numpy(a) for a in data[0]))
    return run_pipeline(proto, data, Options(target=None, **options))


def test_bias_correction_removes_the_measured_mean_shift():
    data = images(6)  # unbalanced channels under per-tensor weights: large shifts
    prepared = run_pipeline(export(ConvChain(depthwise=True), tuple(torch.from_numpy(a) for a in data[0])), data, Options(target=None, per_channel=False))
    original = copy_model(prepared.model)
    layers = weighted_layers(original)
    reference = float_means(original, layers, prepared.feeds)
    before = channel_shifts(prepared.quantize()[0], reference, layers, prepared.feeds)
    report = correct_bias(prepared.model, prepared.feeds, lambda m: prepared.quantize(model=m))
    qmodel, qreport = prepared.quantize()
    after = channel_shifts(qmodel, reference, weighted_layers(prepared.model), prepared.feeds)
    # what is left is below half a step of the int32 bias (input scale x weight scale), which is
    # as close as a quantized bias can get
    bias_step = {c.node: c.params.scale for c in qreport.plan.constants if c.kind == "bias"}
    assert set(report.layers) == {layer.name for layer in layers}
    for name, shift in before.items():
        left = np.abs(after[name])
        assert np.all(left <= 0.05 * np.abs(shift) + 0.51 * bias_step[name]), name
        assert np.max(left) < 0.2 * np.max(np.abs(shift)), name
    # only biases changed: every weight is bit-identical
    for a, b in zip(weighted_layers(original), weighted_layers(prepared.model)):
        assert np.array_equal(const(a.weight), const(b.weight))


def test_bias_correction_in_the_pipeline_gives_a_valid_model():
    prepared = _zoo_pipeline("residual", bias_correction=True)
    qmodel, _ = prepared.quantize()
    assert_valid(qmodel)
    assert all(v["after"] < v["before"] for v in prepared.report.steps["bias_correction"]["layers"].values())


def _conv_layer_data(seed=0):
    torch.manual_seed(seed)
    model = ConvChain(depthwise=False)
    data = images(4, seed=seed)
    prepared = run_pipeline(export(model, tuple(torch.from_numpy(a) for a in data[0])), data, Options(target=None))
    return prepared


@pytest.mark.parametrize("iterations", [1, 300])
def test_adaround_is_never_worse_than_nearest_on_its_objective(iterations):
    prepared = _conv_layer_data()
    _, qreport = prepared.quantize()
    params = {c.node: c.params for c in qreport.plan.constants if c.kind == "weight"}
    layer = weighted_layers(prepared.model)[1]
    w = const(layer.weight)
    op = LayerOp(layer, layer.bias_array())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, w.shape[1], 12, 12, generator=g)
    with torch.no_grad():
        target = op(x, torch.tensor(w))
    q, info = round_layer(op, torch.relu, w, params[layer.name].scale, 0, x, target, iterations)
    assert info["adaround"] <= info["nearest"] if info["kept"] == "adaround" else info["nearest"] < info["adaround"]
    exact = w / params[layer.name].scale.reshape(-1, 1, 1, 1)
    assert np.all((q >= np.floor(exact) - 1e-6) & (q <= np.ceil(exact) + 1e-6))  # up or down, nothing else
    if iterations > 1:
        assert info["kept"] == "adaround" and info["adaround"] < info["nearest"]


@pytest.mark.parametrize(("stride", "padding", "dilation", "groups"), [(1, 1, 1, 1), (2, 1, 1, 4), (2, 2, 1, 8), (1, 0, 2, 1)])
def test_adaround_conv_windows_are_exact_parts_of_the_whole_output(stride, padding, dilation, groups):
    """AdaRound steps on output windows: each window, convolved from its receptive field of the
    padded input, equals the same part of the whole output (borders included)."""
    conv = torch.nn.Conv2d(8, 8, 3 if dilation > 1 else 5, stride=stride, padding=padding, dilation=dilation, groups=groups).eval()
    x = torch.randn(2, 8, 23, 21)
    layer = weighted_layers(_graph_of(conv, x))[0]
    op = LayerOp(layer, layer.bias_array())
    w = torch.tensor(const(layer.weight))
    with torch.no_grad():
        whole, xp = op(x, w), op.padded(x)
        np.testing.assert_allclose(whole.numpy(), conv(x).numpy(), atol=1e-5)
        h, wd = whole.shape[2:]
        size = [min(5, h), min(7, wd)]
        for starts in ([0, 0], [h - size[0], wd - size[1]], [1, 2]):
            part = op.window(xp, w, starts, size)
            np.testing.assert_allclose(part.numpy(), whole[:, :, starts[0] : starts[0] + size[0], starts[1] : starts[1] + size[1]].numpy(), atol=1e-5)


def _graph_of(module, x):
    from onnx_backend.techniques.graph import prepare

    return prepare(export(module, (x,)), None)


def test_adaround_weights_reach_the_quantized_model():
    prepared = _conv_layer_data()
    report = AdaRoundReport()
    overrides = adaround(prepared, iterations=50, report=report)
    assert set(overrides) == {layer.weight.name for layer in weighted_layers(prepared.model)}
    assert all(v["adaround"] <= v["nearest"] or v["kept"] == "nearest" for v in report.layers.values())
    prepared.weight_overrides = overrides
    qmodel, _ = prepared.quantize()
    assert_valid(qmodel)
    stored = {t.name: onnx.numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    for name, q in overrides.items():
        assert np.array_equal(stored[f"{name}_quantized"], q)


def test_weight_overrides_must_be_a_rounding_of_weight_over_scale():
    prepared = _conv_layer_data()
    layer = weighted_layers(prepared.model)[0]
    _, qreport = prepared.quantize()
    scale = next(c.params.scale for c in qreport.plan.constants if c.node == layer.name and c.kind == "weight")
    w = const(layer.weight)
    nearest = np.round(w / scale.reshape(-1, 1, 1, 1)).astype(np.int8)
    proto = prepared.float_model()
    quantize_with_report(proto, prepared.ranges, optimize=False, weight_overrides={layer.weight.name: nearest})
    off = nearest.astype(np.int32)
    k = int(np.argmax(np.abs(w)))
    off.flat[k] -= 2 * np.sign(off.flat[k])  # two steps toward 0: neither floor nor ceil
    with pytest.raises(InvalidModelError, match="not a rounding"):
        quantize_with_report(proto, prepared.ranges, optimize=False, weight_overrides={layer.weight.name: off})
    with pytest.raises(InvalidModelError, match="expected integers of shape"):
        quantize_with_report(proto, prepared.ranges, optimize=False, weight_overrides={layer.weight.name: nearest[:1]})
