"""Same request, same model: every ONNX entry point writes byte-identical INT8 models.

For a fixed model, method, data and configuration: `Calibrator` + `quantize_with_report` (the
reference product's API), `torchq.quantize_onnx`, `torchq quantize-onnx --data`, and
`torchq calibrate` + `torchq quantize-onnx --ranges` -- for all ten methods, with graph
optimization requested on and off explicitly, on a model exported by each torch exporter and a
real pretrained ONNX model from PyPI (PaddleOCR's orientation classifier, as rapidocr ships it).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import torchq
from onnx_backend import Calibrator, CalibrationMethod, quantize_with_report
from onnx_backend.model_io import load_model
from onnx_backend.optimize import optimize_model
from torchq.cli import main

SAMPLES = 8
METHODS = [m.name.lower() for m in CalibrationMethod]


class ConvBnNet(nn.Module):
    """BatchNorm, a residual Add, ReLU6 and a pooled Linear head: graph optimization changes it."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.bn.running_mean.uniform_(-0.5, 0.5)
            self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = torch.clamp(y + self.conv2(y), 0, 6)
        return self.head(y.mean(dim=(2, 3)))


def _torch_model(folder: Path, dynamo: bool) -> tuple[Path, np.ndarray]:
    path = folder / f"convbn_{'dynamo' if dynamo else 'torchscript'}.onnx"
    x = torch.randn(1, 3, 16, 16)
    torch.onnx.export(ConvBnNet().eval(), (x,), path, dynamo=dynamo, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "n"}, "y": {0: "n"}}, verbose=False)
    data = np.random.default_rng(0).normal(size=(SAMPLES, 3, 16, 16)).astype(np.float32)
    return path, data


def _ocr_classifier(folder: Path) -> tuple[Path, np.ndarray]:
    if importlib.util.find_spec("rapidocr_onnxruntime") is None:
        pytest.skip("needs the rapidocr-onnxruntime wheel (the bench extra) for the real pretrained model")
    from bench import ocr

    data, _ = ocr.classifier_inputs(ocr.lines(SAMPLES // 2, seed=0))
    return ocr.model_path(ocr.CLS_MODEL), data.astype(np.float32)


@pytest.fixture(scope="module", params=["dynamo", "torchscript", "ocr_cls"])
def subject(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    path, data = _ocr_classifier(folder) if request.param == "ocr_cls" else _torch_model(folder, request.param == "dynamo")
    name = load_model(str(path)).graph.input[0].name
    np.savez(folder / "calib.npz", **{name: data})
    return path, data, folder


def _calibrator_path(path: Path, data: np.ndarray, config: torchq.QuantConfig) -> bytes:
    """The reference API: optimize (if asked), Calibrator, quantize."""
    graph = optimize_model(str(path), opset=config.opset) if config.optimize else load_model(str(path))
    calibrator = Calibrator(graph, CalibrationMethod.from_parts(config.method, config.symmetric), quiet=True)
    calibrator.collect_data([x[None]] for x in data)
    qmodel, _ = quantize_with_report(graph, calibrator.compute_range(), per_channel=config.per_channel, target=config.target, opset=config.opset, optimize=config.optimize)
    return qmodel.SerializeToString()


@pytest.mark.parametrize("optimize", [True, False])
@pytest.mark.parametrize("method", METHODS)
def test_every_entry_point_writes_the_same_bytes(subject, method, optimize):
    path, data, folder = subject
    config = torchq.QuantConfig(method=method.rsplit("_", 1)[0], symmetric=method.endswith("_sym"), optimize=optimize)
    reference = _calibrator_path(path, data, config)

    qmodel, _ = torchq.quantize_onnx(str(path), [[x[None]] for x in data], config)
    assert qmodel.SerializeToString() == reference, "quantize_onnx"

    out = folder / f"{method}_{optimize}"
    flags = ["--method", method, "--set", f"optimize={str(optimize).lower()}"]
    assert main(["--quiet", "quantize-onnx", str(path), "--data", str(folder / "calib.npz"), *flags, "-o", f"{out}.cli.onnx"]) == 0
    assert Path(f"{out}.cli.onnx").read_bytes() == reference, "torchq quantize-onnx --data"

    if optimize:  # torchq calibrate prepares the graph with QuantConfig's defaults (optimized)
        assert main(["--quiet", "calibrate", str(path), "--data", str(folder / "calib.npz"), "--method", method, "-o", f"{out}.ranges.json"]) == 0
        assert main(["--quiet", "quantize-onnx", str(path), "--ranges", f"{out}.ranges.json", *flags, "-o", f"{out}.ranges.onnx"]) == 0
        assert Path(f"{out}.ranges.onnx").read_bytes() == reference, "torchq calibrate + quantize-onnx --ranges"
    assert onnx.load_from_string(reference).graph.node  # a model, not an empty file


@pytest.mark.parametrize("technique", [{"bias_correction": True}, {"adaround": True, "adaround_iterations": 20}, {"method": "auto"}])
def test_the_pytorch_path_keeps_its_observers_statistics_with_techniques(technique):
    """Ranges come from every calibration batch (the observers), not from the few kept samples,
    whenever no technique changes the activations before calibration."""
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 16, 16) * (1 + i) for i in range(6)]  # later batches are wider
    example = batches[0][:1]

    def export(**fields):
        model = ConvBnNet().eval()
        torchq.prepare(model, torchq.QuantConfig(max_samples=4, **fields))
        try:
            torchq.calibrate(model, batches, quiet=True)
            return torchq.export_with_report(model, example, dynamo=False)[1]
        finally:
            torchq.unprepare(model)

    plain, with_technique = export(), export(**technique)
    assert with_technique.techniques["samples"]["kept"] == 4 and with_technique.techniques["samples"]["ranges_from"] == "observers"
    fixed = {t: r for t, r in plain.ranges.items() if t in with_technique.ranges}
    if technique.get("method") != "auto":  # auto chooses each method again; the statistics are the same
        assert fixed and {t: tuple(with_technique.ranges[t]) for t in fixed} == {t: tuple(r) for t, r in fixed.items()}
    # equalization changes the activations: they are observed again, on the kept samples
    assert export(equalization=True).techniques["samples"]["ranges_from"] == "kept samples"


def test_one_reading_of_a_sample_for_every_entry_point(subject):
    """The Calibrator and quantize_onnx refuse a malformed sample with the same message."""
    path, data, _ = subject
    messages = []
    for run in (lambda s: Calibrator(str(path), quiet=True).collect_data(s), lambda s: torchq.quantize_onnx(str(path), s, torchq.QuantConfig())):
        for bad in ([[data[:1], data[:1]]], [{"not_an_input": data[:1]}]):
            with pytest.raises(torchq.CalibrationError) as err:
                run(bad)
            messages.append(str(err.value))
    assert messages[:2] == messages[2:] and "has 2 inputs; the model takes 1" in messages[0] and "lacks model input(s)" in messages[1]
