"""The analytic bias correction of weight rounding: the per-channel input sums it needs stream,
merge and serialise exactly like the histograms, and the correction removes the mean shift that
rounding the weights causes, on the ONNX path and the PyTorch path, depthwise and grouped
convolutions, Gemm and MatMul + Add included."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

import torchq
from onnx_backend import statistics
from onnx_backend.calibrator import Calibrator, load_ranges, save_ranges
from onnx_backend.errors import ConfigError
from onnx_backend.quantizer import quantize_with_report
from onnx_backend.statistics import MASK_MAGNITUDE, ChannelSums, TensorStatistics
from onnx_backend.techniques.bias_correction import channel_shifts, float_means
from onnx_backend.techniques.graph import as_feeds, prepare, weighted_layers
from tests.technique_nets import export
from torchq.observer import Observer


def _stats(*batches, relu=False):
    s = TensorStatistics()
    for b in batches:
        s.update(b, relu=relu)
    return s


# ---- the statistic ---------------------------------------------------------------------------


def test_channel_means_stream_and_merge_to_the_means_of_all_the_data(rng):
    batches = [rng.normal(size=(n, 3, 5, 4)).astype(np.float32) + np.arange(3)[None, :, None, None] for n in (2, 5, 1)]
    every = np.concatenate(batches)
    streamed = _stats(*batches).channels
    merged = _stats(batches[0]).merge(_stats(*batches[1:])).channels
    for sums in (streamed, merged):
        np.testing.assert_allclose(sums.mean(1), every.mean(axis=(0, 2, 3)), rtol=1e-6)
        np.testing.assert_allclose(sums.mean(-1), every.mean(axis=(0, 1, 2)), rtol=1e-6)
        np.testing.assert_allclose(sums.mean(3), sums.mean(-1))
    relu = _stats(*batches, relu=True).channels
    np.testing.assert_allclose(relu.mean(1), np.maximum(every, 0).mean(axis=(0, 2, 3)), rtol=1e-6)


def test_an_axis_whose_size_changes_is_dropped_and_a_changing_rank_drops_all(rng):
    s = _stats(rng.normal(size=(2, 4, 7)), rng.normal(size=(2, 4, 9)))  # a sequence axis
    assert s.channels.mean(1) is not None and s.channels.mean(-1) is None
    assert _stats(rng.normal(size=(2, 4)), rng.normal(size=(2, 4, 1))).channels.mean(1) is None
    assert _stats(rng.normal(size=(10,))).channels.mean(0) is None  # no channels in a vector


def test_mask_values_are_left_out_of_the_channel_means():
    x = np.array([[1.0, -np.inf], [3.0, -MASK_MAGNITUDE * 2], [5.0, 2.0]], dtype=np.float32)
    np.testing.assert_allclose(_stats(x).channels.mean(1), [3.0, 2.0])


def test_channel_sums_round_trip_through_to_dict_and_a_ranges_file(tmp_path, rng):
    s = _stats(rng.normal(size=(3, 4, 2, 2)))
    again = TensorStatistics.from_dict(json.loads(json.dumps(s.to_dict())))
    np.testing.assert_array_equal(again.channels.mean(1), s.channels.mean(1))
    assert TensorStatistics.from_dict({k: v for k, v in s.to_dict().items() if k != "channels"}).channels == ChannelSums()  # an older dict
    from onnx_backend.calibrator import Ranges

    path = tmp_path / "r.json"
    save_ranges(Ranges({"t": (0.0, 1.0)}, channel_sums={"t": s.channels}), path)
    np.testing.assert_array_equal(load_ranges(path).channel_sums["t"].mean(-1), s.channels.mean(-1))
    data = json.loads(path.read_text())
    data["channel_sums"]["t"]["axes"]["1"]["sums"] = "oops"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="channel_sums of tensor 't'"):
        load_ranges(path)


def test_the_observer_on_device_path_gives_the_numpy_paths_channel_sums(monkeypatch, rng):
    batches = [rng.normal(size=(2, 3, 4, 5)).astype(np.float32) for _ in range(3)]
    batches[1][0, 1, 0, 0] = -np.inf  # a mask value
    host = Observer("k", 4096)
    for b in batches:
        host.update(torch.from_numpy(b))
    monkeypatch.setattr(statistics, "_binning", None)  # what a GPU tensor goes through, on the CPU
    device = Observer("k", 4096)
    for b in batches:
        device.update(torch.from_numpy(b))
    for axis in (1, 3):
        np.testing.assert_allclose(device.to_statistics().channels.mean(axis), host.to_statistics().channels.mean(axis), rtol=1e-6)
        np.testing.assert_array_equal(device.channels.counts[axis], host.channels.counts[axis])


# ---- the correction --------------------------------------------------------------------------


class RoundsOneWay(nn.Module):
    """Conv -> depthwise Conv -> grouped 1x1 Conv -> Linear on NHWC rows (MatMul + Add) -> Linear
    (Gemm) -> a float head. Every weight sits 0.4 of a quantization step above a grid point (one
    weight per output channel sets the step), so nearest rounding moves every kernel sum the
    same way: on inputs with a large mean the layer outputs' means shift."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3)
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.grouped = nn.Conv2d(8, 8, 1, groups=2)
        self.rows = nn.Linear(8, 6)
        self.fc = nn.Linear(6 * 4, 10)
        self.head = nn.Linear(10, 3)
        with torch.no_grad():
            for layer in (self.c1, self.dw, self.grouped, self.rows, self.fc):
                w = layer.weight.view(layer.weight.shape[0], -1)
                step = 1.0 / 127
                w.copy_((torch.randint(-20, 60, w.shape) + 0.4) * step)
                w[:, 0] = 1.0  # sets the channel's step to 1/127
                layer.bias.uniform_(-0.1, 0.1)  # a zero bias would be dropped: nowhere to correct

    def forward(self, x):
        x = torch.relu(self.c1(x))
        x = torch.relu(self.dw(x))
        x = self.grouped(x)[:, :, :2, :2]  # [N, 8, 2, 2]
        x = torch.relu(self.rows(x.permute(0, 2, 3, 1)))  # MatMul + Add on [N, 2, 2, 8]
        return self.head(torch.relu(self.fc(x.flatten(1))))


