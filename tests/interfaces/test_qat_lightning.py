"""The Lightning callback's QAT mode with real Trainer runs on CPU: calibrate and prepare in
setup, fine-tune with the module's own training_step, export; resume mid-QAT; DDP."""

from __future__ import annotations

import json

import onnx
import pytest
import torch
import torch.distributed as dist

pytest.importorskip("lightning", reason="the Lightning callback needs the optional `lightning` dependency")

from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402

import torchq  # noqa: E402
from onnx_backend import assert_valid  # noqa: E402
from tests.interfaces.lit_models import DigitsClassifier, QATScalesInSync, loader  # noqa: E402
from torchq.lightning import QuantizationCallback  # noqa: E402


def _trainer(tmp_path, callbacks, **kw):
    kw.setdefault("accelerator", "cpu")
    kw.setdefault("devices", 1)
    return Trainer(enable_progress_bar=False, enable_model_summary=False, logger=False, default_root_dir=tmp_path, callbacks=callbacks, **kw)


def test_qat_fit_trains_the_scales_and_exports_them(tmp_path):
    model = DigitsClassifier(lr=1e-2)
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=2, qat=torchq.QATConfig())
    trainer = _trainer(tmp_path, [cb], max_steps=6, enable_checkpointing=False)
    trainer.fit(model, loader("train", 256), loader("test", 64))
    assert cb.last_result.onnx_path.is_file()
    qmodel = onnx.load(cb.last_result.onnx_path)
    assert_valid(qmodel)
    report = json.loads(cb.last_result.report_path.read_text())
    qat = report["export"]["techniques"]["qat"]
    assert qat["weights"] == 2 and qat["unbound"] == {} and qat["folded_batchnorms"] == 1
    assert set(report["quantization_callback"]["int8_metrics"]) == {"val_acc", "val_loss"}
    # two convs (the Linear head writing the logits stays float on the host); the module is left unprepared, without the QAT submodule, its forward never patched
    assert not torchq.is_prepared(model) and not hasattr(model, "torchq_qat") and "forward" not in model.__dict__


def _run(tmp_path, name, epochs, ckpt_path=None, save=False):
    torch.manual_seed(0)
    model = DigitsClassifier(lr=1e-2)
    out = tmp_path / name
    callbacks = [QuantizationCallback(torchq.QuantConfig(), out, num_batches=2, qat=torchq.QATConfig(), evaluate=False)]
    if save:
        callbacks.append(ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
    # epochs of 4 batches: Lightning resumes a plain DataLoader at the start of an epoch
    trainer = _trainer(tmp_path, callbacks, max_epochs=epochs, limit_train_batches=4, enable_checkpointing=save)
    trainer.fit(model, loader("train", 256), ckpt_path=ckpt_path)
    return (out / "model.int8.onnx").read_bytes(), model


def test_resuming_mid_qat_gives_the_uninterrupted_model(tmp_path):
    whole, model = _run(tmp_path, "whole", 3, save=True)
    ckpt = tmp_path / "ckpt" / "epoch=0.ckpt"
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    assert any(k.startswith("torchq_qat.") for k in state)  # the learned scales are in the checkpoint
    resumed, resumed_model = _run(tmp_path, "resumed", 3, ckpt_path=str(ckpt))
    assert resumed == whole
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), resumed_model.state_dict().values()))


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_ddp_keeps_the_learned_scales_in_sync(tmp_path):
    model = DigitsClassifier(lr=1e-2)
    cb = QuantizationCallback(torchq.QuantConfig(), tmp_path / "q", num_batches=2, qat=torchq.QATConfig(), evaluate=False)
    trainer = _trainer(tmp_path, [cb, QATScalesInSync(str(tmp_path))], devices=2, strategy="ddp_spawn", max_steps=4, enable_checkpointing=False)
    trainer.fit(model, loader("train", 256))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["qat"] and ranks[0] == ranks[1]
    assert_valid(onnx.load(tmp_path / "q" / "model.int8.onnx"))
