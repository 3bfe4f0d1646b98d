"""The techniques from PyTorch: bounded sample keeping, export with techniques (both exporters),
the accuracy-targeted API; the user's model is never modified."""

from __future__ import annotations

import json

import onnx

import numpy as np
import pytest
import torch

import torchq
from onnx_backend import assert_valid
from onnx_backend.techniques.graph import outputs_on
from torchq import samples
from tests.technique_nets import OutlierMLP, export
from tests.zoo import ZOO


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_state(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in after)


def test_default_config_keeps_no_samples():
    model = ZOO["residual"].model()
    torchq.prepare(model)
    try:
        assert samples.store_of(model) is None and not torchq.QuantConfig().needs_samples
    finally:
        torchq.unprepare(model)


def test_kept_samples_are_capped_in_count_and_bytes():
    entry = ZOO["residual"]
    model = entry.model()
    torchq.prepare(model, torchq.QuantConfig(bias_correction=True, max_samples=20))
    try:
        g = torch.Generator().manual_seed(0)
        for _ in range(10):
            model(torch.randn(8, 3, 16, 16, generator=g))
        store = samples.store_of(model)
        assert store.samples == 20 and sum(b[0].shape[0] for b in store.batches) == 20
        held = store.bytes
        for _ in range(10):  # more calibration batches: no more memory
            model(torch.randn(8, 3, 16, 16, generator=g))
        assert store.bytes == held
    finally:
        torchq.unprepare(model)
    one_item = 3 * 16 * 16 * 4
    torchq.prepare(model, torchq.QuantConfig(bias_correction=True, max_sample_bytes=5 * one_item))
    try:
        model(torch.randn(8, 3, 16, 16))
        assert samples.store_of(model).samples == 5 and samples.store_of(model).bytes <= 5 * one_item
    finally:
        torchq.unprepare(model)
    assert not model._forward_pre_hooks and samples.store_of(model) is None


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_export_with_techniques_leaves_the_model_untouched(dynamo):
    entry = ZOO["depthwise_separable"]
    model = entry.model()
    before = _state(model)
    config = torchq.QuantConfig(equalization=True, bias_correction=True, method="auto", target=None)
    torchq.prepare(model, config)
    torchq.calibrate(model, entry.calibration(4))
    x = entry.calibration(1)[0]
    qmodel, report = torchq.export_with_report(model, x, dynamo=dynamo)
    torchq.unprepare(model)
    assert_valid(qmodel)
    assert {"equalization", "bias_correction", "method_auto", "samples"} <= set(report.techniques)
    assert report.techniques["samples"]["kept"] == 8 and report.techniques["samples"]["runs"] == 4
    assert "techniques" in report.to_dict()
    assert _same_state(model, before) and not model._forward_pre_hooks and not model._forward_hooks


def test_a_static_batch_export_splits_the_kept_batches():
    entry = ZOO["conv_bn_relu"]
    model = entry.model()
    torchq.prepare(model, torchq.QuantConfig(bias_correction=True, target=None))
    torchq.calibrate(model, entry.calibration(3))  # batches of 2
    try:
        _, report = torchq.export_with_report(model, entry.calibration(1)[0][0][:1], dynamo=False)
    finally:
        torchq.unprepare(model)
    assert report.techniques["samples"]["runs"] == 6


def test_module_overrides_keep_their_method_under_auto():
    entry = ZOO["residual"]
    model = entry.model()
    config = torchq.QuantConfig(method="auto", overrides=[{"pattern": "stem", "method": "min_max"}], target=None)
    torchq.prepare(model, config)
    torchq.calibrate(model, entry.calibration(3))
    try:
        _, report = torchq.export_with_report(model, entry.calibration(1)[0], dynamo=False)
    finally:
        torchq.unprepare(model)
    chosen = report.techniques["method_auto"]["chosen"]
    stem = [t for t, keys in report.keys_of_tensor.items() if any(k.startswith("stem:") for k in keys)]
    assert stem and all(t not in chosen for t in stem)  # fixed by the override, not chosen


def test_quantize_to_target_from_pytorch(tmp_path):
    model = OutlierMLP()
    before = _state(model)
    g = torch.Generator().manual_seed(0)
    loader = [torch.randn(32, 16, generator=g) for _ in range(4)]
    test_x = torch.randn(512, 16, generator=g).numpy()
    with torch.no_grad():
        labels = model(torch.from_numpy(test_x)).argmax(1).numpy()

    def accuracy(m) -> float:
        return float((outputs_on(m, [{outputs_input(m): test_x}])[0][0].argmax(1) == labels).mean() * 100)

    qmodel, report = torchq.quantize_to_target(
        model, loader, (loader[0],), accuracy, target=0.995, path=tmp_path / "m.onnx", report_path=tmp_path / "r.json", dynamo=False, dynamic_axes={"x": {0: "b"}}, input_names=["x"]
    )
    assert report.met and report.metric >= 99.5 and {"/fc1/Gemm", "/fc2/Gemm"} <= set(report.float_layers)
    assert_valid(qmodel)
    assert json.loads((tmp_path / "r.json").read_text())["met"] is True and (tmp_path / "m.onnx").is_file()
    assert _same_state(model, before) and not torchq.is_prepared(model)


