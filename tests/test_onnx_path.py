"""ONNX in, quantized ONNX out: the backend on its own, with the reference SDK's API names."""

from __future__ import annotations

import dataclasses
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

import torchq
from onnx_backend import (
    CalibrationError,
    CalibrationMethod,
    Calibrator,
    ConfigError,
    InvalidModelError,
    ModelEditor,
    TensorType,
    assert_valid,
    get_pure_input_names,
    load_ranges,
    optimize_model,
    quantize,
    save_ranges,
)
from onnx_backend.model_io import default_opset
from onnx_backend.qmath import sqnr_db
from tests.conftest import run_onnx
from tests.zoo import ZOO

ROOT = Path(__file__).resolve().parents[1]


def float_export(entry, opset=17, dynamic=None) -> onnx.ModelProto:
    buf = io.BytesIO()
    torch.onnx.export(entry.model(), entry.calibration(1)[0], buf, dynamo=False, opset_version=opset, input_names=entry.input_names, output_names=entry.output_names, dynamic_axes=dynamic)
    return onnx.load_from_string(buf.getvalue())


def samples(entry, n=6, seed=0):
    return [[t.numpy() for t in s] for s in entry.calibration(n, seed)]


def test_the_reference_sdk_workflow(tmp_path):
    entry = ZOO["inception"]
    model = optimize_model(float_export(entry), input_shapes=None)
    calibrator = Calibrator(model, CalibrationMethod.MSE_ASYM, percentage=99.99)
    data = samples(entry)
    calibrator.collect_data(data[:3])
    calibrator.collect_data(data[3:])  # may be called again: statistics accumulate
    assert calibrator.samples == 6
    ranges = calibrator.compute_range()
    assert all(lo <= 0 <= hi for lo, hi in ranges.values())
    qmodel = quantize(model, ranges)
    assert_valid(qmodel)
    x = entry.calibration(1, seed=9)[0][0].numpy()
    assert sqnr_db(run_onnx(model, {"x": x})[0], run_onnx(qmodel, {"x": x})[0]) > 30


def test_calibration_method_has_the_ten_members():
    assert [m.name for m in CalibrationMethod] == [
        "MIN_MAX_ASYM", "MIN_MAX_SYM", "ENTROPY_ASYM", "ENTROPY_SYM", "PERCENTILE_ASYM",
        "PERCENTILE_SYM", "MSE_ASYM", "MSE_SYM", "SQNR_ASYM", "SQNR_SYM",
    ]  # fmt: skip
    assert CalibrationMethod.parse("sqnr_sym").symmetric and CalibrationMethod.SQNR_SYM.method.value == "sqnr"
    with pytest.raises(ConfigError, match="allowed: min_max_asym"):
        CalibrationMethod.parse("kl")


@pytest.mark.parametrize("method", ["mse", "entropy"])
def test_one_range_selection_path_for_pytorch_and_onnx(method):
    """PyTorch observers and the ONNX calibrator on the float export, same data: same ranges,
    same quantized model."""
    entry = ZOO["residual"]
    config = torchq.QuantConfig(method=method, target=None)
    model = torchq.prepare(entry.model(), config)
    torchq.calibrate(model, entry.calibration())
    float_model, torch_ranges = torchq.export_float(model, entry.calibration()[0], dynamo=False, input_names=["x"])
    q_torch = torchq.export(model, entry.calibration()[0], dynamo=False, input_names=["x"])
    torchq.unprepare(model)

    calibrator = Calibrator(float_model, CalibrationMethod.from_parts(method, False))
    calibrator.collect_data(samples(entry, 8))
    onnx_ranges = calibrator.compute_range()
    shared = set(torch_ranges) & set(onnx_ranges)
    assert shared and set(torch_ranges) <= set(onnx_ranges)
    for name in shared:
        # onnxruntime's and PyTorch's float arithmetic differ by ~1e-7, which can move a value
        # across a histogram bin edge: ranges agree to two bins (~1/1000 of the span).
        lo, hi = torch_ranges[name]
        assert onnx_ranges[name] == pytest.approx((lo, hi), abs=1e-3 * (hi - lo) + 1e-9), name
    q_onnx = quantize(float_model, onnx_ranges, target=None)
    assert [n.op_type for n in q_onnx.graph.node] == [n.op_type for n in q_torch.graph.node]
    params = lambda m: {t.name: numpy_helper.to_array(t) for t in m.graph.initializer if t.name.endswith(("_scale", "_zero_point"))}  # noqa: E731
    a, b = params(q_onnx), params(q_torch)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith("_scale"):
            np.testing.assert_allclose(a[name], b[name], rtol=2e-3, err_msg=name)
        else:
            assert np.max(np.abs(a[name].astype(int) - b[name].astype(int)), initial=0) <= 1, name


