"""Models trained to stress INT8, for measuring the accuracy techniques (docs/ACCURACY.md).

All are trained on scikit-learn's bundled digits (real data, deterministic, cached under
bench/.cache/techniques so the measurement does not retrain):

* `mobilenet`     MobileNetV2-style: inverted residuals, 3x3 depthwise convs, ReLU6, on 16x16 images.
                  BatchNorm folded into depthwise convs gives channels of wildly different ranges.
* `efficientnet`  EfficientNet-style: depthwise convs, SiLU, squeeze-excitation, on 16x16 images.
* `transformer`   A small transformer over the digit's non-blank 2x2 patches (7 to 16 tokens),
                  padded to 16 tokens with an additive attention mask (-1e4 on padding, as BERT
                  does), mean-pooled over the real tokens. `transformer_outliers` is the same
                  trained network with outlier channels: a few LayerNorm output channels scaled
                  up 40x and the Linear after them scaled down to match, so the float function
                  is identical (up to rounding) but those channels dominate the LayerNorm output's
                  range, as the outlier features of large transformers do.

    python -m bench.technique_models          # trains (once) and prints float accuracies
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from .common import load_or_train

SEED = 0
CACHE = Path(__file__).resolve().parent / ".cache" / "techniques"
TOKENS = 16  # 2x2 patches of an 8x8 digit
OUTLIER_CHANNELS = (3, 17)
OUTLIER_SCALE = 40.0

# ---- data -------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _split() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(x, d.target.astype(np.int64), test_size=0.3, random_state=SEED, stratify=d.target)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def images(split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1, 16, 16) images in [0, 1] (bilinear upsampling of the 8x8 digits) and labels."""
    d = _split()
    x = torch.from_numpy(d[f"x_{split}"][:, None])
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False).clamp(0, 1).numpy()
    return x, d[f"y_{split}"]


def tokens(split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(patches (N, 16, 4), attention mask (N, 16) of 1/0, labels): the non-blank 2x2 patches of
    each digit first (with their position index in feature 4), then padding. Padding slots hold
    noise, so a mask that leaks changes the answer."""
    d = _split()
    x = d[f"x_{split}"]
    n = x.shape[0]
    patches = x.reshape(n, 4, 2, 4, 2).transpose(0, 1, 3, 2, 4).reshape(n, TOKENS, 4)
    rng = np.random.default_rng(1 if split == "train" else 2)
    out = rng.uniform(0, 1, size=(n, TOKENS, 5)).astype(np.float32)
    mask = np.zeros((n, TOKENS), np.float32)
    for i in range(n):
        keep = np.flatnonzero(patches[i].sum(1) > 0)
        out[i, : keep.size, :4] = patches[i, keep]
        out[i, : keep.size, 4] = keep / (TOKENS - 1)
        mask[i, : keep.size] = 1
    return out, mask, d[f"y_{split}"]


# ---- models -----------------------------------------------------------------------------------


def conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU6):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(conv_bn(cin, hidden, 1), conv_bn(hidden, hidden, 3, stride, hidden), conv_bn(hidden, cout, 1, act=None))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16, 3, 1)
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1, 4), InvertedResidual(16, 24, 2, 4), InvertedResidual(24, 24, 1, 4), InvertedResidual(24, 32, 2, 4), InvertedResidual(32, 32, 1, 4))
        self.last = conv_bn(32, 96, 1)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(self.last(self.blocks(self.stem(x))).mean((2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, c, squeeze):
        super().__init__()
        self.reduce, self.expand = nn.Conv2d(c, squeeze, 1), nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.expand(F.silu(self.reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    def __init__(self, cin, cout, k, stride, expand):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            conv_bn(cin, hidden, 1, act=nn.SiLU), conv_bn(hidden, hidden, k, stride, hidden, act=nn.SiLU), SqueezeExcite(hidden, max(4, cin // 4)), conv_bn(hidden, cout, 1, act=None)
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class EfficientNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(1, 16, 3, 1, act=nn.SiLU)
        self.blocks = nn.Sequential(MBConv(16, 16, 3, 1, 4), MBConv(16, 24, 3, 2, 4), MBConv(24, 24, 5, 1, 4), MBConv(24, 40, 3, 2, 4), MBConv(40, 40, 3, 1, 4))
        self.last = conv_bn(40, 96, 1, act=nn.SiLU)
        self.fc = nn.Linear(96, 10)

    def forward(self, x):
        return self.fc(self.last(self.blocks(self.stem(x))).mean((2, 3)))


class Block(nn.Module):
    """Pre-norm encoder block with explicit attention, an additive mask and a GELU MLP."""

    def __init__(self, d=32, heads=4):
        super().__init__()
        self.heads = heads
        self.ln1, self.qkv, self.proj = nn.LayerNorm(d), nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ln2, self.fc1, self.fc2 = nn.LayerNorm(d), nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x, additive_mask):
        b, t, d = x.shape
        hd = d // self.heads
        q, k, v = self.qkv(self.ln1(x)).reshape(b, t, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) * hd**-0.5 + additive_mask
        y = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(y)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class PaddedTransformer(nn.Module):
    def __init__(self, d=32, depth=2):
        super().__init__()
        self.embed = nn.Linear(5, d)
        self.pos = nn.Parameter(torch.zeros(1, TOKENS, d))
        nn.init.normal_(self.pos, std=0.1)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))
        self.norm, self.head = nn.LayerNorm(d), nn.Linear(d, 10)

    def forward(self, patches, attention_mask):
        additive = (1.0 - attention_mask)[:, None, None, :] * -10000.0
        x = self.embed(patches) + self.pos
        for block in self.blocks:
            x = block(x, additive)
        m = attention_mask[..., None]
        pooled = (self.norm(x) * m).sum(1) / m.sum(1)
        return self.head(pooled)


@torch.no_grad()
def add_outliers(model: PaddedTransformer, channels=OUTLIER_CHANNELS, scale=OUTLIER_SCALE) -> PaddedTransformer:
    """Scale LayerNorm output channels up and the next Linear's input columns down: same function."""
    for block in model.blocks:
        for ln, fc in ((block.ln1, block.qkv), (block.ln2, block.fc1)):
            for c in channels:
                ln.weight[c] *= scale
                ln.bias[c] *= scale
                fc.weight[:, c] /= scale
    return model


BUILDERS = {"mobilenet": MobileNetLike, "efficientnet": EfficientNetLike, "transformer": PaddedTransformer}
EPOCHS = {"mobilenet": 25, "efficientnet": 25, "transformer": 60}


def _train(name: str, model: nn.Module) -> None:
    torch.manual_seed(SEED)
    if name == "transformer":
        p, m, y = tokens("train")
        data = TensorDataset(torch.from_numpy(p), torch.from_numpy(m), torch.from_numpy(y))
    else:
        x, y = images("train")
        data = TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    loader = DataLoader(data, batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(SEED))
    epochs = EPOCHS[name]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for *xs, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(*xs), yb).backward()
            opt.step()
            sched.step()
    model.eval()


