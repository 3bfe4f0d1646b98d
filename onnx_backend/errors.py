"""Errors a user can act on. The CLI turns each into one line and exit code 2; anything else is
an internal error (exit code 1)."""


class TorchqError(Exception):
    """Base class of every error caused by the user's input (model, data, recipe, path)."""


class InvalidModelError(TorchqError):
    """The ONNX model cannot be read, is malformed, or cannot be quantized at all."""


class CalibrationError(TorchqError):
    """Calibration data is missing, empty, mismatched, or holds NaN/Inf."""


class ConfigError(TorchqError):
    """A configuration or recipe value is wrong (unknown key, wrong type, value not allowed)."""


class OutputPathError(TorchqError):
    """The output cannot be written; nothing was written."""
