"""Shared fixtures: the trained digits CNN exported to float ONNX and quantized two ways."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchq
from torchq.examples import digits

DYNAMIC = {"image": {0: "batch"}, "logits": {0: "batch"}}


@pytest.fixture(scope="session")
def digits_models(tmp_path_factory):
    """{'dir', 'float', 'mse', 'clipped', 'data'}: paths of the float model, two INT8 models
    (MSE ranges; the same but the first ReLU's output clipped at its 90th percentile by an
    override: one culprit tensor) and an .npz of 256 images."""
    out = tmp_path_factory.mktemp("digits")
    model = digits.load_trained(out)
    x = torch.from_numpy(digits.test_set()[0][:1])
    torch.onnx.export(model, (x,), out / "digits.onnx", dynamo=True, input_names=["image"], output_names=["logits"], dynamic_axes=DYNAMIC, verbose=False)
    for name, config in (("mse", torchq.QuantConfig(method="mse")), ("clipped", torchq.QuantConfig(overrides=[{"pattern": "features.2", "method": "percentile", "percentile": 80.0}]))):
        torchq.quantize(model, digits.calibration_loader(), (x,), config, out / f"digits.{name}.onnx", input_names=["image"], output_names=["logits"], dynamic_axes=DYNAMIC, quiet=True)
    np.savez(out / "calib.npz", image=digits.load_data()["x_train"][:256])
    return {"dir": out, "float": out / "digits.onnx", "mse": out / "digits.mse.onnx", "clipped": out / "digits.clipped.onnx", "data": out / "calib.npz"}