def test_ranges_round_trip_through_json_and_yaml(tmp_path):
    entry = ZOO["conv_bn_relu"]
    calibrator = Calibrator(float_export(entry), "percentile_sym", percentage=99.9)
    calibrator.collect_data(samples(entry, 3))
    ranges = calibrator.compute_range()
    for suffix in (".json", ".yaml"):
        loaded = load_ranges(save_ranges(ranges, tmp_path / f"r{suffix}"))
        assert dict(loaded) == dict(ranges) and loaded.method == "percentile_sym" and loaded.percentile == 99.9
    (tmp_path / "bad.json").write_text('{"format": "torchq-ranges", "version": 1, "ranges": {"x": [2, 1]}}')
    with pytest.raises(ConfigError, match="min <= max"):
        load_ranges(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="not a torchq ranges file"):
        load_ranges(tmp_path / "other.json")


def test_uint8_input_takes_raw_pixels_and_int8_output():
    entry = ZOO["conv_bn_relu"]
    model = optimize_model(float_export(entry))
    rng = np.random.default_rng(0)
    pixels = [[rng.integers(0, 256, (2, 3, 16, 16)).astype(np.float32)] for _ in range(4)]
    calibrator = Calibrator(model, CalibrationMethod.MIN_MAX_ASYM)
    calibrator.collect_data(pixels)
    ranges = calibrator.compute_range()
    assert ranges["x"] == (0.0, 255.0)
    editor = ModelEditor(model)
    editor.convert_input_type(get_pure_input_names(model)[0], TensorType.UINT8)
    qdq = quantize(model, ranges)  # the request recorded on the float model is carried out
    assert qdq.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == "x" for n in qdq.graph.node)
    raw = rng.integers(0, 256, (2, 3, 16, 16)).astype(np.uint8)
    ref = run_onnx(model, {"x": raw.astype(np.float32)})[0]
    out = run_onnx(qdq, {"x": raw})[0]
    assert sqnr_db(ref, out) > 30

    ModelEditor(qdq).convert_output_type("y", TensorType.INT8)
    assert qdq.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.INT8
    meta = {p.key: p.value for p in qdq.metadata_props}
    q = run_onnx(qdq, {"x": raw})[0]
    assert q.dtype == np.int8
    deq = (q.astype(np.float32) - int(meta["torchq.output.y.zero_point"])) * float(meta["torchq.output.y.scale"])
    np.testing.assert_allclose(deq, out, atol=1e-6)


@pytest.mark.parametrize("name", ["unet", "transformer_block"])
def test_shapes_that_differ_from_sample_to_sample(name):
    entry = ZOO[name]
    dyn = {"x": {0: "b", 2: "h", 3: "w"}} if name == "unet" else {"x": {0: "b", 1: "t"}}
    model = float_export(entry, dynamic=dyn)
    rng = np.random.default_rng(1)
    shapes = [(1, 3, 16, 24), (2, 3, 32, 16), (1, 3, 8, 8)] if name == "unet" else [(1, 5, 32), (3, 17, 32), (2, 9, 32)]
    calibrator = Calibrator(model, CalibrationMethod.ENTROPY_ASYM)
    calibrator.collect_data([[rng.normal(size=s).astype(np.float32)] for s in shapes])
    qmodel = quantize(model, calibrator.compute_range())
    assert_valid(qmodel)
    x = rng.normal(size=shapes[1]).astype(np.float32)
    assert sqnr_db(run_onnx(model, {"x": x})[0], run_onnx(qmodel, {"x": x})[0]) > 20


