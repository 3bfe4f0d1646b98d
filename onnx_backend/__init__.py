"""ONNX backend of torchq: graph optimization, calibration, range selection, TFLite-spec QDQ.

Float ONNX in, quantized ONNX out, with the FuriosaAI SDK quantizer's API names::

    model = optimize_model(onnx.load("model.onnx"))
    calibrator = Calibrator(model, CalibrationMethod.MSE_ASYM)
    calibrator.collect_data([[x] for x in samples])
    ranges = calibrator.compute_range()
    qmodel = quantize(model, ranges)
"""

from . import markers  # registers the torchq::Mark schema
from .calibrator import CalibrationMethod, Calibrator, Ranges, get_pure_input_names, load_ranges, save_ranges
from .errors import CalibrationError, ConfigError, InvalidModelError, OutputPathError, TorchqError
from .model_editor import ModelEditor, TensorType
from .model_io import load_model, save_model
from .optimize import optimize_model
from .qmath import QuantParams
from .quantizer import QuantizationReport, quantize, quantize_with_report
from .range_selection import Method, select_range
from .statistics import TensorStatistics
from .validate import Violation, assert_valid, validate

__all__ = [
    "CalibrationError",
    "CalibrationMethod",
    "Calibrator",
    "ConfigError",
    "InvalidModelError",
    "Method",
    "ModelEditor",
    "OutputPathError",
    "QuantParams",
    "QuantizationReport",
    "Ranges",
    "TensorStatistics",
    "TensorType",
    "TorchqError",
    "Violation",
    "assert_valid",
    "get_pure_input_names",
    "load_model",
    "load_ranges",
    "markers",
    "optimize_model",
    "quantize",
    "quantize_with_report",
    "save_model",
    "save_ranges",
    "select_range",
    "validate",
]
