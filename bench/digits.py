"""The trained benchmark models: five families on scikit-learn's bundled digits (real data).

The 8x8 digit images are upsampled once to 32x32 (bilinear) so that the networks have real
spatial depth (strided stages, depthwise 5x5 kernels, 4x4 patches). Each family is trained by a
deterministic script (fixed seeds, one thread, no augmentation) and cached under bench/.cache,
so the table does not retrain every time.

Importable pieces, for recipes (`bench.digits:<name>`):
  cnn_model, resnet_model, mobilenet_model, efficientnet_model, vit_model  -- trained models
  build_model(name)          -- the untrained architecture
  calibration_loader(...)    -- (images, labels) batches from the training split
  evaluate(model)            -- top-1 accuracy (%) on the held-back split (torch module or ONNX)
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .common import load_or_train

SEED = 0
SIZE = 32
EPOCHS = 15

# ---- data --------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def load_data() -> dict[str, np.ndarray]:
    """Stratified 70/30 split of the 1797 digits, (N, 1, 32, 32) float32 in [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.from_numpy((digits.images / 16.0).astype(np.float32)[:, None])
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.3, random_state=SEED, stratify=y)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def calibration_loader(batch_size: int = 32, num_samples: int = 256) -> DataLoader:
    """(images, labels) batches: the first `num_samples` of the training split."""
    d = load_data()
    ds = TensorDataset(torch.from_numpy(d["x_train"][:num_samples]), torch.from_numpy(d["y_train"][:num_samples]))
    return DataLoader(ds, batch_size=batch_size)


def calibration_arrays(num_samples: int = 256) -> np.ndarray:
    return load_data()["x_train"][:num_samples]


def test_set() -> tuple[np.ndarray, np.ndarray]:
    d = load_data()
    return d["x_test"], d["y_test"]


def evaluate(model) -> float:
    """Top-1 accuracy (%) on the held-back split, of a torch module (or GraphModule), an ONNX
    ModelProto or an ONNX path."""
    x, y = test_set()
    if isinstance(model, nn.Module) or callable(model) and not isinstance(model, (str, Path)):
        with torch.no_grad():
            logits = torch.cat([model(torch.from_numpy(x[i : i + 128])) for i in range(0, len(x), 128)]).numpy()
    else:
        from .common import run_batched, session

        sess = session(model)
        logits = run_batched(sess, {sess.get_inputs()[0].name: x})[0]
    return float((logits.argmax(1) == y).mean() * 100)


# ---- the five families -------------------------------------------------------------------------


