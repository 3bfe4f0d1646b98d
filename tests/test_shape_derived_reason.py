"""A float tensor computed from tensor shapes alone (the TorchScript exporter writes
scaled_dot_product_attention's 1 / sqrt(head size) as Shape -> Cast -> ... ) has no data to
calibrate: the report says so instead of 'no calibration statistics'."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import torchq
from onnx_backend import validate
from onnx_backend.planner import SHAPE_DERIVED


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(16, 48)
        self.out = torch.nn.Linear(16, 16)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        return self.out(F.scaled_dot_product_attention(q, k, v))


def test_shape_derived_scalars_are_reported_as_such():
    model = Attention().eval()
    xs = [torch.randn(2, 6, 16, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    torchq.prepare(model)
    try:
        torchq.calibrate(model, xs, quiet=True)
        qmodel, report = torchq.export_with_report(model, xs[0], dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch", 1: "tokens"}, "y": {0: "batch", 1: "tokens"}})
    finally:
        torchq.unprepare(model)
    assert not validate(qmodel)
    reasons = set(report.float_tensors.values())
    assert SHAPE_DERIVED in reasons, report.describe()
    assert "no calibration statistics for this tensor" not in reasons, report.describe()
