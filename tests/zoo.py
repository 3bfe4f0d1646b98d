"""The test zoo: small architectures covering the patterns INT8 quantization must get right.

Each entry builds a model (eval mode, BatchNorm statistics made non-trivial) and its inputs.
Used by the spine's tests, the NPU simulator's agreement tests and the latency benchmark.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


class ConvBnRelu(nn.Module):
    def __init__(self):
        super().__init__()
        layers = []
        for cin, cout in ((3, 16), (16, 32), (32, 32)):
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(x + y)


class Inception(nn.Module):
    def __init__(self):
        super().__init__()
        self.b1 = nn.Conv2d(3, 8, 1)
        self.b3 = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1))
        self.b5 = nn.Conv2d(3, 8, 5, padding=2)
        self.proj = nn.Conv2d(3, 8, 1)

    def forward(self, x):
        pool = self.proj(F.max_pool2d(x, 3, stride=1, padding=1))
        y = torch.cat([F.relu(self.b1(x)), F.relu(self.b3(x)), F.relu(self.b5(x)), pool], dim=1)
        return F.max_pool2d(y, 2)


class DepthwiseSeparable(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU6())

    def forward(self, x):
        return self.pw(self.dw(self.stem(x)))


class SqueezeExcitation(nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = F.silu(self.bn(self.conv(x)))
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.fc2(F.silu(self.fc1(s))))
        x = x * s
        return F.hardswish(self.out(x))


class FlattenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm encoder block with explicit attention matmuls, softmax, GELU MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.mlp1 = nn.Linear(d, 4 * d)
        self.mlp2 = nn.Linear(4 * d, d)

    def forward(self, x):
        b, t, d = x.shape
        h = self.ln1(x)
        q, k, v = self.qkv(h).chunk(3, dim=-1)
        q = q.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)
        k = k.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)
        v = v.view(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)
        att = torch.softmax(q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5, dim=-1)
        y = (att @ v).permute(0, 2, 1, 3).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.mlp2(F.gelu(self.mlp1(self.ln2(x))))


class TorchEncoderLayer(nn.Module):
    """nn.TransformerEncoderLayer (nn.MultiheadAttention inside)."""

    def __init__(self, d=32):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(d, 4, dim_feedforward=64, dropout=0.0, batch_first=True)

    def forward(self, x):
        return self.layer(x)


class TwoInTwoOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.head1 = nn.Conv2d(8, 4, 1)
        self.head2 = nn.Linear(8, 5)

    def forward(self, image, mask):
        y = F.relu(self.a(image)) + F.relu(self.b(mask))
        return self.head1(y), self.head2(y.mean((2, 3)))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.enc2 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())
        self.dec = nn.Sequential(nn.Conv2d(24, 8, 3, padding=1), nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        up = F.interpolate(e2, scale_factor=2.0, mode="nearest")
        return self.out(self.dec(torch.cat([up, e1], dim=1)))


class ConvTransposeGroups(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.up_grouped = nn.ConvTranspose2d(16, 16, 4, stride=2, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(16)
        self.up_depthwise = nn.ConvTranspose2d(16, 16, 3, stride=1, padding=1, groups=16)

    def forward(self, x):
        x = F.relu(self.conv(x))
        x = F.relu(self.bn(self.up_grouped(x)))
        return self.up_depthwise(x)


@dataclass
class ZooEntry:
    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[torch.Generator], tuple[torch.Tensor, ...]]
    input_names: list[str] = field(default_factory=lambda: ["x"])
    output_names: list[str] = field(default_factory=lambda: ["y"])

    def model(self) -> nn.Module:
        torch.manual_seed(0)
        return _randomize_bn(self.build(), 1)

    def calibration(self, n: int = 8, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
        g = torch.Generator().manual_seed(seed)
        return [self.inputs(g) for _ in range(n)]


def _image(c=3, s=16, batch=2):
    return lambda g: (torch.randn(batch, c, s, s, generator=g),)


def _tokens(t=12, d=32, batch=2):
    return lambda g: (torch.randn(batch, t, d, generator=g),)


ZOO: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("conv_bn_relu", ConvBnRelu, _image()),
        ZooEntry("residual", Residual, _image()),
        ZooEntry("inception", Inception, _image()),
        ZooEntry("depthwise_separable", DepthwiseSeparable, _image()),
        ZooEntry("squeeze_excitation", SqueezeExcitation, _image()),
        ZooEntry("flatten_linear", FlattenLinear, _image()),
        ZooEntry("transformer_block", TransformerBlock, _tokens()),
        ZooEntry("torch_encoder_layer", TorchEncoderLayer, _tokens()),
        ZooEntry(
            "two_in_two_out",
            TwoInTwoOut,
            lambda g: (torch.randn(2, 3, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g)),
            ["image", "mask"],
            ["seg", "cls"],
        ),
        ZooEntry("unet", UNet, _image()),
        ZooEntry("conv_transpose_groups", ConvTransposeGroups, _image()),
    ]
}