def assert_same_statistics(a, b, name: str) -> None:
    """Histograms and counts identical; per-channel sums (float64 across items, statistics.ChannelSums)
    equal up to float64 rounding, which the order of adding items may change."""
    assert dataclasses.replace(a, channels=b.channels).to_dict() == b.to_dict(), name
    assert (a.channels.ndim, a.channels.sums.keys()) == (b.channels.ndim, b.channels.sums.keys()), name
    for axis, sums in a.channels.sums.items():
        np.testing.assert_allclose(sums, b.channels.sums[axis], rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_array_equal(a.channels.counts[axis], b.channels.counts[axis], err_msg=name)


@pytest.mark.parametrize("overlap", [True, False])
def test_stacking_and_cutting_runs_leaves_the_statistics_unchanged(monkeypatch, overlap):
    """Small samples are stacked into one onnxruntime run and large ones cut into several
    (about RUN_BYTES of activations each), each run computed while the previous one is binned
    (or, for runs too large to overlap, after it); the statistics equal those of one run per sample."""
    import onnx_backend.calibrator as calibrator_module

    if not overlap:
        monkeypatch.setattr(calibrator_module, "OVERLAP_MAX_BYTES", 0)

    entry = ZOO["unet"]
    model = float_export(entry, dynamic={"x": {0: "b", 2: "h", 3: "w"}})
    rng = np.random.default_rng(4)
    shapes = [(1, 3, 16, 16), (1, 3, 16, 16), (2, 3, 16, 16), (12, 3, 16, 16), (1, 3, 8, 24), (1, 3, 8, 24)]
    data = [[rng.normal(size=s).astype(np.float32)] for s in shapes]
    one_per_sample = Calibrator(model, quiet=True, batch_samples=False)
    one_per_sample.collect_data(data)

    calibrator = Calibrator(model, quiet=True)
    outputs = calibrator._session.run(calibrator._observed, {"x": data[0][0]})
    per_row = sum(o.nbytes * k for o, k in zip(outputs, calibrator._sizes_in_run))  # every activation, handed out or not
    monkeypatch.setattr(calibrator_module, "RUN_BYTES", 3 * per_row)  # three 16x16 rows per run
    runs = []
    run = calibrator._session.run
    monkeypatch.setattr(calibrator._session, "run", lambda names, feeds: runs.append(feeds["x"].shape[0]) or run(names, feeds))
    calibrator.collect_data(data)
    assert calibrator.samples == len(data)
    # First sample alone (it measures the activation size); the next three (15 rows) stacked and
    # cut into runs of 3 rows; the 8x24 samples, of a different shape, stacked together.
    assert runs == [1, 3, 3, 3, 3, 3, 2], runs
    for name, stats in one_per_sample.statistics.items():
        assert_same_statistics(calibrator.statistics[name], stats, name)


@pytest.mark.parametrize("name", ["transformer_block", "torch_encoder_layer", "flatten_linear", "conv_bn_relu", "residual"])
def test_tensors_made_from_others_get_the_statistics_observing_them_gives(monkeypatch, name):
    """Tensors a Reshape/Transpose/... makes from another hold its values, and a Relu's output is
    max(input, 0): the Calibrator has onnxruntime hand out only the sources, folds the others in
    from them, and gets the statistics and ranges that observing every tensor gives."""
    import onnx_backend.calibrator as calibrator_module

    entry = ZOO[name]
    model = float_export(entry)
    data = samples(entry, 4)
    derived = Calibrator(model, CalibrationMethod.ENTROPY_ASYM, quiet=True)
    folded = set(derived._aliases) | set(derived._relu_of.values())
    assert folded and not folded & set(derived._observed) and set(derived._relu_of) <= set(derived._observed)
    assert {n.op_type for n in model.graph.node if n.output[0] in folded} <= calibrator_module.VALUE_PRESERVING_OPS | {"Relu"}
    assert bool(derived._relu_of) == any(n.op_type == "Relu" for n in model.graph.node)
    assert sum(derived._sizes_in_run) == len(derived.tensors)  # runs are sized by every tensor, each once
    derived.collect_data(data)
    monkeypatch.setattr(calibrator_module, "value_sources", lambda model, tensors: {})
    every = Calibrator(model, CalibrationMethod.ENTROPY_ASYM, quiet=True)
    assert every._observed == every.tensors == derived.tensors
    every.collect_data(data)
    for tensor, stats in every.statistics.items():
        if tensor in derived._aliases:  # a Reshape/Transpose moved its channels: it keeps none
            assert not derived.statistics[tensor].channels.sums
            stats = dataclasses.replace(stats, channels=derived.statistics[tensor].channels)
        assert derived.statistics[tensor].to_dict() == stats.to_dict(), tensor
    assert derived.compute_range() == every.compute_range()


def test_several_inputs_and_outputs():
    entry = ZOO["two_in_two_out"]
    model = float_export(entry)
    calibrator = Calibrator(model, CalibrationMethod.SQNR_ASYM)
    calibrator.collect_data([dict(zip(entry.input_names, s)) for s in samples(entry, 4)])
    qmodel = quantize(model, calibrator.compute_range())
    assert_valid(qmodel)
    feeds = dict(zip(entry.input_names, samples(entry, 1, seed=3)[0]))
    for a, b in zip(run_onnx(model, feeds), run_onnx(qmodel, feeds)):
        assert sqnr_db(a, b) > 30


@pytest.mark.parametrize("opset", range(11, onnx.defs.onnx_opset_version() + 1))
def test_every_opset_from_11_to_the_newest(opset):
    entry = ZOO["residual"]
    base = float_export(entry, opset=11)
    model = base if opset == 11 else onnx.version_converter.convert_version(base, opset)
    calibrator = Calibrator(model, CalibrationMethod.MIN_MAX_ASYM)
    calibrator.collect_data(samples(entry, 2)) if opset <= 23 else None
    ranges = calibrator.compute_range() if opset <= 23 else {"x": (-4.0, 4.0)}
    qmodel = quantize(model, ranges)
    assert default_opset(qmodel) >= max(13, opset)
    assert_valid(qmodel)
    if opset <= 23:  # the newest opsets this onnxruntime runs
        x = samples(entry, 1, seed=7)[0][0]
        assert sqnr_db(run_onnx(model, {"x": x})[0], run_onnx(qmodel, {"x": x})[0]) > 30


def test_external_data(tmp_path):
    entry = ZOO["conv_bn_relu"]
    model = float_export(entry)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="weights.bin", size_threshold=0)
    assert (tmp_path / "weights.bin").is_file()
    calibrator = Calibrator(str(path), CalibrationMethod.MSE_ASYM)
    calibrator.collect_data(samples(entry, 2))
    assert_valid(quantize(str(path), calibrator.compute_range()))

    escaping = onnx.load(path, load_external_data=False)
    for t in escaping.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    onnx.save_model(escaping, tmp_path / "escape.onnx")
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        quantize(str(tmp_path / "escape.onnx"), {})


