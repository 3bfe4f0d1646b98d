"""Accuracy techniques driven by a QuantConfig (docs/ACCURACY.md).

* `quantize_onnx(model, samples, config)`: the ONNX path with every technique, AdaRound included;
* `quantize_to_target(...)` / `quantize_onnx_to_target(...)`: the fewest float layers that meet an
  accuracy target, or the best model found, with a report;
* `sensitivity(model, samples, config, metric)`: per-layer sensitivity of an ONNX model;
* `adaround`: learned weight rounding (PyTorch autograd).
"""

from .adaround import AdaRoundReport
from .pipeline import prepare_onnx, quantize_onnx
from .target import quantize_onnx_to_target, quantize_to_target


def sensitivity(model, samples, config=None, metric=None, *, layers=None):
    """Per-layer sensitivity (onnx_backend.techniques.sensitivity) of a float ONNX model quantized
    with `config`: the metric when only each layer is quantized and when all but it are."""
    from onnx_backend.techniques.sensitivity import analyze

    prepared, _ = prepare_onnx(model, samples, config)
    return analyze(prepared, metric, layers=layers)


__all__ = ["AdaRoundReport", "prepare_onnx", "quantize_onnx", "quantize_onnx_to_target", "quantize_to_target", "sensitivity"]
