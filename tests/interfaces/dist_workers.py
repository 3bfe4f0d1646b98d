"""Process bodies for the distributed tests (spawned processes import them by name)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import torchq
from torchq import distributed
from torchq.prepare import session_of

WORLD = 2


class Branchy(nn.Module):
    """A data-dependent branch: the `extra` op only runs on some batches, so one rank may never
    observe it; the merge must still produce the union. Mask values too: one tensor holds only
    -inf on one rank's shard."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.extra = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        if float(x.mean()) > 0.32:  # calibration only; export takes one path
            y = y + self.extra(y)
        # -inf (a mask value) wherever the input is not negative: rank 0 sees nothing else here
        masked = torch.where(x < 0, x, float("-inf")).flatten(1)
        return self.head(y.mean(dim=(2, 3))) + torch.logsumexp(masked, -1, keepdim=True).clamp(min=-1.0)


def batches() -> list[torch.Tensor]:
    from torchq.examples.digits import load_data

    x = torch.from_numpy(load_data()["x_train"][:224])
    # uneven batches with different ranges, so ranks see different min/max and bin widths
    out = [x[i : i + 32] * (1 + i / 64) for i in range(0, 224, 32)]
    out[5] = out[5] - 0.75  # the only negative values
    return out


def shard(rank: int) -> list[torch.Tensor]:
    return batches()[:5] if rank == 0 else batches()[5:]


def statistics_of(model) -> dict:
    session, _ = session_of(model)
    return {k: o.to_statistics().to_dict() for k, o in sorted(session.observers.items()) if o.observed}


def calibrate_and_export(model, data, out: Path, tag: str, distributed_run: bool) -> None:
    """Calibrate on `data`; merge across ranks if distributed; write statistics and the model."""
    torchq.prepare(model, torchq.QuantConfig(method="entropy", histogram_bins=512))
    with torch.no_grad():
        for b in data:
            model(b)
    example = (batches()[0][:1],)
    if distributed_run:
        distributed.merge_statistics(model)
        stats = statistics_of(model)
        distributed.export_on_rank_zero(model, example, out / "model.onnx", dynamo=False)  # merges again: idempotent
    else:
        stats = statistics_of(model)
        torchq.export(model, example, out / "model.onnx", dynamo=False)  # traces one branch
    (out / f"{tag}.stats.json").write_text(json.dumps(stats))
    torchq.unprepare(model)


def merge_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        calibrate_and_export(Branchy(), shard(rank), Path(out), f"rank{rank}", True)
    finally:
        dist.destroy_process_group()


def forgot_to_merge_worker(rank: int, port: int, out: str) -> None:
    """torchq.export of unmerged statistics is refused with the call to make; after the merge,
    rank 0 exports."""
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        model = Branchy()
        torchq.prepare(model, torchq.QuantConfig(method="min_max", histogram_bins=512))
        with torch.no_grad():
            for b in shard(rank):
                model(b)
        example = (batches()[0][:1],)
        try:
            torchq.export(model, example, Path(out) / f"unmerged{rank}.onnx", dynamo=False)
            refusal = None
        except torchq.CalibrationError as exc:
            refusal = str(exc)
        distributed.merge_statistics(model)
        if rank == 0:
            torchq.export(model, example, Path(out) / "merged.onnx", dynamo=False)
        with torch.no_grad():
            model(shard(rank)[0])  # one more batch after the merge: this rank's alone again
        try:
            torchq.export(model, example, dynamo=False)
            late = None
        except torchq.CalibrationError as exc:
            late = str(exc)
        (Path(out) / f"rank{rank}.json").write_text(json.dumps({"refusal": refusal, "late": late}))
        torchq.unprepare(model)
    finally:
        dist.destroy_process_group()
