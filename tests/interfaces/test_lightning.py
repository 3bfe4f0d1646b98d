"""QuantizationCallback with real Lightning Trainer runs on CPU (tiny: a few steps, one epoch)."""

from __future__ import annotations

import csv
import json

import onnx
import pytest
import torch

pytest.importorskip("lightning", reason="the Lightning callback needs the optional `lightning` dependency")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

import torchq  # noqa: E402
from onnx_backend import assert_valid  # noqa: E402
from onnx_backend.errors import ConfigError  # noqa: E402
from tests.interfaces.lit_models import DictDataset, DigitsClassifier, KeywordClassifier, NetOnlyValidation, loader  # noqa: E402
from torchq.lightning import QuantizationCallback  # noqa: E402


def make_trainer(tmp_path, callbacks, **kw):
    kw.setdefault("max_epochs", 1)
    kw.setdefault("limit_train_batches", 12)
    return Trainer(
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=CSVLogger(tmp_path / "logs"),
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kw,
    )


def logged(trainer) -> dict[str, float]:
    with open(f"{trainer.logger.log_dir}/metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return {k: float(v) for row in rows for k, v in row.items() if v and k.startswith("quantization/")}


def no_hooks(module: torch.nn.Module) -> bool:
    return all(not (m._forward_hooks or m._forward_pre_hooks) for m in module.modules())


def test_fit_writes_a_valid_int8_model_evaluated_with_the_modules_metric(tmp_path):
    torch.manual_seed(0)
    cb = QuantizationCallback(torchq.QuantConfig(method="mse"), tmp_path / "q", num_batches=6)
    model = DigitsClassifier()
    trainer = make_trainer(tmp_path, [cb])
    trainer.fit(model, loader("train", 640, shuffle=True), loader("test", 160))

    r = cb.last_result
    assert r.onnx_path == tmp_path / "q" / "model.int8.onnx" and r.onnx_path.is_file()
    qmodel = onnx.load(r.onnx_path)
    assert_valid(qmodel)
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    assert r.calibration_batches == 6
    # the module's own validation_step measured both models on the same batches
    assert set(r.float_metrics) == set(r.int8_metrics) == {"val_acc", "val_loss"}
    assert abs(r.int8_metrics["val_loss"] - r.float_metrics["val_loss"]) < 0.05 * r.float_metrics["val_loss"]
    assert abs(r.int8_metrics["val_acc"] - r.float_metrics["val_acc"]) <= 0.05
    # ... and both were logged to the trainer's logger
    metrics = logged(trainer)
    assert metrics["quantization/int8/val_loss"] == pytest.approx(r.int8_metrics["val_loss"])
    assert metrics["quantization/float/val_acc"] == pytest.approx(r.float_metrics["val_acc"])
    report = json.loads(r.report_path.read_text())
    assert report["quantization_callback"]["int8_metrics"] == r.int8_metrics
    assert report["export"]["summary"]["quantized_tensors"] > 0
    # the INT8 model runs any batch size (the batch axis is dynamic)
    from tests.conftest import run_onnx

    (out,) = run_onnx(qmodel, {"x": loader("test", 7, batch_size=7).dataset.tensors[0].numpy()})
    assert out.shape == (7, 10)


def test_on_demand_leaves_the_module_exactly_as_it_was(tmp_path):
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=3, quantize_on_fit_end=False)
    model = DigitsClassifier()
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=4)
    trainer.fit(model, loader("train", 256), loader("test", 64))
    assert cb.last_result is None and not (tmp_path / "q").exists()

    before = {k: v.clone() for k, v in model.state_dict().items()}
    attrs, training = set(model.__dict__), model.training
    result = cb.quantize(trainer, model)
    assert result.onnx_path.is_file()
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert set(model.__dict__) == attrs and "forward" not in model.__dict__  # forward never patched
    assert no_hooks(model) and not torchq.is_prepared(model)
    assert model.training == training and model.trainer is trainer


def test_checkpoints_and_trainer_test_still_work_after_the_callback(tmp_path):
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=2)
    model = DigitsClassifier()
    trainer = make_trainer(tmp_path, [ckpt, cb])
    trainer.fit(model, loader("train", 384), loader("test", 64))
    assert cb.last_result.onnx_path.is_file()

    # a checkpoint saved after the callback ran: same weights, callback state included
    path = tmp_path / "after.ckpt"
    trainer.save_checkpoint(path)
    state = torch.load(path, weights_only=False)
    assert state["callbacks"][cb.state_key]["runs"] == 1
    restored = DigitsClassifier.load_from_checkpoint(path)
    assert all(torch.equal(a, b) for a, b in zip(restored.state_dict().values(), model.state_dict().values()))

    # Trainer.test from the checkpoint written during fit, and from the live module
    test_loader = loader("test", 128)
    (from_ckpt,) = trainer.test(model, test_loader, ckpt_path=ckpt.last_model_path, verbose=False)
    (live,) = trainer.test(model, test_loader, verbose=False)
    assert from_ckpt["test_acc"] == pytest.approx(live["test_acc"])

    cb2 = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=2, quantize_on_fit_end=False)
    trainer2 = make_trainer(tmp_path, [cb2], max_epochs=2, limit_train_batches=2)
    trainer2.fit(DigitsClassifier(), loader("train", 128), ckpt_path=path)
    assert cb2.runs == 1 and cb2.last_result.onnx_path == cb.last_result.onnx_path
    (again,) = trainer2.test(DigitsClassifier(), test_loader, ckpt_path=str(path), verbose=False)
    assert again["test_acc"] == pytest.approx(live["test_acc"])


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_forward_with_keyword_arguments(tmp_path, exporter):
    torch.manual_seed(0)
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=4, export={"exporter": exporter})
    model = KeywordClassifier()
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=8)
    trainer.fit(model, DataLoader(DictDataset("train", 256), batch_size=32), DataLoader(DictDataset("test", 96), batch_size=32))

    r = cb.last_result
    qmodel = onnx.load(r.onnx_path)
    assert_valid(qmodel)
    assert [i.name for i in qmodel.graph.input] == ["image", "gain"]
    # gain (shape [N, 1]) and image (shape [N, 1, 8, 8]) cannot be swapped without onnxruntime failing
    assert set(r.int8_metrics) == {"val_acc"} and r.evaluation_note is None
    assert abs(r.int8_metrics["val_acc"] - r.float_metrics["val_acc"]) <= 0.05


