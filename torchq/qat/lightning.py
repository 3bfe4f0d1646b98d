"""The Lightning callback's QAT mode (torchq.lightning.QuantizationCallback(qat=...)).

`setup(stage="fit")`, before Lightning restores a checkpoint and before `configure_optimizers`:
calibrate on the callback's dataloader (statistics merged across ranks under DDP), then
`prepare_qat`. The learnable scales are parameters of the module's `torchq_qat` submodule, so
the module's own optimizer trains them with its weights in its own `training_step`, DDP keeps
them in sync, and checkpoints carry them: a run resumed mid-QAT is set up the same way and then
loads them, giving the model an uninterrupted run gives. Fine-tuning is the Trainer's own fit
(its max_steps / max_epochs); `on_fit_end` exports the QAT model and evaluates it as for PTQ.
"""

from __future__ import annotations

import itertools
import sys

import torch

from onnx_backend.errors import CalibrationError

from .. import distributed
from ..api import calibrate
from ..prepare import prepare
from .config import QATConfig
from .prepare import is_qat, prepare_qat


def setup_qat(callback, trainer, pl_module, config: QATConfig) -> int:
    """Calibrate and prepare `pl_module` for QAT; returns the calibration batches (this rank)."""
    if is_qat(pl_module):
        return 0
    loader = _fit_loader(callback, trainer, pl_module)
    batches = iter(loader)
    try:
        first = next(batches)
    except StopIteration:
        raise CalibrationError(f"the {callback.dataloader} dataloader is empty") from None
    device = next(pl_module.parameters()).device
    args, kwargs = callback._inputs(pl_module, first, device)
    prepare(pl_module, callback.config)
    quiet = trainer.progress_bar_callback is None or not sys.stderr.isatty()
    count = calibrate(pl_module, itertools.chain([first], batches), max_batches=callback.num_batches, quiet=quiet, inputs=lambda b: callback._inputs(pl_module, b, device))
    if distributed.is_distributed():
        count = distributed.merge_statistics(pl_module)
    was_training = pl_module.training
    prepare_qat(pl_module, config, example_inputs=tuple(args), kwargs=kwargs or None)
    pl_module.train(was_training)
    return count


def _fit_loader(callback, trainer, pl_module):
    """The calibration dataloader in `setup`, before Lightning has loaded fit's dataloaders:
    those given to `fit(...)` are only in the fit loop's data source yet."""
    if callback.dataloader == "train" and trainer.train_dataloader is None:
        source = getattr(trainer.fit_loop, "_data_source", None)  # Lightning 2.x
        if source is not None and source.is_defined():
            return callback._pick(source.dataloader())
    return callback._calibration_loader(trainer, pl_module)
