"""Small models, one or two ops each, covering what typical benchmark CNNs and transformers
use beyond the test zoo (pooling, resizing, padding, indexing, elementwise tables, ...)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Lambda(nn.Module):
    def __init__(self, fn: Callable, conv_in: int = 3, conv_out: int = 8, **conv):
        super().__init__()
        self.conv = nn.Conv2d(conv_in, conv_out, 3, padding=1, **conv)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.conv(x))


class TwoBranch(nn.Module):
    """Two convs feeding a binary op (both operands are activations with their own scales)."""

    def __init__(self, fn: Callable):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 1)
        self.fn = fn

    def forward(self, x):
        return self.fn(self.a(x), F.relu(self.b(x)))


class Convs(nn.Module):
    """Dilated, strided, grouped and depthwise convolutions with ReLU6 (Clip) and ReLU."""

    def __init__(self):
        super().__init__()
        self.strided = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.dilated = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 5, padding=2, groups=16)
        self.pointwise = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        x = F.relu(self.strided(x))
        x = F.relu6(self.dilated(x))
        x = self.grouped(x)
        x = F.relu6(self.depthwise(x))
        return self.pointwise(x)


class Head(nn.Module):
    """ResNet-style head: global average pool, flatten, linear, softmax."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        return torch.softmax(self.fc(torch.flatten(self.pool(x), 1)), dim=1)


@dataclass
class OpCase:
    name: str
    build: Callable[[], nn.Module]
    ops: tuple[str, ...]  # ONNX op types that must run as integer kernels (either exporter)
    shape: tuple[int, ...] = (2, 3, 16, 16)
    # TFLite rounds exact ties of these averages away from zero, onnxruntime to even: up to one
    # step apart there, identical elsewhere (tests/npu/test_kernels.py pins both)
    ties: bool = False


CASES = [
    OpCase("convs", Convs, ("Conv",)),
    OpCase("avg_pool", lambda: Lambda(lambda y: F.avg_pool2d(y, 2)), ("AveragePool",), ties=True),
    OpCase("avg_pool_padded", lambda: Lambda(lambda y: F.avg_pool2d(y, 3, stride=2, padding=1, count_include_pad=False)), ("AveragePool",), ties=True),
    OpCase("max_pool_ceil", lambda: Lambda(lambda y: F.max_pool2d(y, 3, stride=2, ceil_mode=True)), ("MaxPool",)),
    OpCase("head", Head, ("Gemm", "Softmax")),
    OpCase("resize_nearest", lambda: Lambda(lambda y: F.interpolate(y, scale_factor=2.0, mode="nearest")), ("Resize",)),
    OpCase("resize_bilinear", lambda: Lambda(lambda y: F.interpolate(y, scale_factor=2.0, mode="bilinear", align_corners=False)), ("Resize",), ties=True),
    OpCase("resize_bilinear_corners", lambda: Lambda(lambda y: F.interpolate(y, size=(23, 23), mode="bilinear", align_corners=True)), ("Resize",), ties=True),
    OpCase("pad", lambda: Lambda(lambda y: F.pad(y, (1, 2, 0, 3), value=0.5)), ("Pad",)),
    OpCase("pad_reflect", lambda: Lambda(lambda y: F.pad(y, (2, 2, 1, 1), mode="reflect")), ("Pad",)),
    OpCase("tanh", lambda: Lambda(torch.tanh), ("Tanh",)),
    OpCase("sigmoid", lambda: Lambda(torch.sigmoid), ("Sigmoid",)),
    OpCase("hardswish", lambda: Lambda(F.hardswish), ("HardSwish",)),
    OpCase("leaky_relu", lambda: Lambda(lambda y: F.leaky_relu(y, 0.1)), ("LeakyRelu",)),
    OpCase("softmax_channels", lambda: Lambda(lambda y: torch.softmax(y, dim=1)), ("Softmax",)),
    OpCase("sub", lambda: TwoBranch(lambda a, b: a - b), ("Sub",)),
    OpCase("mul", lambda: TwoBranch(lambda a, b: a * b), ("Mul",)),
    OpCase("add_relu", lambda: TwoBranch(lambda a, b: F.relu(a + b)), ("Add",)),
    # after a Sigmoid: a step right after the Conv folds into its weights (onnx_backend.optimize)
    OpCase("div_const", lambda: Lambda(lambda y: torch.sigmoid(y) / 3.0), ("Div",)),
    OpCase("mul_const", lambda: Lambda(lambda y: torch.sigmoid(y) * 0.75), ("Mul",)),
    OpCase("concat", lambda: TwoBranch(lambda a, b: torch.cat([a, b], dim=1)), ("Concat",)),
    OpCase("max", lambda: TwoBranch(torch.maximum), ("Max",)),
    OpCase("slice", lambda: Lambda(lambda y: y[:, 2:7, 1:-1]), ("Slice",)),
    OpCase("gather", lambda: Lambda(lambda y: y[:, 3]), ("Gather",)),
    OpCase("squeeze_unsqueeze", lambda: Lambda(lambda y: y.mean((2, 3), keepdim=True).squeeze(-1).unsqueeze(1)), ("GlobalAveragePool", "Squeeze", "Unsqueeze")),  # the optimizer turns a spatial ReduceMean into GlobalAveragePool
    OpCase("expand", lambda: Lambda(lambda y: y.mean(1, keepdim=True).expand(-1, 4, -1, -1)), ("Expand",)),
    OpCase("transpose_reshape", lambda: Lambda(lambda y: y.permute(0, 2, 3, 1).reshape(2, -1, 8)), ("Transpose", "Reshape")),
    OpCase("split", lambda: Lambda(lambda y: torch.cat(y.split([3, 5], dim=1)[::-1], dim=1)), ("Split", "Concat")),
    OpCase("conv_transpose", lambda: Lambda(nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1)), ("ConvTranspose",)),
]
