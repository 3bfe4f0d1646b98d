"""QATConfig: how quantization-aware fine-tuning runs."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnx_backend.errors import ConfigError

from ..config import format_validation_error


class QATConfig(BaseModel):
    """Quantization-aware fine-tuning settings. Every field has a default; unknown ones are an error.

    learn_ranges         activation scales are Parameters trained with the LSQ gradient (False:
                         frozen at the calibrated ranges); fixed-output grids (Softmax, Sigmoid,
                         Tanh) and constants' grids are always frozen
    learn_weight_scales  per-channel weight scales trained with the LSQ gradient (False: frozen)
    steps                optimizer steps of `torchq.qat.distill` / the Lightning QAT mode
    lr                   Adam learning rate of `distill` for the model's weights
    scale_lr             ... for the (log) scales
    distillation         "mse" or "cosine" to the float model's outputs (no labels needed);
                         None: the Lightning module's own training_step
    eval_every           steps between checks on the held-back data (the best state is kept)
    dynamo               the exporter whose graph the plan is made on (both give the same plan)
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    learn_ranges: bool = True
    learn_weight_scales: bool = True
    steps: int = Field(default=200, ge=0)
    lr: float = Field(default=1e-5, gt=0)
    scale_lr: float = Field(default=1e-3, gt=0)
    distillation: Literal["mse", "cosine"] | None = "mse"
    eval_every: int = Field(default=25, ge=1)
    dynamo: bool = True


def make_qat_config(config: QATConfig | dict | None = None, **kwargs) -> QATConfig:
    if isinstance(config, QATConfig) and not kwargs:
        return config
    data = dict(config.model_dump() if isinstance(config, QATConfig) else (config or {}))
    data.update(kwargs)
    try:
        return QATConfig(**data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, "QATConfig")) from None