def _data(n=8, batch=4):
    g = np.random.default_rng(0)
    return [[(1.0 + g.random((batch, 3, 8, 8))).astype(np.float32)] for _ in range(n)]


def _largest_relative_shift(float_model, qmodel, feeds) -> float:
    """Over every weighted layer: max |per-channel output mean, INT8 - float| / the layer's RMS."""
    ir_model = prepare(float_model, None)
    feeds = as_feeds(float_model, feeds)
    layers = weighted_layers(ir_model)
    reference = float_means(ir_model, layers, feeds)
    shifts = channel_shifts(qmodel, reference, layers, feeds)
    assert len(shifts) == len(layers) >= 6
    return max(float(np.max(np.abs(s)) / np.sqrt(np.mean(reference[n] ** 2))) for n, s in shifts.items())


def test_the_correction_removes_the_weight_rounding_mean_shift_on_the_onnx_path():
    net, data = RoundsOneWay().eval(), _data()
    proto = export(net, (torch.from_numpy(data[0][0]),))
    calibrator = Calibrator(proto, "MIN_MAX_ASYM", quiet=True)
    calibrator.collect_data(data)
    ranges = calibrator.compute_range()
    shifted, _ = quantize_with_report(proto, ranges, target=None, mean_correction=False)
    corrected, report = quantize_with_report(proto, ranges, target=None)
    corrected_layers = {c.correction.node for c in report.plan.constants if c.correction is not None}
    assert {"/c1/Conv", "/dw/Conv", "/grouped/Conv", "/fc/Gemm", "/rows/MatMul"} <= corrected_layers
    before, after = _largest_relative_shift(proto, shifted, data), _largest_relative_shift(proto, corrected, data)
    assert before > 0.05  # the rounding really shifts the means
    assert after < before / 5


def test_the_correction_removes_the_mean_shift_on_the_pytorch_path_and_can_be_switched_off():
    net, data = RoundsOneWay().eval(), _data()
    calibration = [torch.from_numpy(d[0]) for d in data]
    example = (calibration[0],)
    outputs = {}
    for on in (False, True):
        q = torchq.quantize(net, calibration, example, torchq.QuantConfig(target=None, method="min_max", mean_correction=on), dynamo=False, input_names=["x"], output_names=["y"], quiet=True)
        session = ort.InferenceSession(q.SerializeToString(), providers=["CPUExecutionProvider"])
        outputs[on] = np.concatenate([session.run(None, {"x": d[0]})[0] for d in data])
    with torch.no_grad():
        reference = torch.cat([net(x) for x in calibration]).numpy()
    error = {on: float(np.max(np.abs(outputs[on].mean(0) - reference.mean(0)))) for on in outputs}
    assert error[False] > 5 * error[True]


def test_a_ranges_file_carries_the_means_so_quantizing_from_it_gives_the_same_model(tmp_path):
    net, data = RoundsOneWay().eval(), _data()
    calibration = [torch.from_numpy(d[0]) for d in data]
    model = torchq.prepare(net, torchq.QuantConfig(target=None))
    torchq.calibrate(model, calibration, quiet=True)
    float_model, ranges = torchq.export_float(model, (calibration[0],), ranges_path=tmp_path / "r.json", dynamo=False, input_names=["x"])
    torchq.unprepare(model)
    assert ranges.channel_sums
    from_file = load_ranges(tmp_path / "r.json")
    assert from_file.channel_sums.keys() == ranges.channel_sums.keys()
    in_memory, report = quantize_with_report(float_model, ranges, target=None)
    assert any(c.correction is not None for c in report.plan.constants)
    assert quantize_with_report(float_model, from_file, target=None)[0].SerializeToString() == in_memory.SerializeToString()
    assert quantize_with_report(float_model, from_file, target=None, mean_correction=False)[0].SerializeToString() != in_memory.SerializeToString()
