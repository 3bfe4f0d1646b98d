"""Code that the hostile and fuzzed recipes name (`module:attribute`): a tiny model and loader,
and callables that misbehave in every way a user's code can."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

NOT_CALLABLE = 5
HERE = __name__


def base_recipe(folder) -> dict:
    """A valid recipe for the tiny model, writing `folder`/out.onnx (the hostile tests and the
    fuzzer start from it)."""
    return {
        "name": "tiny",
        "model": {"factory": f"{HERE}:tiny_model"},
        "calibration": {"loader": f"{HERE}:tiny_loader"},
        "quantization": {"method": "mse"},
        "target": None,
        "export": {"path": str(folder / "out.onnx"), "exporter": "torchscript", "opset": 17, "report": False},
    }


def tiny_model(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 3)).eval()


def tiny_loader(n: int = 2, batch: int = 2, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, 3, 8, 8, generator=g) for _ in range(n)]


def evaluate(model, n: int = 2) -> float:
    """Mean output: a number for the float module and for the INT8 ONNX path alike."""
    xs = tiny_loader(n, seed=1)
    if isinstance(model, str):
        import onnxruntime as ort

        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return float(np.mean([session.run(None, {name: x[:1].numpy()})[0] for x in xs]))
    with torch.no_grad():
        return float(np.mean([model(x[:1]).numpy() for x in xs]))


def raises(*args, **kwargs):
    raise RuntimeError("user code failed")


def returns_a_string(*args, **kwargs):
    return "not a model"


def returns_nan(model, **kwargs) -> float:
    return float("nan")


def not_iterable(**kwargs):
    return 42


def yields_strings(**kwargs):
    return ["a", "b"]


def yields_nan(**kwargs):
    return [torch.full((2, 3, 8, 8), float("nan"))]


def yields_wrong_shape(**kwargs):
    return [torch.randn(2, 5, 8, 8)]


def empty(**kwargs):
    return []


def fails_midway(**kwargs):
    yield torch.randn(2, 3, 8, 8)
    raise ValueError("the data source went away")


def interrupted_midway(**kwargs):
    yield torch.randn(2, 3, 8, 8)
    raise KeyboardInterrupt