def outputs_input(m) -> str:
    return m.graph.input[0].name


def test_quantize_onnx_with_adaround():
    entry = ZOO["flatten_linear"]
    data = [[t.numpy() for t in s] for s in entry.calibration(4)]
    proto = export(entry.model(), tuple(torch.from_numpy(a) for a in data[0]))
    qmodel, report = torchq.quantize_onnx(proto, data, torchq.QuantConfig(adaround=True, adaround_iterations=30, target=None))
    assert_valid(qmodel)
    layers = report.steps["adaround"]["layers"]
    # two of the three layers: the Linear head writing the model output stays float (planner rule 8)
    assert len(layers) == 2 and all(v["kept"] in ("adaround", "nearest") for v in layers.values())
    ref, out = outputs_on(proto, [{"x": data[0][0]}])[0][0], outputs_on(qmodel, [{"x": data[0][0]}])[0][0]
    assert np.corrcoef(ref.ravel(), out.ravel())[0, 1] > 0.99


def test_cli_quantize_onnx_with_techniques(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    import onnx

    entry = ZOO["conv_bn_relu"]
    data = [[t.numpy() for t in s] for s in entry.calibration(2)]
    onnx.save(export(entry.model(), tuple(torch.from_numpy(a) for a in data[0])), tmp_path / "f.onnx")
    np.savez(tmp_path / "cal.npz", x=np.concatenate([d[0] for d in data]))
    root = Path(__file__).resolve().parents[1]

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "torchq", "quantize-onnx", str(tmp_path / "f.onnx"), *args], capture_output=True, text=True, env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin", "TQDM_DISABLE": "1"})

    r = cli("--data", str(tmp_path / "cal.npz"), "--batch-size", "2", "--equalization", "--bias-correction", "--auto-method", "-o", str(tmp_path / "q.onnx"), "--report", str(tmp_path / "r.json"))
    assert r.returncode == 0, r.stderr
    assert "techniques: bias_correction, equalization, method_auto" in r.stdout
    assert_valid(onnx.load(tmp_path / "q.onnx"))
    assert set(json.loads((tmp_path / "r.json").read_text())["techniques"]) == {"bias_correction", "equalization", "method_auto"}
    r = cli("--ranges", str(tmp_path / "r.json"), "--equalization", "-o", str(tmp_path / "q2.onnx"))
    assert r.returncode == 2 and "give --data" in r.stderr and not (tmp_path / "q2.onnx").exists()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_lightning_callback_runs_the_techniques(tmp_path, exporter):
    pytest.importorskip("lightning", reason="the Lightning callback needs the optional `lightning` dependency")
    from torch.utils.data import DataLoader

    from tests.interfaces.lit_models import DictDataset, KeywordClassifier
    from tests.interfaces.test_lightning import make_trainer
    from torchq.lightning import QuantizationCallback

    torch.manual_seed(0)
    config = torchq.QuantConfig(bias_correction=True, method="auto", max_samples=64)
    cb = QuantizationCallback(config, tmp_path / "q", num_batches=4, export={"exporter": exporter})
    model = KeywordClassifier()
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=8)
    trainer.fit(model, DataLoader(DictDataset("train", 256), batch_size=32), DataLoader(DictDataset("test", 96), batch_size=32))
    r = cb.last_result
    assert_valid(onnx.load(r.onnx_path))
    assert abs(r.int8_metrics["val_acc"] - r.float_metrics["val_acc"]) <= 0.05
    techniques = json.loads(r.report_path.read_text())["export"]["techniques"]
    assert {"bias_correction", "method_auto", "samples"} <= set(techniques) and techniques["samples"]["kept"] == 64
    assert not torchq.is_prepared(model) and samples.store_of(model) is None


def test_sensitivity_api_on_an_onnx_model():
    entry = ZOO["conv_bn_relu"]
    data = [[t.numpy() for t in s] for s in entry.calibration(3)]
    proto = export(entry.model(), tuple(torch.from_numpy(a) for a in data[0]))
    report = torchq.sensitivity(proto, data, torchq.QuantConfig(target=None))
    assert len(report.layers) == 3 and report.float_metric == float("inf")
    # a layer alone costs less than all of them together, and keeping one float helps
    assert all(s.only >= report.quantized_metric and s.all_but >= report.quantized_metric - 0.5 for s in report.layers)
    assert report.table().count("\n") == len(report.layers) + 2
