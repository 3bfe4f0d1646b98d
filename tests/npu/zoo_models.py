"""Quantized zoo models for the npu tests and benchmarks, built once per process."""

from __future__ import annotations

from functools import lru_cache

import torch

import torchq
from onnx_backend import assert_valid
from tests.zoo import ZOO


@lru_cache(maxsize=None)
def quantized_zoo_model(name: str, dynamo: bool, target: str | None):
    """A zoo entry quantized as the spine's tests do; target "warboy" is the default QuantConfig."""
    entry = ZOO[name]
    model = entry.model()
    config = torchq.QuantConfig() if target == "warboy" else torchq.QuantConfig(target=target)
    torchq.prepare(model, config)
    torchq.calibrate(model, entry.calibration())
    q, _ = torchq.export_with_report(model, entry.calibration()[0], dynamo=dynamo, input_names=entry.input_names, output_names=entry.output_names)
    torchq.unprepare(model)
    assert_valid(q)
    return q


def zoo_feeds(name: str, seed: int = 123) -> dict:
    entry = ZOO[name]
    inputs = entry.inputs(torch.Generator().manual_seed(seed))
    return {n: t.numpy() for n, t in zip(entry.input_names, inputs)}
