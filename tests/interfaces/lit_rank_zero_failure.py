"""A two-rank Lightning DDP run (CPU, gloo) whose on-demand quantization fails on rank 0 only.

Run as a script: `python -m tests.interfaces.lit_rank_zero_failure OUT` (Lightning's DDP launcher
starts rank 1 as a copy of this command). Each rank writes OUT/rank<r>.returned or .raised.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from lightning.pytorch import Trainer

from tests.interfaces.lit_models import DigitsClassifier, loader
from torchq.lightning import QuantizationCallback

WAIT_S = 60.0  # how long the failed rank 0 stays alive, as a notebook or a longer script would


def main(out: Path) -> None:
    torch.set_num_threads(1)
    blocker = out / "not_a_folder"  # a file where rank 0 must create the model's folder
    cb = QuantizationCallback({"method": "min_max"}, blocker, evaluate=False, quantize_on_fit_end=False, num_batches=2)
    trainer = Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, limit_train_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=out,
    )
    model = DigitsClassifier(lr=0.0, batchnorm=False)
    trainer.fit(model, loader("train", 128))
    rank = trainer.global_rank
    try:
        cb.quantize(trainer, model)
    except Exception as exc:  # noqa: BLE001 -- recorded for the test
        (out / f"rank{rank}.raised").write_text(f"{type(exc).__name__}: {exc}")
        deadline = time.monotonic() + WAIT_S
        while not (out / "rank1.returned").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        return
    (out / f"rank{rank}.returned").write_text("returned")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
