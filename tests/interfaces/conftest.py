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
    """{'dir', 'float', 'mse', 'entropy', 'data'}: paths of the float model, two INT8 models
    (MSE ranges; entropy ranges, which clip the first ReLU hard) and an .npz of 256 images."""
    out = tmp_path_factory.mktemp("digits")
    model = digits.load_trained(out)
    x = torch.from_numpy(digits.test_set()[0][:1])
    torch.onnx.export(model, (x,), out / "digits.onnx", dynamo=True, input_names=["image"], output_names=["logits"], dynamic_axes=DYNAMIC, verbose=False)
    for method in ("mse", "entropy"):
        torchq.quantize(model, digits.calibration_loader(), (x,), torchq.QuantConfig(method=method), out / f"digits.{method}.onnx", input_names=["image"], output_names=["logits"], dynamic_axes=DYNAMIC, quiet=True)
    np.savez(out / "calib.npz", image=digits.load_data()["x_train"][:256])
    return {"dir": out, "float": out / "digits.onnx", "mse": out / "digits.mse.onnx", "entropy": out / "digits.entropy.onnx", "data": out / "calib.npz"}
