"""prepare / unprepare: attach and remove observers, through hooks only."""

from __future__ import annotations

import weakref

import torch

from onnx_backend.errors import ConfigError

from . import samples
from .capture import CaptureSession
from .config import QuantConfig, make_config

_SESSIONS: weakref.WeakKeyDictionary[torch.nn.Module, tuple[CaptureSession, QuantConfig]] = weakref.WeakKeyDictionary()


def prepare(model: torch.nn.Module, config: QuantConfig | dict | None = None, **kwargs) -> torch.nn.Module:
    """Attach observers to `model` (in place; the same object is returned).

    Run calibration batches through the model afterwards, in your own loop, on any device;
    then call `torchq.export`. Parameters, buffers and `forward` are untouched: `unprepare`
    restores the model exactly.
    """
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"prepare expects a torch.nn.Module, got {type(model).__name__}")
    if model in _SESSIONS:
        raise ConfigError("this model is already prepared; call torchq.unprepare(model) first")
    cfg = make_config(config, **kwargs)
    session = CaptureSession(model, cfg.histogram_bins)
    session.attach()
    if cfg.needs_samples:  # the ONNX-side techniques recalibrate on a bounded sample of inputs
        samples.attach(model, session, cfg.max_samples, cfg.max_sample_bytes)
    _SESSIONS[model] = (session, cfg)
    return model


def unprepare(model: torch.nn.Module) -> torch.nn.Module:
    """Remove observers and hooks; the model is exactly as before `prepare`."""
    entry = _SESSIONS.pop(model, None)
    if entry is not None:
        entry[0].detach()
        if entry[0].qat is not None:
            from .qat.prepare import release

            release(model, entry[0].qat)
            entry[0].qat = None
    samples.detach(model)
    return model


def session_of(model: torch.nn.Module) -> tuple[CaptureSession, QuantConfig]:
    entry = _SESSIONS.get(model)
    if entry is None:
        raise ConfigError("the model is not prepared; call torchq.prepare(model, config) and run calibration batches first")
    return entry


def is_prepared(model: torch.nn.Module) -> bool:
    return model in _SESSIONS
