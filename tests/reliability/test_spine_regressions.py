"""Regression tests for the spine bugs the reliability properties and the fuzzer found.

Each test names the bug it pins; docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from onnx_backend import assert_valid, quantize_with_report
from onnx_backend import qmath
from onnx_backend.statistics import TensorStatistics
from tests.conftest import run_onnx
from torchq.observer import Observer

F32_MAX = float(np.finfo(np.float32).max)


def test_negative_value_whose_scaled_bin_underflows_lands_in_bin_minus_one():
    # Bug: with bins 2**e wide (e > 0), x * 2**-e underflows to -0.0 for a tiny negative x, so
    # floor() put it in bin 0 while the exact bin is -1: TensorStatistics.update crashed with a
    # broadcast error and the torch observer built a different histogram.
    x = np.array([-1e35, -1e-40], np.float32)  # -1e35: large, below the mask values (statistics.MASK_MAGNITUDE)
    s = TensorStatistics()
    s.update(x)
    assert s.counts.sum() == 2 and s.counts[-1] == 1  # the tiny value is in the last bin, -1
    assert s.offset + s.counts.size == 0
    obs = Observer("k", 4096)
    obs.update(torch.from_numpy(x))
    assert obs.to_statistics().to_dict() == s.to_dict()
    halves = TensorStatistics()
    halves.update(x[1:])
    halves.update(x[:1])
    assert halves.to_dict() == s.to_dict()


def test_range_reaching_float32_max_dequantizes_to_finite_values():
    # Bug: the float32 scale of [-max, max] rounded so that code -128 dequantized to -inf.
    for lo, hi, sym in ((-F32_MAX, F32_MAX, False), (-F32_MAX, F32_MAX, True), (0.0, F32_MAX, False)):
        p = qmath.activation_params(lo, hi, symmetric=sym)
        assert np.all(np.isfinite(qmath.dequantize(np.arange(-128, 128, dtype=np.int8), p)))
    w = qmath.weight_params(np.array([[F32_MAX, -F32_MAX]], np.float32), 0)
    assert np.all(np.isfinite(qmath.dequantize(np.array([[127, -127]], np.int8), w)))


def _conv(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    c = weight.shape[0]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, weight.shape[1], 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c, 4, 4])],
        [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_bias_scale_is_exactly_input_times_weight_even_below_min_scale():
    # Bug: bias_params clamped input scale x weight scale up to 2**-63, so tiny (but normal)
    # products broke the spec rule and the validator flagged our own output.
    model = _conv(np.full((2, 1, 1, 1), 1e-8, np.float32), np.array([1e-18, -1e-18], np.float32))
    q, report = quantize_with_report(model, {"x": (0.0, 1e-10), "y": (-1e-17, 1e-17)}, optimize=False)
    assert "conv" not in report.float_nodes
    assert_valid(q)


def test_bias_too_large_for_its_input_scale_keeps_the_layer_float():
    # Bug: no float32 weight scale can keep this bias inside int32 at this input scale; the
    # planner crashed with "scales must be positive and finite" (CLI exit 1). Now the layer
    # stays float and the report says why.
    model = _conv(np.ones((1, 1, 1, 1), np.float32), np.array([3e38], np.float32))
    q, report = quantize_with_report(model, {"x": (0.0, 1e-30), "y": (0.0, 3.4e38)}, optimize=False)
    assert "int32 bias" in report.float_nodes["conv"]
    assert_valid(q)
    x = np.zeros((1, 1, 4, 4), np.float32)
    (y,) = run_onnx(q, {"x": x})
    assert np.all(np.isfinite(y))


# ---- load checks (onnx_backend/model_io.py) -----------------------------------------------------


def _base():
    from tests.reliability import hostile

    return hostile


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("weight_dtype_lies", r"initializer 'w1' declares double"),  # crashed numpy in the planner/validator (exit 1)
        ("weight_bytes_short", r"initializer 'w2' declares float"),
        ("enormous_initializer_dims", r"initializer 'wf' declares float of shape \[1099511627776"),
        ("future_opset", r"opset 999 is newer"),  # quantized with exit 0 into a model nothing can load
        ("duplicate_output_name", r"tensor 'r1' is written by more than one node"),
        ("empty_graph", r"graph output 'y' is not produced by any node"),  # onnx printed to stderr first
        ("no_outputs", r"the graph has no outputs"),  # exit 0 with a model onnxruntime cannot load
    ],
)
def test_load_model_refuses_lying_models(name, message):
    from onnx_backend import InvalidModelError, load_model

    with pytest.raises(InvalidModelError, match=message):
        load_model(_base().HOSTILE_MODELS[name]())


@pytest.mark.parametrize("name", ["int_weights", "string_input", "unknown_op", "bad_attribute"])
def test_invalid_input_is_blamed_not_reported_as_internal_error(name):
    # Bug: the checker failure on the *output* was reported as "internal error: the quantized
    # model does not pass onnx.checker" although the input was the invalid one.
    from onnx_backend import InvalidModelError, quantize

    with pytest.raises(InvalidModelError, match=r"^the model is not valid ONNX: ") as info:
        quantize(_base().HOSTILE_MODELS[name](), {k: tuple(v) for k, v in _base().base_ranges().items()})
    assert "internal error" not in str(info.value) and "\n" not in str(info.value)


# ---- ranges files (onnx_backend/calibrator.py) --------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "text"),
    [
        (".yaml", "format: torchq-ranges\nversion: 1\nranges:\n  x: [.nan, 1.0]\n"),  # ValueError deep in qmath (exit 1)
        (".yaml", "format: torchq-ranges\nversion: 1\nranges:\n  x: [-.inf, 1.0]\n"),
        (".yaml", "format: torchq-ranges\nversion: 1\nranges:\n  x: [-1.0e+300, 1.0e+300]\n"),
        (".json", '{"format": "torchq-ranges", "version": 1, "ranges": {"x": [NaN, 1]}}'),
        (".json", '{"format": "torchq-ranges", "version": 1, "ranges": {"x": [false, true]}}'),
    ],
)
def test_ranges_must_be_finite_float32_numbers(tmp_path, suffix, text):
    from onnx_backend import ConfigError, load_ranges

    path = tmp_path / f"r{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=r"tensor 'x' must be \[min, max\] of finite float32 numbers"):
        load_ranges(path)


def test_deeply_nested_or_billion_laughs_ranges_are_quick_clear_errors(tmp_path):
    import time

    from onnx_backend import ConfigError, load_ranges

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)  # RecursionError (exit 1) before
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_ranges(deep)
    laughs = tmp_path / "laughs.yaml"
    laughs.write_text(
        "format: torchq-ranges\nversion: 1\na: &a [1,1,1,1,1,1,1,1,1]\n"
        + "".join(f"{b}: &{b} [{', '.join(['*' + a] * 9)}]\n" for a, b in zip("abcdefg", "bcdefgh"))
        + "ranges: {x: *h}\n"
    )
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="tensor 'x' must be"):
        load_ranges(laughs)  # the error message repr'd 43 million values (26 s) before
    assert time.perf_counter() - start < 5


def test_onnxruntime_errors_are_not_logged_to_stderr(capfd):
    # Bug: onnxruntime logged its own error line to fd 2 before torchq's one-line error.
    from onnx_backend import CalibrationError, Calibrator

    model = _base().HOSTILE_MODELS["wrong_kernel_shape"]()
    calibrator = Calibrator(model, quiet=True)
    with pytest.raises(CalibrationError, match="onnxruntime failed on calibration sample 0"):
        calibrator.collect_data([[np.zeros((1, 3, 8, 8), np.float32)]])
    assert capfd.readouterr().err == ""


# ---- calibration data files (torchq/commands/_common.py) ----------------------------------------


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"PK\x03\x04 truncated", r"not a readable \.npz file"),  # zipfile.BadZipFile (exit 1) before
        ("scalar", r"samples along axis 0"),  # TypeError: len() of unsized object (exit 1) before
        ("npy", r"one array, not an \.npz archive"),  # TypeError from `with ndarray` (exit 1) before
    ],
)
def test_unreadable_calibration_files_are_clear_errors(tmp_path, content, message):
    from onnx_backend import CalibrationError
    from torchq.commands._common import iter_samples

    path = tmp_path / "cal.npz"
    if content == "scalar":
        np.savez(path, x=np.float32(1))
    elif content == "npy":
        np.save(tmp_path / "a.npy", np.zeros((2, 3), np.float32))
        (tmp_path / "a.npy").rename(path)
    else:
        path.write_bytes(content)
    with pytest.raises(CalibrationError, match=message):
        list(iter_samples(str(path), ["x"]))


def test_cli_prints_a_multi_line_error_on_one_line():
    from torchq.cli import one_line

    assert one_line(ValueError("first\n\n  second  \nthird")) == "first; second; third"


# ---- found by the fuzzer (tests/reliability/fuzz.py) -------------------------------------------


def _ranges():
    return {k: tuple(v) for k, v in _base().base_ranges().items()}


def _attention_ranges():
    from onnx_backend import Calibrator

    c = Calibrator(_base().attention_model(), "min_max_asym", quiet=True)
    c.collect_data([[np.random.default_rng(i).normal(size=(1, 4, 8)).astype(np.float32)] for i in range(3)])
    return c.compute_range()


def _node_of(m, name):
    return next(n for n in m.graph.node if n.name == name)


def test_unsorted_graph_is_sorted_on_load():
    # Bug: with the nodes out of topological order, shape inference and the optimizer saw
    # unknown inputs, and the planner quantized out_proj's weight as an asymmetric constant.
    from onnx_backend import load_model, quantize

    m = _base().attention_model()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(nodes[i] for i in np.random.default_rng(0).permutation(len(nodes)))
    loaded = load_model(m)
    seen = {"x"} | {t.name for t in loaded.graph.initializer}
    for n in loaded.graph.node:
        assert all(i in seen for i in n.input)
        seen.update(n.output)
    assert_valid(quantize(m, _attention_ranges()))
    # A caller that only reads the model (the Calibrator) gets it itself, or a sorted copy: the
    # user's unsorted model is not sorted in place.
    before = m.SerializeToString(deterministic=True)
    assert load_model(m, copy=None) is not m and m.SerializeToString(deterministic=True) == before
    assert load_model(loaded, copy=None) is loaded


def test_names_that_are_not_utf8_are_refused():
    # Bug: a node name with invalid UTF-8 crashed onnx_ir's serializer (SerdeError, exit 1).
    from onnx_backend import InvalidModelError, load_model

    data = _base().base_model().SerializeToString().replace(b"conv2", b"conv\xe5")
    with pytest.raises(InvalidModelError, match="not valid UTF-8"):
        load_model(data)


def test_reshape_of_a_constant_shares_the_constant_scale():
    # Bug: Reshape(constant) got its output's own scale while its input constant got another:
    # the same-scale rule broke in our own output (exit 0, spec violation).
    from onnx_backend import quantize

    m = _base().attention_model()
    _node_of(m, "split_heads").input[0] = "wq"
    m.graph.initializer.append(numpy_helper.from_array(np.array([1, 4, 2, 8], np.int64), "shape_w"))
    _node_of(m, "split_heads").input[1] = "shape_w"
    _node_of(m, "heads_first").input[0] = "q4"
    model = onnx.helper.make_model(m.graph, opset_imports=m.opset_import)
    ranges = dict(_attention_ranges())
    ranges["q4"] = (-3.0, 3.0)
    q = quantize(model, ranges)
    assert_valid(q)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (lambda m: _node_of(m, "fc").input.__setitem__(2, "p"), "bias is not a constant"),  # activation as Gemm bias
        (lambda m: _set_values(m, "bf", np.nan), "holds Inf/NaN"),  # NaN bias (crash or asymmetric weight before)
        (lambda m: _set_values(m, "w1", np.inf), "holds Inf/NaN"),
    ],
)
def test_layers_whose_weights_or_bias_cannot_be_int8_stay_float(edit, reason):
    from onnx_backend import quantize_with_report

    m = _base().base_model()
    edit(m)
    # the head writing the model output would stay float anyway (planner rule 8): off, so the
    # reason asserted is the weight's or bias's own
    q, report = quantize_with_report(m, _ranges(), optimize=False, float_output_layers=False)
    assert any(reason in why for why in report.float_nodes.values()), report.float_nodes
    assert_valid(q)


def _set_values(m, name, value):
    t = _init_of(m, name)
    a = numpy_helper.to_array(t).copy()
    a.flat[0] = value
    t.CopyFrom(numpy_helper.from_array(a, name))


def _init_of(m, name):
    return next(t for t in m.graph.initializer if t.name == name)


def test_matmul_with_a_vector_weight_stays_float():
    # Bug: MatMul(x, constant 1-D) had its constant quantized asymmetrically; the validator
    # (rightly) reads a constant MatMul operand as a weight.
    from onnx_backend import quantize_with_report

    m = _base().attention_model()
    _node_of(m, "q_bias").op_type = "MatMul"  # q0 @ bq, bq of shape (8,)
    q, report = quantize_with_report(m, _attention_ranges(), target=None)
    assert "not a float32 matrix" in report.float_nodes["q_bias"]
    assert_valid(q)


def test_clip_with_tensor_bounds_is_not_absorbed():
    # Bug: clip_bounds called float() on a matrix (TypeError, exit 1).
    from onnx_backend import quantize

    m = _base().attention_model()
    n = _node_of(m, "q_mm")
    n.op_type = "Clip"  # Clip(x, min=wq): a matrix bound
    assert_valid(quantize(m, _attention_ranges(), target=None))


def test_bias_length_that_does_not_match_the_channels_is_a_clear_error():
    # Bug: a 5-value bias on a 4-channel Conv (ONNX's checker accepts it) crashed with a numpy
    # broadcast error in the int32 bias guard (exit 1).
    from onnx_backend import InvalidModelError, quantize

    m = _base().base_model()
    _node_of(m, "conv2").input[2] = "bf"
    with pytest.raises(InvalidModelError, match=r"node 'conv2': its bias has 5 values for 4 output channels"):
        quantize(m, _ranges())


def test_two_flattens_of_one_tensor():
    # Bug (onnxscript 0.7.2): folding two Flattens of one tensor left the second Reshape's shape
    # constant unregistered; the output failed onnx.checker ("internal error").
    from onnx import TensorProto, helper

    from onnx_backend import quantize

    nodes = [
        helper.make_node("Relu", ["x"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f1"], axis=1),
        helper.make_node("Flatten", ["p"], ["f2"], axis=2),
        helper.make_node("Relu", ["f1"], ["y1"]),
        helper.make_node("Relu", ["f2"], ["y2"]),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])],
        [helper.make_tensor_value_info("y1", TensorProto.FLOAT, [1, 24]), helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 12])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert_valid(quantize(model, {k: (0.0, 1.0) for k in ("p", "f1", "f2", "y1", "y2")} | {"x": (-1.0, 1.0)}))


def test_model_inconsistent_once_folded_is_blamed():
    # A 1-D constant pooled into the Gemm: ONNX's checker accepts the float model, folding
    # exposes the shape mismatch. It was "internal error" (exit 2); a real torchq bug is now a
    # RuntimeError (exit 1), an inconsistent input a clear InvalidModelError.
    from onnx_backend import InvalidModelError, quantize

    m = _base().base_model()
    _node_of(m, "pool").input[0] = "bf"
    with pytest.raises(InvalidModelError, match="inconsistent once its constants are folded"):
        quantize(m, _ranges())


def test_validator_reports_malformed_qdq_instead_of_crashing():
    # Bugs: IndexError on a Q/DQ node without its scale input; a broadcast error on a
    # per-channel activation scale feeding a biased Conv.
    from onnx_backend import quantize, validate

    q = quantize(_base().base_model(), _ranges())
    del _node_of(q, "r1_DequantizeLinear").input[1:]
    assert validate(q)  # violations, no exception
    q = quantize(_base().base_model(), _ranges())
    _node_of(q, "r1_DequantizeLinear").input[1] = "w2_scale"  # 4 per-channel scales on an activation
    assert any(v.rule == "bias" and "not per-tensor" in v.message for v in validate(q))


@pytest.mark.parametrize("scale", [0.0, -1.0, np.nan, np.inf])
def test_simulator_refuses_bad_scales_clearly(scale):
    # Bug (npu): a zero / negative / NaN / inf Q/DQ scale crashed the simulator with ValueError or
    # ZeroDivisionError (exit 1).
    from onnx_backend import InvalidModelError, quantize
    from npu import Simulator

    q = quantize(_base().base_model(), _ranges())
    t = next(t for t in q.graph.initializer if t.name == "p_scale")
    t.CopyFrom(numpy_helper.from_array(np.array(scale, np.float32), "p_scale"))
    with pytest.raises(InvalidModelError, match="scale must be positive and finite"):
        Simulator(q, None)


def test_simulator_refuses_a_zero_point_shaped_unlike_its_scale():
    # Bug (npu, fuzz seed 36): a bias DQ with a scalar scale and a 4-value zero point crashed
    # the simulator in QParams.broadcast (exit 1).
    from onnx_backend import InvalidModelError, quantize
    from npu import Simulator

    q = quantize(_base().base_model(), _ranges())
    _node_of(q, "b2_DequantizeLinear").input[1] = "r1_scale"
    with pytest.raises(InvalidModelError, match="zero point shape \\[4\\] differs from scale shape \\[\\]"):
        Simulator(q, None)


def test_cli_blames_an_invalid_model_for_a_crash(tmp_path):
    import argparse

    from torchq.cli import invalid_model_input

    m = _base().HOSTILE_MODELS["unknown_op"]()
    path = tmp_path / "m.onnx"
    path.write_bytes(m.SerializeToString())
    assert "not valid ONNX (onnx.checker)" in invalid_model_input(argparse.Namespace(model=str(path)))
    path.write_bytes(_base().base_model().SerializeToString())
    assert invalid_model_input(argparse.Namespace(model=str(path))) is None


def test_calibrator_reports_contradicting_types_clearly():
    # Bug: an int64 constant declared as a float graph output made shape inference raise
    # InferenceError out of Calibrator (exit 1).
    from onnx import TensorProto, helper

    from onnx_backend import Calibrator, InvalidModelError

    m = _base().attention_model()
    m.graph.output.append(helper.make_tensor_value_info("shape3", TensorProto.FLOAT, None))
    with pytest.raises(InvalidModelError, match="shape inference fails on the model"):
        Calibrator(m)


def test_calibrate_accepts_data_whose_len_raises():
    # Bug: torchq.calibrate called len() on anything with __len__; the recipe runner's wrapper
    # defines it around generators, so a generator loader failed with "the model raised
    # TypeError ... object of type 'generator' has no len()" (the model was not at fault).
    import torchq
    from tests.reliability.recipe_targets import tiny_loader, tiny_model

    class Unsized:
        def __len__(self):
            raise TypeError("no len")

        def __iter__(self):
            return iter(tiny_loader())

    model = tiny_model()
    torchq.prepare(model)
    try:
        assert torchq.calibrate(model, Unsized()) == 2
    finally:
        torchq.unprepare(model)


# ---- memory (found by bench/scale.py on a 110 M-parameter model) --------------------------------


def test_optimizing_a_model_keeps_nothing_of_it_alive():
    # onnxscript's module-level pattern matchers kept their last match, hence the whole last
    # optimized model (420 MB for ConvNeXt-B) after optimize_model returned.
    import gc

    import onnx_ir as ir

    from onnx_backend import optimize_model

    model = _base().attention_model()
    model.graph.name = "torchq_leak_probe"
    out = optimize_model(model)
    del out
    gc.collect()
    assert not [o for o in gc.get_objects() if isinstance(o, ir.Graph) and o.name == "torchq_leak_probe"]


def test_shape_inference_on_a_skeleton_matches_onnx():
    # onnx.shape_inference.infer_shapes held three copies of the model at once (1.2 GB).
    from onnx_backend import model_io

    m = _base().attention_model()
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((300, 300), np.float32), "unused_big"))  # > the data limit
    full = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    light = model_io.infer_shapes(m, data_prop=True)
    assert {v.name: v.type for v in light.graph.value_info} == {v.name: v.type for v in full.graph.value_info}
    assert next(t for t in light.graph.initializer if t.name == "unused_big").data_location == onnx.TensorProto.EXTERNAL
    merged = model_io.merge_inferred(m, light)
    assert len(merged.graph.value_info) == len(full.graph.value_info)


def test_calibrator_session_takes_the_weights_as_arrays(monkeypatch):
    # The session is built from the model's skeleton plus its weights as arrays (no serialized
    # copy of the whole model); the extra outputs go on the skeleton, and the model, which the
    # Calibrator keeps without copying it, is left as it was.
    from onnx_backend import Calibrator, model_io

    model = _base().base_model()
    before = model.SerializeToString(deterministic=True)
    samples = [[x[None]] for x in _base().calibration_arrays(3)]
    split = model_io.split_weights
    handed = []
    monkeypatch.setattr(model_io, "split_weights", lambda m: handed.append(split(m)) or handed[-1])
    monkeypatch.setattr(model_io, "_held_in_memory", lambda t: False)  # the whole model serialized
    reference = Calibrator(model, "mse_asym", quiet=True)
    reference.collect_data(samples)
    monkeypatch.undo()
    monkeypatch.setattr(model_io, "split_weights", lambda m: handed.append(split(m)) or handed[-1])
    monkeypatch.setattr(model_io, "INFERENCE_DATA_LIMIT", 0)  # every initializer as an array
    shared = Calibrator(model, "mse_asym", quiet=True)
    assert handed[0][1] == {} and set(handed[1][1]) == {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    shared.collect_data(samples)
    assert shared.model is model and model.SerializeToString(deterministic=True) == before
    assert shared.compute_range() == reference.compute_range()
    assert Calibrator(model, "mse_asym", quiet=True, copy_model=True).model is not model
    # Large weights go through a temporary file onnxruntime maps; the folder is gone afterwards.
    import tempfile

    from onnx_backend import calibrator

    monkeypatch.setattr(calibrator, "SESSION_FROM_FILE_BYTES", 0)
    before_files = set(__import__("os").listdir(tempfile.gettempdir()))
    mapped = Calibrator(model, "mse_asym", quiet=True)
    assert set(__import__("os").listdir(tempfile.gettempdir())) == before_files
    mapped.collect_data(samples)
    assert mapped.compute_range() == reference.compute_range()


def test_split_weights_gives_onnxruntime_the_same_model():
    import onnxruntime as ort

    from onnx_backend import model_io

    model = _base().base_model()
    # Large initializers: two read by a node (one of them int64), one read by none (onnxruntime
    # drops those before taking the arrays, then fails to find it: it stays in the skeleton).
    model.graph.initializer.append(numpy_helper.from_array(np.full(300 * 300, 0.5, dtype=np.float32), "big"))
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 300 * 300], dtype=np.int64).repeat(10_000), "big_int"))
    model.graph.initializer.append(numpy_helper.from_array(np.zeros(300 * 300, dtype=np.float32), "unread"))
    y = model.graph.output[0].name
    model.graph.node.extend([
        onnx.helper.make_node("ReduceMax", ["big"], ["big_max"], keepdims=0),
        onnx.helper.make_node("ReduceMax", ["big_int"], ["big_int_max"], keepdims=0),
        onnx.helper.make_node("Cast", ["big_int_max"], ["big_int_maxf"], to=onnx.TensorProto.FLOAT),
        onnx.helper.make_node("Add", ["big_max", "big_int_maxf"], ["offset"]),
        onnx.helper.make_node("Add", [y, "offset"], ["y_offset"]),
    ])
    model.graph.output[0].name = "y_offset"
    before = model.SerializeToString(deterministic=True)
    skeleton, weights = model_io.split_weights(model)
    assert sorted(weights) == ["big", "big_int"]  # the large ones read; small ones stay in the skeleton
    for name, value in weights.items():
        np.testing.assert_array_equal(value, numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name)))
    assert skeleton.ByteSize() < 2 * 300 * 300 * 4 and model.SerializeToString(deterministic=True) == before
    options = ort.SessionOptions()
    options.add_external_initializers(list(weights), [ort.OrtValue.ortvalue_from_numpy(w) for w in weights.values()])
    x = _base().calibration_arrays(1)[0][None]
    (got,) = ort.InferenceSession(skeleton.SerializeToString(), options).run(None, {"x": x})
    (want,) = ort.InferenceSession(before).run(None, {"x": x})
    np.testing.assert_array_equal(got, want)


def test_consumed_input_gives_the_same_model():
    from onnx_backend import quantize_with_report

    a, _ = quantize_with_report(_base().base_model(), _ranges())
    b, _ = quantize_with_report(_base().base_model(), _ranges(), consume_input=True)
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


@pytest.mark.parametrize("name", ["int_weights", "string_input", "unknown_op", "bad_attribute", "double_input", "huge_constant_of_shape", "wrong_op_type"])
def test_check_without_data_catches_what_the_full_check_catches(name):
    # The quantizer checks its output with check_without_data (the full check copied the
    # model several times); it must refuse what onnx.checker's full check refuses.
    from onnx_backend.model_io import check_without_data

    m = _base().HOSTILE_MODELS[name]()
    m.graph.initializer.append(numpy_helper.from_array(np.zeros((300, 300), np.float32), "big"))  # a skeleton stub
    with pytest.raises(Exception):
        onnx.checker.check_model(m, full_check=True)
    with pytest.raises(Exception):
        check_without_data(m)
    good = _base().base_model()
    good.graph.initializer.append(numpy_helper.from_array(np.zeros((300, 300), np.float32), "big"))
    check_without_data(good)