def test_multiple_validation_dataloaders(tmp_path):
    # calibrate on the second validation loader, whose images are 3x brighter
    cb = QuantizationCallback(torchq.QuantConfig(method="min_max"), tmp_path / "q", dataloader="val", dataloader_idx=1, num_batches=2)
    model = DigitsClassifier()
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=6)
    trainer.fit(model, loader("train", 256), [loader("test", 64), loader("test", 64, scale=3.0)])

    r = cb.last_result
    assert_valid(onnx.load(r.onnx_path))
    ranges = json.loads(r.report_path.read_text())["export"]["ranges"]
    assert ranges["x"] == pytest.approx([0.0, 3.0])  # the brightest pixel of loader 1
    assert set(r.int8_metrics) == {f"{m}/dataloader_idx_{i}" for m in ("val_acc", "val_loss") for i in (0, 1)}
    assert set(logged(trainer)) >= {"quantization/int8/val_acc/dataloader_idx_1", "quantization/float/val_acc/dataloader_idx_0"}


def test_a_validation_step_that_bypasses_forward_gets_no_int8_metric(tmp_path):
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=2)
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=2)
    trainer.fit(NetOnlyValidation(), loader("train", 64), loader("test", 64))
    r = cb.last_result
    assert r.onnx_path.is_file()
    assert r.int8_metrics == {} and "never called self" in r.evaluation_note


def test_recipe_file_configures_the_callback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("quantization: {method: percentile, percentile: 99.9}\ncalibration: {loader: 'x:y', num_batches: 3}\nexport: {exporter: torchscript}\n")
    cb = QuantizationCallback(recipe, tmp_path / "q", evaluate=False)
    assert cb.config.method == "percentile" and cb.config.percentile == 99.9 and cb.num_batches == 3
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=2)
    trainer.fit(DigitsClassifier(), loader("train", 128))
    assert cb.last_result.calibration_batches == 3
    assert json.loads(cb.last_result.report_path.read_text())["export"]["exporter"] == "torchscript"


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="dataloader must be one of train, val, predict"):
        QuantizationCallback(None, dataloader="test")
    with pytest.raises(ConfigError, match="method"):
        QuantizationCallback({"method": "kl"})
    with pytest.raises(ConfigError, match="exporter"):
        QuantizationCallback(None, export={"exporter": "onnx"})


def test_export_settings_are_honoured(tmp_path):
    # export= takes every key of a recipe's export section; each one changes what is written
    cb = QuantizationCallback(
        {"method": "percentile"},
        export={"opset": 17, "path": str(tmp_path / "m" / "net.int8.onnx"), "float_path": str(tmp_path / "f" / "net.onnx"), "report": False, "exporter": "torchscript"},
        evaluate=False,
    )
    assert cb.config.opset == 17
    trainer = make_trainer(tmp_path, [cb], limit_train_batches=2)
    trainer.fit(DigitsClassifier(), loader("train", 64))
    r = cb.last_result
    assert r.onnx_path == tmp_path / "m" / "net.int8.onnx" and r.report_path is None
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["net.int8.onnx"]  # report: false
    qmodel, fmodel = onnx.load(r.onnx_path), onnx.load(tmp_path / "f" / "net.onnx")
    opset = {m.domain: m.version for m in qmodel.opset_import}
    assert opset.get("", opset.get("ai.onnx")) == 17
    assert {m.domain: m.version for m in fmodel.opset_import}.get("", 0) == 17
    assert not any(n.op_type == "QuantizeLinear" for n in fmodel.graph.node)
    assert [i.name for i in fmodel.graph.input] == [i.name for i in qmodel.graph.input]
    assert {o for n in fmodel.graph.node for o in n.output} & {n.input[0] for n in qmodel.graph.node if n.op_type == "QuantizeLinear"}


def test_export_opset_and_the_configs_opset_must_agree():
    with pytest.raises(ConfigError, match="opset 18 and export sets opset 17"):
        QuantizationCallback(torchq.QuantConfig(opset=18), export={"opset": 17})
    assert QuantizationCallback(torchq.QuantConfig(opset=17), export={"opset": 17}).config.opset == 17
    with pytest.raises(ConfigError, match=r"export: opset: Input should be greater than or equal to 13"):
        QuantizationCallback(None, export={"opset": 11})


@pytest.mark.slow
def test_an_exception_on_rank_zero_does_not_hang_the_other_rank(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    (tmp_path / "not_a_folder").write_text("")  # rank 0 cannot create its output folder here
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-m", "tests.interfaces.lit_rank_zero_failure", str(tmp_path)], cwd=root, env=env, capture_output=True, text=True, timeout=540)
    raised = tmp_path / "rank0.raised"
    assert raised.is_file(), done.stderr[-3000:]
    assert raised.read_text().startswith("FileExistsError")
    # rank 1 left the callback while rank 0 was still alive (it waits for rank 1 before it ends)
    assert (tmp_path / "rank1.returned").is_file(), done.stderr[-3000:]
    assert not (tmp_path / "rank1.raised").exists()
