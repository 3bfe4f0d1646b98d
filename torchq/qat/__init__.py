"""Quantization-aware fine-tuning: the forward computes what the exported INT8 model computes.

    torchq.prepare(model, torchq.QuantConfig()); calibrate ...   # or calibration_data=loader
    torchq.prepare_qat(model, torchq.QATConfig(), example_inputs=x)
    ... your own training loop (model.parameters() includes the learnable scales) ...
    # or: torchq.qat.distill(model, float_model, loader, steps=200, heldout=val_loader)
    torchq.export(model, x, "model.int8.onnx")                   # learned scales and weights
"""

from .config import QATConfig
from .distill import distill
from .prepare import is_qat, prepare_qat, qat_state

__all__ = ["QATConfig", "distill", "is_qat", "prepare_qat", "qat_state"]
