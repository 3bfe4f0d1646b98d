"""End to end on the test zoo: real torch exports (both exporters), real onnxruntime sessions,
and the spec validator on every quantized model.

Accuracy thresholds (output SQNR against the float model, on unseen inputs) are documented in
docs/METHODS.md: at least 30 dB for every method.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

import torchq
from onnx_backend import assert_valid
from onnx_backend.model_io import default_opset
from onnx_backend.qmath import sqnr_db
from tests.conftest import run_onnx
from tests.zoo import ZOO

SQNR_MIN_DB = {"min_max": 30.0, "percentile": 30.0, "mse": 30.0, "sqnr": 30.0, "entropy": 30.0}


def quantize_entry(entry, config=None, dynamo=True, **export_options):
    model = entry.model()
    calibration = entry.calibration()
    torchq.prepare(model, config or torchq.QuantConfig())
    try:
        torchq.calibrate(model, calibration)
        qmodel, report = torchq.export_with_report(
            model, calibration[0], dynamo=dynamo, input_names=entry.input_names, output_names=entry.output_names, **export_options
        )
    finally:
        torchq.unprepare(model)
    return model, qmodel, report


def output_sqnr(entry, model, qmodel, batch=2) -> float:
    g = torch.Generator().manual_seed(99)
    inputs = tuple(t[:batch] if batch <= t.shape[0] else torch.cat([t] * batch)[:batch] for t in entry.inputs(g))
    with torch.no_grad():
        ref = model(*inputs)
    ref = ref if isinstance(ref, tuple) else (ref,)
    outs = run_onnx(qmodel, {n: t.numpy() for n, t in zip(entry.input_names, inputs)})
    return min(sqnr_db(r.numpy(), o) for r, o in zip(ref, outs))


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_model_quantizes_to_the_spec_and_keeps_accuracy(name, dynamo):
    entry = ZOO[name]
    model, qmodel, report = quantize_entry(entry, dynamo=dynamo)
    assert default_opset(qmodel) >= 13
    onnx.checker.check_model(qmodel, full_check=True)
    assert_valid(qmodel)
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    assert output_sqnr(entry, model, qmodel) >= SQNR_MIN_DB["mse"]
    # every tensor left in float is reported, and none is left silently
    assert report.float_tensors == {}, report.describe()
    # the report counts what the model holds: one QuantizeLinear per tensor and per requantized edge
    summary = report.backend.plan.summary()
    assert summary["quantized_tensors"] + summary["requantized_edges"] == sum(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)


@pytest.mark.parametrize("name", ["residual", "transformer_block", "unet", "squeeze_excitation"])
def test_both_exporters_give_the_same_ranges_and_outputs(name):
    entry = ZOO[name]
    results = {}
    for dynamo in (True, False):
        model, qmodel, report = quantize_entry(entry, dynamo=dynamo)
        by_key = {keys[0]: report.ranges[t] for t, keys in report.keys_of_tensor.items() if t in report.ranges}
        inputs = entry.inputs(torch.Generator().manual_seed(5))
        results[dynamo] = (by_key, run_onnx(qmodel, {n: t.numpy() for n, t in zip(entry.input_names, inputs)}))
    (keys_d, out_d), (keys_t, out_t) = results[True], results[False]
    shared = set(keys_d) & set(keys_t)
    assert len(shared) >= 0.9 * max(len(keys_d), len(keys_t))
    for key in shared:
        assert keys_d[key] == pytest.approx(keys_t[key], abs=1e-6), key
    for a, b in zip(out_d, out_t):
        np.testing.assert_allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("method", list(SQNR_MIN_DB))
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("name", ["conv_bn_relu", "inception", "transformer_block"])
def test_every_method_keeps_accuracy(name, method, symmetric):
    entry = ZOO[name]
    model, qmodel, _ = quantize_entry(entry, torchq.QuantConfig(method=method, symmetric=symmetric), dynamo=False)
    assert_valid(qmodel)
    assert output_sqnr(entry, model, qmodel) >= SQNR_MIN_DB[method]


def test_symmetric_config_gives_zero_points_of_zero_for_signed_activations():
    entry = ZOO["residual"]
    _, qmodel, _ = quantize_entry(entry, torchq.QuantConfig(symmetric=True), dynamo=False)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    for node in qmodel.graph.node:
        if node.op_type == "QuantizeLinear":
            scale, zero = inits[node.input[1]], inits[node.input[2]]
            assert int(zero) in (0, -128), node.name  # symmetric, or [0, a] for never-negative tensors


def test_dynamic_batch_stays_dynamic():
    entry = ZOO["residual"]
    model, qmodel, _ = quantize_entry(entry, dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    for batch in (1, 5):
        assert output_sqnr(entry, model, qmodel, batch=batch) >= SQNR_MIN_DB["mse"]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_variable_sequence_length_calibrates_and_stays_dynamic(dynamo):
    entry = ZOO["transformer_block"]
    model = entry.model()
    g = torch.Generator().manual_seed(0)
    torchq.prepare(model)
    torchq.calibrate(model, [torch.randn(2, t, 32, generator=g) for t in (5, 9, 16, 7)])
    qmodel = torchq.export(model, torch.randn(1, 9, 32), dynamo=dynamo, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b", 1: "t"}, "y": {0: "b", 1: "t"}})
    torchq.unprepare(model)
    for t in (3, 11, 20):
        x = torch.randn(3, t, 32, generator=g)
        with torch.no_grad():
            ref = model(x).numpy()
        assert sqnr_db(ref, run_onnx(qmodel, {"x": x.numpy()})[0]) >= 25.0


def test_per_tensor_weights_when_asked():
    entry = ZOO["conv_bn_relu"]
    _, qmodel, _ = quantize_entry(entry, torchq.QuantConfig(per_channel=False), dynamo=False)
    assert_valid(qmodel)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in qmodel.graph.initializer}
    weight_scales = [inits[n.input[1]] for n in qmodel.graph.node if n.op_type == "DequantizeLinear" and inits.get(n.input[0], np.zeros(0)).dtype == np.int8]
    assert weight_scales and all(s.ndim == 0 for s in weight_scales)


def ort_fused_ops(qmodel, tmp_path) -> dict[str, int]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    opts.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    opts.log_severity_level = 3
    ort.InferenceSession(qmodel.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ops: dict[str, int] = {}
    for n in onnx.load(opts.optimized_model_filepath).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return ops


@pytest.mark.parametrize("name", ["conv_bn_relu", "residual", "inception", "depthwise_separable", "squeeze_excitation", "flatten_linear", "two_in_two_out", "unet"])
def test_uint8_storage_lets_onnxruntime_run_every_conv_in_integer_kernels(name, tmp_path):
    """QDQ placement that onnxruntime fuses: no float Conv/Gemm/Add/Concat/pooling survives, but
    for a Linear head writing a model output, which stays float by design (planner rule 8)."""
    entry = ZOO[name]
    model, qmodel, report = quantize_entry(entry, torchq.QuantConfig(activation_dtype="uint8"))
    assert_valid(qmodel)
    assert output_sqnr(entry, model, qmodel) >= SQNR_MIN_DB["mse"]
    ops = ort_fused_ops(qmodel, tmp_path)
    heads = sum("writing a model output" in why for why in report.backend.float_nodes.values())
    assert ops.get("Gemm", 0) + ops.get("MatMul", 0) <= heads, (ops, report.backend.float_nodes)
    assert not {"Conv", "Add", "Concat", "GlobalAveragePool", "ReduceMean"} & set(ops), ops
    assert ops.get("QLinearConv", 0) >= 1


def test_uint8_storage_is_the_same_grid_as_int8():
    entry = ZOO["residual"]
    model, q8, _ = quantize_entry(entry, dynamo=False)
    _, qu8, _ = quantize_entry(entry, torchq.QuantConfig(activation_dtype="uint8"), dynamo=False)
    x = entry.inputs(torch.Generator().manual_seed(3))[0].numpy()
    a, b = run_onnx(q8, {"x": x})[0], run_onnx(qu8, {"x": x})[0]
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in q8.graph.initializer}
    out_scale = float(inits["y_scale"])
    assert np.max(np.abs(a - b)) <= out_scale * 1.01  # kernels round differently, by at most one step


@pytest.mark.parametrize("name", sorted(ZOO))
def test_every_activation_the_target_runs_is_quantized(name):
    """Nothing falls back to the host for want of a range: a spatial mean (GlobalAveragePool ->
    Squeeze once optimized) and a standalone BatchNorm (Mul -> Add) are quantized like the rest."""
    import npu

    _, qmodel, report = quantize_entry(ZOO[name], torchq.QuantConfig(target="warboy"))
    check = npu.check(qmodel, target="warboy")
    not_quantized = {r.node for r in check.host_nodes if r.category == "not quantized"}
    assert not_quantized <= set(report.backend.float_nodes), check.summary()  # only what the planner chose, with its reason
    assert check.summary()["npu"] > 0


def test_residual_sum_read_only_by_a_host_layernorm_runs_on_the_host():
    """Post-norm encoder (nn.TransformerEncoderLayer): warboy runs LayerNorm on the host, so the
    residual Adds feeding it (one input from a host LayerNorm) join the host instead of being
    quantized for nobody; with every op int8 (target None) they stay int8."""
    entry = ZOO["torch_encoder_layer"]
    _, _, warboy = quantize_entry(entry, torchq.QuantConfig(target="warboy"))
    joined = {n for n, why in warboy.backend.float_nodes.items() if "runs on the host with them" in why}
    assert joined and all("add" in n.lower() for n in joined)
    _, _, everything = quantize_entry(entry, torchq.QuantConfig(target=None))
    assert not any("runs on the host with them" in why for why in everything.backend.float_nodes.values())
    assert joined <= set(everything.backend.plan.int8_nodes)
