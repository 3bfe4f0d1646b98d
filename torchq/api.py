"""One call: prepare, calibrate over an iterable, export, unprepare."""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Iterable, Mapping

import onnx
import torch
from tqdm import tqdm

from onnx_backend.errors import CalibrationError

from .config import QuantConfig, make_config
from .export import export_with_report
from .prepare import is_prepared, prepare, session_of, unprepare


def positional_arity(model: torch.nn.Module) -> int | None:
    """How many positional inputs `model.forward` takes (None: *args, any number)."""
    params = list(inspect.signature(model.forward).parameters.values())
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return None
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


def split_batch(batch, arity: int | None) -> tuple[tuple, dict]:
    """Model inputs of one calibration item.

    * a tensor: the single input;
    * a dict: keyword inputs;
    * a tuple/list: its first k items are the positional inputs, k = the number of positional
      parameters of `forward`; what follows (labels, as a DataLoader yields (inputs, target)
      pairs) is ignored.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), {}
    if isinstance(batch, Mapping):
        return (), dict(batch)
    if isinstance(batch, (tuple, list)):
        items = tuple(batch)
        if arity is not None and len(items) > arity:
            items = items[:arity]
        return items, {}
    raise CalibrationError(f"calibration items must be tensors, tuples of tensors or dicts; got {type(batch).__name__}")


def _to_device(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to_device(o, device) for o in obj)
    if isinstance(obj, Mapping):
        return {k: _to_device(v, device) for k, v in obj.items()}
    return obj


def _length(data) -> int | None:
    """len(data) for the progress bar, or None: a wrapper may define __len__ around an iterable
    that has none (a generator), and len() then raises TypeError."""
    try:
        return len(data)
    except TypeError:
        return None


def calibrate(model: torch.nn.Module, calibration_data: Iterable, *, max_batches: int | None = None, quiet: bool | None = None, inputs=None) -> int:
    """Run calibration items through a prepared model (eval mode, no grad). Returns the count.

    `inputs(item) -> (args, kwargs)` turns an item into the forward's inputs, on the model's
    device; by default a tensor, tuple/list or dict as documented in the README."""
    if inputs is None:
        arity = positional_arity(model)
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = torch.device("cpu")

        def inputs(batch):
            args, kwargs = split_batch(batch, arity)
            return _to_device(args, device), _to_device(kwargs, device)

    quiet = (not sys.stderr.isatty()) if quiet is None else quiet
    total = max_batches if max_batches is not None else _length(calibration_data)
    was_training = model.training
    model.eval()
    n = 0
    try:
        with torch.no_grad():
            for batch in tqdm(calibration_data, total=total, desc="calibrating", disable=quiet, unit="batch", leave=False):
                if max_batches is not None and n >= max_batches:
                    break
                args, kwargs = inputs(batch)
                model(*args, **kwargs)
                n += 1
    except BaseException:
        if is_prepared(model):
            session_of(model)[0].abort_forward()  # Ctrl-C mid-forward: leave the capture mode now
        raise
    finally:
        model.train(was_training)
    if n == 0:
        raise CalibrationError("the calibration data is empty")
    return n


def quantize(
    model: torch.nn.Module,
    calibration_data: Iterable,
    example_inputs,
    config: QuantConfig | dict | None = None,
    path: str | os.PathLike | None = None,
    *,
    max_batches: int | None = None,
    quiet: bool | None = None,
    **export_options,
) -> onnx.ModelProto:
    """prepare -> calibrate over `calibration_data` -> export -> unprepare, in one call.

    See `split_batch` for what each calibration item may be. The model is left exactly as it was.
    """
    cfg = make_config(config)
    prepare(model, cfg)
    try:
        calibrate(model, calibration_data, max_batches=max_batches, quiet=quiet)
        qmodel, _ = export_with_report(model, example_inputs, path, **export_options)
    finally:
        unprepare(model)
    return qmodel
