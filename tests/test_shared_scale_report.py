"""A Concat forced onto one scale (the spec) that crushes one of its inputs is reported, never
silent: a detection head's box coordinates concatenated with its sigmoid class scores."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import torchq
from onnx_backend import validate
from onnx_backend.planner import SHARED_SCALE_MIN_STEPS
from tests.conftest import run_onnx


class Head(nn.Module):
    """YOLO-style: boxes in pixels (hundreds) beside scores in [0, 1], one output tensor."""

    def __init__(self, box_scale: float):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.boxes = nn.Conv2d(8, 4, 1)
        self.scores = nn.Conv2d(8, 3, 1)
        self.box_scale = box_scale

    def forward(self, x):
        f = torch.relu(self.body(x))
        return torch.cat([self.boxes(f) * self.box_scale, torch.sigmoid(self.scores(f))], 1)


def _quantize(box_scale: float, dynamo: bool):
    model = Head(box_scale).eval()
    data = [torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    torchq.prepare(model)
    try:
        torchq.calibrate(model, data, quiet=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            qmodel, report = torchq.export_with_report(model, data[0][:1], dynamo=dynamo, input_names=["x"], output_names=["y"])
    finally:
        torchq.unprepare(model)
    return model, qmodel, report, [str(w.message) for w in caught]


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_scores_crushed_by_box_coordinates_are_reported(dynamo):
    model, qmodel, report, caught = _quantize(200.0, dynamo)
    assert not validate(qmodel)  # the spec holds: one scale over the Concat
    crushed = report.backend.plan.crushed_inputs
    assert len(crushed) == 1, crushed
    (why,) = crushed.values()
    assert "Concat" in why and "steps" in why
    assert any("Concat" in m and "steps" in m for m in caught), caught
    assert report.backend.to_dict()["crushed_inputs"] == crushed
    assert "crushed" in report.describe()
    # and it is real: the score channels hold fewer than SHARED_SCALE_MIN_STEPS distinct values
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    scores = run_onnx(qmodel, {"x": x.numpy()})[0][:, 4:]
    assert len(np.unique(np.round(scores, 6))) < SHARED_SCALE_MIN_STEPS


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_comparable_ranges_are_not_reported(dynamo):
    _, qmodel, report, caught = _quantize(1.0, dynamo)
    assert not validate(qmodel)
    assert report.backend.plan.crushed_inputs == {}
    assert not any("steps" in m for m in caught)
