"""npu.compare finds where the simulator and onnxruntime part ways; the three CLI commands."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

import npu
from npu.compare import Comparator
from tests.npu.zoo_models import zoo_feeds
from tests.npu.qdq_models import conv_unit
from torchq.cli import main


def test_compare_attributes_a_divergence_to_the_node_that_makes_it(quantized_zoo):
    """TFLite's double rounding (the gemmlowp reference) flips near-tie results of Conv and
    MatMul: the local mode (each node fed onnxruntime's inputs) blames a MatMul, never the
    data-movement ops downstream that only inherit the difference."""
    model = quantized_zoo("transformer_block", True, None)
    c = Comparator(model, None, rounding="double")
    for seed in (123, 124, 125):
        c.add(zoo_feeds("transformer_block", seed))
    report = c.report
    assert not report.agrees
    assert report.first_local_divergent.op_type in ("MatMul", "Gemm")
    movers = [t for t in report.tensors if t.op_type in ("Reshape", "Transpose", "Split")]
    assert movers and all(t.local_identical == t.elements for t in movers)
    assert any(t.identical < t.elements for t in movers)  # ... though they differ end to end
    text = report.to_text()
    assert "DIVERGES" in text and f"'{report.first_divergent.tensor}'" in text
    single = npu.compare(model, zoo_feeds("transformer_block"), None)
    assert single.agrees and single.first_divergent is None


def test_compare_report_json_round_trips(quantized_zoo):
    report = npu.compare(quantized_zoo("residual", True, None), zoo_feeds("residual"), None)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["agrees"] is True and d["samples"] == 1
    assert d["criterion"] == {"min_identical_share": 0.999, "max_steps": 1}
    assert [t["output"] for t in d["tensors"] if t["output"]] == ["y"]
    assert all(t["elements"] > 0 for t in d["tensors"])


def test_simulate_returns_what_onnxruntime_returns():
    model = conv_unit(activation="Clip")
    x = np.random.default_rng(0).standard_normal((1, 4, 6, 6)).astype(np.float32)
    (y,) = npu.simulate(model, {"x": x})
    (y2,) = npu.simulate(model, [x])
    from tests.conftest import run_onnx

    (ref,) = run_onnx(model, {"x": x})
    assert y.dtype == np.float32 and y.shape == ref.shape
    np.testing.assert_array_equal(y, y2)
    assert np.max(np.abs(y - ref)) <= 0.04 + 1e-6  # within one step of the output scale


def test_simulate_names_a_bad_input():
    model = conv_unit()
    with pytest.raises(npu.SimulationError, match=r"input 'x': got shape \[1, 4, 5, 5\], the model takes \[1, 4, 6, 6\]"):
        npu.simulate(model, {"x": np.zeros((1, 4, 5, 5), np.float32)})
    with pytest.raises(npu.SimulationError, match="missing \\['x'\\]"):
        npu.simulate(model, {"image": np.zeros((1, 4, 6, 6), np.float32)})


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(conv_unit(activation="Relu"), path)
    np.savez(tmp_path / "x.npz", x=np.random.default_rng(0).standard_normal((3, 4, 6, 6)).astype(np.float32))
    return path


def test_cli_check(model_file, capsys):
    assert main(["check", str(model_file)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("target warboy: 2 of 2 ops run on the NPU, 0 on the host")
    assert main(["check", str(model_file), "--target", "tflite", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["target"] == "tflite" and d["summary"]["npu"] == 2


def test_cli_simulate_and_compare(model_file, tmp_path, capsys):
    data = str(tmp_path / "x.npz")
    out = tmp_path / "y.npz"
    assert main(["simulate", str(model_file), "--data", data, "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("3 run(s) on target warboy: 2 nodes in integers, 0 in float on the host")
    with np.load(out) as y:
        assert list(y.keys()) == ["act_out_dq"]  # the model's output, samples stacked
        assert y["act_out_dq"].shape == (3, 4, 6, 6)
    assert main(["compare", str(model_file), "--data", data, "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["agrees"] and d["samples"] == 3
    assert main(["compare", str(model_file), "--data", data, "--rounding", "double", "--all"]) in (0, 3)
    assert "act_out_q" in capsys.readouterr().out


def test_cli_bad_data_is_a_clear_error(model_file, tmp_path, capsys):
    np.savez(tmp_path / "bad.npz", image=np.zeros((2, 4, 6, 6), np.float32), mask=np.zeros(2))
    assert main(["simulate", str(model_file), "--data", str(tmp_path / "bad.npz")]) == 2
    assert "do not name the model inputs ['x']" in capsys.readouterr().err
    np.savez(tmp_path / "wrong.npz", x=np.zeros((2, 4, 5, 5), np.float32))
    assert main(["compare", str(model_file), "--data", str(tmp_path / "wrong.npz")]) == 2
    assert "input 'x': got shape [1, 4, 5, 5], the model takes [1, 4, 6, 6]" in capsys.readouterr().err