def test_invalid_inputs_are_clear_errors(tmp_path):
    good = float_export(ZOO["conv_bn_relu"]).SerializeToString()
    (tmp_path / "trunc.onnx").write_bytes(good[: len(good) // 2])
    (tmp_path / "text.onnx").write_text("hello")
    for bad in ("trunc.onnx", "text.onnx", "missing.onnx"):
        with pytest.raises(InvalidModelError, match=bad):
            Calibrator(str(tmp_path / bad))
    ints = helper.make_model(
        helper.make_graph([helper.make_node("Add", ["a", "a"], ["b"])], "g", [helper.make_tensor_value_info("a", onnx.TensorProto.INT64, [2])], [helper.make_tensor_value_info("b", onnx.TensorProto.INT64, [2])]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    with pytest.raises(InvalidModelError, match="no float32"):
        Calibrator(ints)
    with pytest.raises(InvalidModelError, match="no float32"):
        quantize(ints, {})


def test_bad_calibration_data_is_a_clear_error():
    entry = ZOO["conv_bn_relu"]
    calibrator = Calibrator(float_export(entry))
    with pytest.raises(CalibrationError, match="empty"):
        calibrator.collect_data([])
    with pytest.raises(CalibrationError, match=r"input 'x'.*shape \[2, 4, 16, 16\]"):
        calibrator.collect_data([[np.zeros((2, 4, 16, 16), np.float32)]])
    with pytest.raises(CalibrationError, match="dtype int64"):
        calibrator.collect_data([[np.zeros((2, 3, 16, 16), np.int64)]])
    with pytest.raises(CalibrationError, match=r"tensor 'x' holds NaN on calibration sample 0"):
        calibrator.collect_data([[np.full((2, 3, 16, 16), np.nan, np.float32)]])
    with pytest.raises(CalibrationError, match="no calibration data collected"):
        calibrator.compute_range()


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torchq", *args], capture_output=True, text=True, cwd=cwd, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})


def test_cli_calibrate_then_quantize_onnx(tmp_path):
    entry = ZOO["inception"]
    onnx.save(float_export(entry), tmp_path / "f.onnx")
    np.savez(tmp_path / "cal.npz", x=np.concatenate([s[0] for s in samples(entry, 4)]))
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, s in enumerate(samples(entry, 3)):
        np.save(folder / f"{i}.npy", s[0])
    r = _cli("calibrate", str(tmp_path / "f.onnx"), "--data", str(tmp_path / "cal.npz"), "--batch-size", "2", "--method", "percentile_asym", "-o", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert load_ranges(tmp_path / "r.json").method == "percentile_asym"
    r = _cli("quantize-onnx", str(tmp_path / "f.onnx"), "--ranges", str(tmp_path / "r.json"), "-o", str(tmp_path / "q1.onnx"))
    assert r.returncode == 0 and "all rules hold" in r.stdout, r.stderr
    r = _cli("quantize-onnx", str(tmp_path / "f.onnx"), "--data", str(folder), "--method", "mse_sym", "-o", str(tmp_path / "q2.onnx"), "--report", str(tmp_path / "rep.json"))
    assert r.returncode == 0, r.stderr
    for q in ("q1.onnx", "q2.onnx"):
        assert_valid(onnx.load(tmp_path / q))


def test_cli_errors_exit_2_and_write_nothing(tmp_path):
    entry = ZOO["inception"]
    onnx.save(float_export(entry), tmp_path / "f.onnx")
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 5, 16, 16), np.float32))
    (tmp_path / "bad.onnx").write_bytes(b"\x08\x07garbage")
    cases = [
        ("quantize-onnx", str(tmp_path / "bad.onnx"), "--data", str(tmp_path / "wrong.npz"), "-o", str(tmp_path / "o.onnx")),
        ("quantize-onnx", str(tmp_path / "f.onnx"), "--data", str(tmp_path / "wrong.npz"), "-o", str(tmp_path / "o.onnx")),
        ("quantize-onnx", str(tmp_path / "f.onnx"), "--data", str(tmp_path / "nothing"), "-o", str(tmp_path / "o.onnx")),
        ("quantize-onnx", str(tmp_path / "f.onnx"), "--data", str(tmp_path / "wrong.npz"), "--method", "kl", "-o", str(tmp_path / "o.onnx")),
    ]
    for args in cases:
        r = _cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr and r.stderr.strip()
        assert not (tmp_path / "o.onnx").exists()


def test_models_too_large_for_protobuf_are_written_with_external_data(tmp_path, monkeypatch):
    from onnx_backend import model_io

    monkeypatch.setattr(model_io, "EXTERNAL_DATA_THRESHOLD", 1000)  # pretend the model is over 2 GB
    model = float_export(ZOO["conv_bn_relu"])
    model_io.save_model(model, tmp_path / "big.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    reloaded = model_io.load_model(tmp_path / "big.onnx")
    assert [numpy_helper.to_array(t).tobytes() for t in reloaded.graph.initializer] == [numpy_helper.to_array(t).tobytes() for t in model.graph.initializer]


def test_convert_activation_dtype_keeps_every_value_and_round_trips():
    class WithConstant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def forward(self, x):
            return torch.relu(self.conv(x)) + torch.linspace(-1.0, 2.0, 16).reshape(1, 1, 4, 4)

    model = torchq.prepare(WithConstant().eval(), target=None)
    xs = [torch.randn(2, 3, 4, 4) for _ in range(3)]
    torchq.calibrate(model, xs)
    q8 = torchq.export(model, xs[0], dynamo=False, input_names=["x"])
    torchq.unprepare(model)
    original = q8.SerializeToString()
    qu8 = onnx.ModelProto()
    qu8.CopyFrom(q8)
    ModelEditor(qu8).convert_activation_dtype(TensorType.UINT8)
    inits = {t.name: numpy_helper.to_array(t) for t in qu8.graph.initializer}
    assert {v.dtype for k, v in inits.items() if k.endswith("weight_quantized")} == {np.dtype(np.int8)}
    assert {v.dtype for k, v in inits.items() if k.endswith("_zero_point") and "weight" not in k and v.dtype.itemsize == 1} == {np.dtype(np.uint8)}
    assert any(v.dtype == np.uint8 and v.size == 16 for v in inits.values())  # the constant's codes moved too
    assert_valid(qu8)
    x = xs[1].numpy()
    # the same grid: onnxruntime runs the int8 model partly in float and the uint8 one fused,
    # so the outputs differ by at most one step of the output's scale
    out_dq = next(n for n in qu8.graph.node if n.op_type == "DequantizeLinear" and n.output[0] == qu8.graph.output[0].name)
    step = float(inits[out_dq.input[1]])
    assert np.max(np.abs(run_onnx(qu8, {"x": x})[0] - run_onnx(q8, {"x": x})[0])) <= step * 1.001
    ModelEditor(qu8).convert_activation_dtype(TensorType.INT8)
    assert qu8.SerializeToString() == original


def test_rewritten_batchnorm_and_spatial_mean_are_quantized():
    """The backend's own rewrites (standalone BatchNorm -> Mul + Add, mean over H and W ->
    GlobalAveragePool + Squeeze) leave typed float activations that get ranges and run in int8."""
    import npu

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3)
            self.bn = torch.nn.BatchNorm2d(8)
            self.fc = torch.nn.Linear(8, 4)

        def forward(self, x):
            y = torch.relu(self.conv(x))
            return self.fc(self.bn(y + 1.0).mean((2, 3)))  # the Add keeps the BatchNorm standalone

    model = Head().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(1, 3, 10, 10)
    buf = io.BytesIO()
    torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17, input_names=["x"])
    optimized = optimize_model(onnx.load_from_string(buf.getvalue()))
    assert {"Mul", "GlobalAveragePool", "Squeeze"} <= {n.op_type for n in optimized.graph.node}
    calibrator = Calibrator(optimized, CalibrationMethod.MSE_ASYM, quiet=True)
    calibrator.collect_data([[torch.randn(1, 3, 10, 10).numpy()] for _ in range(8)])
    qmodel = quantize(optimized, calibrator.compute_range(), target="warboy")
    assert_valid(qmodel)
    host = [r.op_type for r in npu.check(qmodel, target="warboy").host_nodes]
    assert host == ["Gemm"], host  # only the Linear head writing the model output (planner rule 8)
    with torch.no_grad():
        assert sqnr_db(model(x).numpy(), run_onnx(qmodel, {"x": x.numpy()})[0]) > 25
    prepared = torchq.prepare(model, torchq.QuantConfig(target="warboy"))  # and the PyTorch path
    torchq.calibrate(prepared, [torch.randn(1, 3, 10, 10) for _ in range(8)])
    qmodel = torchq.export(prepared, (x,))
    torchq.unprepare(model)
    host = [r.op_type for r in npu.check(qmodel, target="warboy").host_nodes]
    assert host == ["Gemm"], host


def test_relu6_after_a_host_conv_is_the_quantize_step_of_its_output():
    """A depthwise Conv past warboy's group limit (144 > 128) runs on the host; its ReLU6 is
    absorbed into the quantize step after it (lo = 0 is the clamp), so the graph holds no Clip and
    no DequantizeLinear -> QuantizeLinear requantization, and the tensor is the clamped one."""
    from onnx_backend import quantize_with_report

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.depthwise = torch.nn.Conv2d(144, 144, 3, padding=1, groups=144)
            self.pointwise = torch.nn.Conv2d(144, 8, 1)

        def forward(self, x):
            return self.pointwise(torch.nn.functional.relu6(self.depthwise(x)))

    torch.manual_seed(0)
    model = Block().eval()
    xs = [torch.randn(1, 144, 6, 6) for _ in range(8)]
    buf = io.BytesIO()
    torch.onnx.export(model, (xs[0],), buf, dynamo=False, opset_version=17, input_names=["x"], output_names=["y"])
    float_model = onnx.load_from_string(buf.getvalue())
    calibrator = Calibrator(float_model, CalibrationMethod.MIN_MAX_ASYM, quiet=True)
    calibrator.collect_data([[x.numpy()] for x in xs])
    qmodel, report = quantize_with_report(float_model, calibrator.compute_range(), target="warboy")
    assert_valid(qmodel)
    assert any("groups must be <= 128" in why for why in report.float_nodes.values()), report.float_nodes
    assert len(report.plan.absorbed) == 1, report.plan.absorbed
    ops = [n.op_type for n in qmodel.graph.node]
    assert "Clip" not in ops
    producers = {o: n for n in qmodel.graph.node for o in n.output}
    host_conv = next(n for n in qmodel.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i == 144 for a in n.attribute))
    q_after = [n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == host_conv.output[0]]
    assert len(q_after) == 1  # the host Conv's output is quantized once, straight into the ReLU6's grid
    assert not [n for n in qmodel.graph.node if n.op_type == "QuantizeLinear" and producers.get(n.input[0]) is not None and producers[n.input[0]].op_type == "DequantizeLinear"]
    zero = next(numpy_helper.to_array(t) for t in qmodel.graph.initializer if t.name == q_after[0].input[2])
    assert int(zero) == -128  # lo = 0 sits at qmin: every negative value saturates to exactly 0.0
    with torch.no_grad():
        assert sqnr_db(model(xs[0]).numpy(), run_onnx(qmodel, {"x": xs[0].numpy()})[0]) > 25
