"""ConvTranspose weights whose groups each read several input channels but write one output
channel (C_out / group == 1, C_in / group > 1): an axis-0 (input channel) scale would vary
inside one output channel's sum, and the planner crashed on it (32 scales for 16 outputs)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

import torchq
from onnx_backend import assert_valid, spec
from tests.conftest import run_onnx


def test_weight_axis_is_per_output_channel_only_when_each_group_reads_one_channel():
    assert spec.weight_axis("ConvTranspose", {"group": 16}, (16, 1, 3, 3)) == 0  # depthwise
    assert spec.weight_axis("ConvTranspose", {"group": 16}, (32, 1, 3, 3)) == 1  # 2 inputs per group
    assert spec.weight_axis("ConvTranspose", {"group": 4}, (16, 4, 3, 3)) == 1


def test_conv_transpose_with_two_input_channels_per_group_quantizes_and_runs():
    torch.manual_seed(0)
    model = nn.ConvTranspose2d(32, 16, 3, padding=1, groups=16).eval()
    data = [(torch.randn(2, 32, 8, 8),) for _ in range(4)]
    torchq.prepare(model, torchq.QuantConfig(target=None))
    torchq.calibrate(model, data)
    q, _ = torchq.export_with_report(model, data[0], dynamo=True)
    torchq.unprepare(model)
    assert_valid(q)
    x = data[1][0]
    (y,) = run_onnx(q, {q.graph.input[0].name: x.numpy()})
    ref = model(x).detach().numpy()
    assert np.abs(y - ref).max() < 0.05 * np.abs(ref).max()
