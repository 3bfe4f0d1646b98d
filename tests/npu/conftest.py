"""Quantized zoo models, built once per session (torch export is the slow part)."""

from __future__ import annotations

import pytest

from tests.npu.zoo_models import quantized_zoo_model


@pytest.fixture(scope="session")
def quantized_zoo():
    """quantized_zoo(name, dynamo, target): target "warboy" is the default QuantConfig."""
    return quantized_zoo_model
