"""Distributed calibration: two CPU processes (gloo) give exactly the single-process result."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import onnx
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import torchq
from onnx_backend import assert_valid
from tests.interfaces import dist_workers as w
from torchq import distributed

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one_process_on_the_union(tmp_path):
    single, multi = tmp_path / "single", tmp_path / "multi"
    single.mkdir(), multi.mkdir()
    # the reference: one process, all the data, in another order than the ranks saw it
    union = w.shard(1) + w.shard(0)
    w.calibrate_and_export(w.Branchy(), union, single, "single", False)

    mp.spawn(w.merge_worker, args=(free_port(), str(multi)), nprocs=w.WORLD, join=True)

    reference = json.loads((single / "single.stats.json").read_text())
    assert any(k.startswith("extra:") for k in reference)  # the branch ran somewhere
    assert any(s["mask_low"] and s["count"] for s in reference.values())  # -inf on one rank, values on the other
    for r in range(w.WORLD):
        merged = json.loads((multi / f"rank{r}.stats.json").read_text())
        assert merged.keys() == reference.keys()
        for key in reference:
            assert merged[key] == reference[key], f"rank {r}, {key}"
    # only rank 0 wrote the model, and it is byte-identical to the single-process one
    assert sorted(p.name for p in multi.iterdir()) == ["model.onnx", "rank0.stats.json", "rank1.stats.json"]
    assert (multi / "model.onnx").read_bytes() == (single / "model.onnx").read_bytes()
    assert_valid(onnx.load(multi / "model.onnx"))


def test_export_of_unmerged_statistics_is_refused_with_the_call_to_make(tmp_path):
    mp.spawn(w.forgot_to_merge_worker, args=(free_port(), str(tmp_path)), nprocs=w.WORLD, join=True)
    for r in range(w.WORLD):
        said = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert said["refusal"] and f"rank {r} of 2 holds only its own shard" in said["refusal"]
        assert "torchq.distributed.merge_statistics(model)" in said["refusal"] and "export_on_rank_zero" in said["refusal"]
        assert said["late"] and "after merge_statistics" in said["late"]
    # nothing was written from one rank's shard; the merged export was
    assert sorted(p.name for p in tmp_path.glob("*.onnx")) == ["merged.onnx"]
    assert_valid(onnx.load(tmp_path / "merged.onnx"))


def test_the_ranks_really_saw_different_data():
    # guards the test above against a shard split that makes the merge trivial
    a, b = torch.cat(w.shard(0)), torch.cat(w.shard(1))
    assert a.min() >= 0 > b.min() and a.max() != b.max()


def test_without_a_process_group_merge_is_a_no_op():
    model = w.Branchy()
    torchq.prepare(model)
    try:
        with torch.no_grad():
            for b in w.batches()[:2]:
                model(b)
        before = w.statistics_of(model)
        assert distributed.merge_statistics(model) == 2
        assert w.statistics_of(model) == before
    finally:
        torchq.unprepare(model)


# One process: a gloo group, the callback's setup hook (twice, as fit then validate would), then
# the exit handlers as the interpreter runs them. Lightning leaves gloo groups to finalization.
_EXIT_SCRIPT = """
import atexit, sys
import torch.distributed as dist
from torchq.lightning import QuantizationCallback
dist.init_process_group("gloo", init_method="file://" + sys.argv[1], rank=0, world_size=1)
before = atexit._ncallbacks()
cb = QuantizationCallback(output_dir=sys.argv[2])
cb.setup(None, None, "fit")
cb.setup(None, None, "validate")
registered = atexit._ncallbacks() - before
atexit._run_exitfuncs()
print(registered, dist.is_initialized())
"""


def test_the_callback_destroys_a_gloo_group_at_exit(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path / "store"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "False"]  # one handler, however many setups; the group is gone


def _fit_and_quantize(tmp_path, name: str, **trainer_kw):
    lightning = pytest.importorskip("lightning", reason="the Lightning callback needs the optional `lightning` dependency")
    from tests.interfaces.lit_models import DigitsClassifier, loader
    from torchq.lightning import QuantizationCallback

    out = tmp_path / name
    # lr=0 and no BatchNorm: fit leaves the weights as initialized, so both runs quantize the same model
    model = DigitsClassifier(lr=0.0, batchnorm=False)
    cb = QuantizationCallback(torchq.QuantConfig(method="percentile", percentile=99.0), out)
    trainer = lightning.pytorch.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, enable_progress_bar=False, enable_model_summary=False,
        logger=False, enable_checkpointing=False, default_root_dir=tmp_path, callbacks=[cb], **trainer_kw,
    )
    trainer.fit(model, loader("train", 256, batch_size=32), loader("test", 64))
    return out


@pytest.mark.slow
def test_lightning_ddp_calibration_equals_one_process(tmp_path):
    single = _fit_and_quantize(tmp_path, "single", devices=1)
    ddp = _fit_and_quantize(tmp_path, "ddp", devices=2, strategy="ddp_spawn")

    one = json.loads((single / "model.int8.report.json").read_text())
    two = json.loads((ddp / "model.int8.report.json").read_text())
    # 256 samples: one process calibrates on 8 batches; two ranks on 4 batches each (DistributedSampler)
    assert one["quantization_callback"]["calibration_batches"] == two["quantization_callback"]["calibration_batches"] == 8
    assert two["export"]["ranges"] == one["export"]["ranges"]
    assert (ddp / "model.int8.onnx").read_bytes() == (single / "model.int8.onnx").read_bytes()
    assert_valid(onnx.load(ddp / "model.int8.onnx"))
    assert set(two["quantization_callback"]["int8_metrics"]) == {"val_acc", "val_loss"}  # rank 0 evaluated
