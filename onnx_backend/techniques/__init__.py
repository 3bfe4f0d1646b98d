"""Accuracy techniques on the optimized float ONNX graph, one module per technique, composed by
`pipeline` (no torch here; AdaRound lives in torchq.techniques and plugs in as `rounding`).

    from onnx_backend.techniques import Options, quantize_with_techniques
    qmodel, report = quantize_with_techniques("model.onnx", samples, Options(equalization=True, bias_correction=True))

Modules: equalization, bias_correction, smoothquant, calibration (attention masks),
auto_method (method "auto"), sensitivity, fallback (accuracy target), pipeline.
"""

from .fallback import TargetReport, quantize_to_target
from .pipeline import Options, Prepared, TechniquesReport, quantize_with_techniques, run_pipeline
from .sensitivity import SensitivityReport, analyze, output_sqnr_metric

__all__ = [
    "Options",
    "Prepared",
    "SensitivityReport",
    "TargetReport",
    "TechniquesReport",
    "analyze",
    "output_sqnr_metric",
    "quantize_to_target",
    "quantize_with_techniques",
    "run_pipeline",
]