def load(name: str) -> nn.Module:
    """A trained model: mobilenet, efficientnet, transformer or transformer_outliers."""
    base = "transformer" if name == "transformer_outliers" else name
    if base not in BUILDERS:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(list(BUILDERS) + ['transformer_outliers'])}")
    torch.manual_seed(SEED)
    model = BUILDERS[base]()
    load_or_train(model, CACHE / f"{base}_e{EPOCHS[base]}.pt", lambda: _train(base, model))
    return add_outliers(model) if name == "transformer_outliers" else model


# ---- evaluation and calibration data ---------------------------------------------------------


def is_sequence(name: str) -> bool:
    return name.startswith("transformer")


def input_names(name: str) -> list[str]:
    return ["patches", "attention_mask"] if is_sequence(name) else ["image"]


def test_inputs(name: str) -> tuple[list[np.ndarray], np.ndarray]:
    if is_sequence(name):
        p, m, y = tokens("test")
        return [p, m], y
    x, y = images("test")
    return [x], y


def calibration_samples(name: str, n: int = 256, batch: int = 32) -> list[list[np.ndarray]]:
    """Batches of the first `n` training samples, as model inputs (lists of arrays)."""
    arrays = list(tokens("train")[:2]) if is_sequence(name) else [images("train")[0]]
    return [[a[i : i + batch] for a in arrays] for i in range(0, n, batch)]


def evaluate(name: str, model) -> float:
    """Top-1 accuracy (%) on the held-back split: a torch module, or an ONNX model (proto/path)."""
    inputs, y = test_inputs(name)
    if isinstance(model, nn.Module):
        with torch.no_grad():
            logits = model(*[torch.from_numpy(a) for a in inputs]).numpy()
    else:
        import onnxruntime as ort

        data = str(model) if isinstance(model, (str, Path)) else model.SerializeToString()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.log_severity_level = 3
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        names = [i.name for i in sess.get_inputs()]
        logits = sess.run(None, dict(zip(names, inputs)))[0]
    return float((logits.argmax(1) == y).mean() * 100)


def main() -> int:
    torch.set_num_threads(1)
    for name in ["mobilenet", "efficientnet", "transformer", "transformer_outliers"]:
        model = load(name)
        print(f"{name}: float accuracy {evaluate(name, model):.2f} %", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