def conv_bn(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class PlainCNN(nn.Module):
    """VGG-style: conv-bn-relu stacks, max pooling, global average, linear head."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, 16), conv_bn(16, 32), nn.MaxPool2d(2), conv_bn(32, 64), nn.MaxPool2d(2), conv_bn(64, 64), nn.MaxPool2d(2)
        )
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = conv_bn(cin, cout, 3, stride)
        self.conv2 = conv_bn(cout, cout, 3, 1, act=None)
        self.shortcut = conv_bn(cin, cout, 1, stride, act=None) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        return F.relu(self.conv2(self.conv1(x)) + self.shortcut(x))


class ResNet(nn.Module):
    """ResNet-20-style (CIFAR layout): three stages of two basic blocks, functional residual adds."""

    def __init__(self, classes: int = 10, widths=(16, 32, 64)):
        super().__init__()
        self.stem = conv_bn(1, widths[0])
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks += [BasicBlock(cin, w, 1 if i == 0 else 2), BasicBlock(w, w, 1)]
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(self.blocks(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand (ReLU6), 3x3 depthwise (ReLU6), 1x1 linear projection."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers = [conv_bn(cin, hidden, 1, act=nn.ReLU6)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, 3, stride, groups=hidden, act=nn.ReLU6), conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expand, channels, repeats, stride)
    CONFIG = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 2, 2), (6, 64, 2, 2))

    def __init__(self, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, 16, 3, 1, act=nn.ReLU6)]
        cin = 16
        for t, c, n, s in self.CONFIG:
            for i in range(n):
                layers.append(InvertedResidual(cin, c, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 128, 1, act=nn.ReLU6))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.reduce = nn.Conv2d(c, squeeze, 1)
        self.expand = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet block: expand (SiLU), depthwise k x k (SiLU), squeeze-excitation, project."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = [conv_bn(cin, hidden, 1, act=nn.SiLU)] if expand != 1 else []
        layers += [conv_bn(hidden, hidden, k, stride, groups=hidden, act=nn.SiLU), SqueezeExcite(hidden, max(1, cin // 4)), conv_bn(hidden, cout, 1, act=None)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class EfficientNet(nn.Module):
    # (expand, channels, repeats, stride, kernel)
    CONFIG = ((1, 16, 1, 1, 3), (4, 24, 2, 2, 3), (4, 40, 2, 2, 5), (4, 64, 2, 2, 3))

    def __init__(self, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [conv_bn(1, 16, 3, 1, act=nn.SiLU)]
        cin = 16
        for t, c, n, s, k in self.CONFIG:
            for i in range(n):
                layers.append(MBConv(cin, c, k, s if i == 0 else 1, t))
                cin = c
        layers.append(conv_bn(cin, 128, 1, act=nn.SiLU))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(128, classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: explicit attention matmuls and softmax, GELU MLP."""

    def __init__(self, d: int, heads: int, mlp: int):
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, mlp)
        self.fc2 = nn.Linear(mlp, d)

    def forward(self, x):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        att = torch.softmax((q @ k.transpose(-2, -1)) * hd**-0.5, dim=-1)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class ViT(nn.Module):
    """A small vision transformer: 4x4 patches (64 tokens), learned positions, two blocks."""

    def __init__(self, classes: int = 10, d: int = 64, depth: int = 2, heads: int = 4, patch: int = 4):
        super().__init__()
        self.patch = nn.Conv2d(1, d, patch, patch)
        self.pos = nn.Parameter(torch.zeros(1, (SIZE // patch) ** 2, d))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[EncoderBlock(d, heads, 2 * d) for _ in range(depth)])
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.blocks(x)).mean(1))


FAMILIES: dict[str, tuple[str, Callable[[], nn.Module]]] = {
    "cnn": ("plain CNN", PlainCNN),
    "resnet": ("ResNet-style", ResNet),
    "mobilenet": ("MobileNetV2-style (depthwise, ReLU6)", MobileNetV2),
    "efficientnet": ("EfficientNet-style (SiLU, squeeze-excitation)", EfficientNet),
    "vit": ("small transformer (ViT)", ViT),
}


def build_model(name: str) -> nn.Module:
    if name not in FAMILIES:
        raise KeyError(f"unknown digits model {name!r}; known: {', '.join(FAMILIES)}")
    torch.manual_seed(SEED)
    return FAMILIES[name][1]()


# ---- deterministic training, cached ------------------------------------------------------------


def train(model: nn.Module, epochs: int = EPOCHS, subset: int | None = None) -> nn.Module:
    d = load_data()
    x, y = torch.from_numpy(d["x_train"][:subset]), torch.from_numpy(d["y_train"][:subset])
    g = torch.Generator().manual_seed(SEED)
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
            sched.step()
    return model.eval()


def cache_dir() -> Path:
    from .common import CACHE

    return Path(os.environ.get("TORCHQ_BENCH_CACHE", CACHE))


def load_trained(name: str, epochs: int = EPOCHS, subset: int | None = None, cache: str | Path | None = None) -> nn.Module:
    """The trained model `name`; its weights are cached (keyed by the training settings)."""
    model = build_model(name)
    path = Path(cache or cache_dir()) / f"digits_{name}_e{epochs}_n{subset or 'all'}.pt"
    return load_or_train(model, path, lambda: train(model, epochs, subset))


def cnn_model() -> nn.Module:
    return load_trained("cnn")


def resnet_model() -> nn.Module:
    return load_trained("resnet")


def mobilenet_model() -> nn.Module:
    return load_trained("mobilenet")


def efficientnet_model() -> nn.Module:
    return load_trained("efficientnet")


def vit_model() -> nn.Module:
    return load_trained("vit")
