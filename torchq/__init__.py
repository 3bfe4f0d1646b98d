"""torchq: post-training INT8 quantization of PyTorch models to TFLite-spec QDQ ONNX.

    model = torchq.prepare(model, torchq.QuantConfig(method="mse"))
    for x, _ in loader:          # your own calibration loop
        model(x)
    qmodel = torchq.export(model, example_inputs=(x[:1],), path="model.int8.onnx")
    torchq.unprepare(model)
"""

from onnx_backend.errors import CalibrationError, ConfigError, InvalidModelError, OutputPathError, TorchqError

from .api import calibrate, quantize
from .config import Override, QuantConfig
from .export import ExportReport, export, export_float, export_with_report
from .prepare import is_prepared, prepare, unprepare
from .qat import QATConfig, prepare_qat
from .recipes import Recipe
from .techniques import quantize_onnx, quantize_to_target, sensitivity

__version__ = "0.1.0"

__all__ = [
    "CalibrationError",
    "ConfigError",
    "ExportReport",
    "InvalidModelError",
    "OutputPathError",
    "Override",
    "QATConfig",
    "QuantConfig",
    "Recipe",
    "TorchqError",
    "calibrate",
    "export",
    "export_float",
    "export_with_report",
    "is_prepared",
    "prepare",
    "prepare_qat",
    "quantize",
    "quantize_onnx",
    "quantize_to_target",
    "sensitivity",
    "unprepare",
]
