"""Small networks built to exercise one accuracy technique each (random weights, real exports)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn


def export(model: nn.Module, inputs: tuple[torch.Tensor, ...], names=("x",), outputs=("y",), opset: int = 17) -> onnx.ModelProto:
    buf = io.BytesIO()
    dyn = {n: {0: "batch"} for n in (*names, *outputs)}
    torch.onnx.export(model.eval(), inputs, buf, dynamo=False, opset_version=opset, input_names=list(names), output_names=list(outputs), dynamic_axes=dyn)
    return onnx.load_from_string(buf.getvalue())


def log_uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n).uniform_(np.log(lo), np.log(hi), generator=g))


class ConvChain(nn.Module):
    """conv -> act -> (depthwise or full) conv -> act -> 1x1 conv, output channels of the first two
    convs scaled by factors from 1e-2 to 1e2 and compensated in the next conv: the function of a
    balanced network, with wildly unbalanced per-channel weight ranges (what BatchNorm folding
    does to depthwise networks)."""

    def __init__(self, depthwise: bool = True, act: type[nn.Module] = nn.ReLU, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.a1 = act()
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, groups=8 if depthwise else 1)
        self.a2 = act()
        self.c3 = nn.Conv2d(8, 16, 1)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            if act is nn.ReLU:
                for first, second in ((self.c1, self.c2), (self.c2, self.c3)):
                    f = log_uniform(8, 1e-2, 1e2, g)
                    first.weight.mul_(f[:, None, None, None])
                    first.bias.mul_(f)
                    if second.groups == 1:
                        second.weight.div_(f[None, :, None, None])
                    else:
                        second.weight.div_(f[:, None, None, None])

    def forward(self, x):
        return self.c3(self.a2(self.c2(self.a1(self.c1(x)))))


def images(n: int, batch: int = 4, size: int = 12, seed: int = 0) -> list[list[np.ndarray]]:
    g = np.random.default_rng(seed)
    return [[g.standard_normal((batch, 3, size, size)).astype(np.float32)] for _ in range(n)]


class OutlierMLP(nn.Module):
    """Linear -> ReLU -> Linear -> ReLU -> Linear. Channel 0 of the first hidden layer is scaled up
    1000x and the next layer's input column 0 down to match: the same function, but one per-tensor
    int8 scale for that hidden tensor wipes out the other channels."""

    def __init__(self, seed: int = 0, outlier: float = 1000.0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)
        with torch.no_grad():
            self.fc1.weight[0] *= outlier
            self.fc1.bias[0] = self.fc1.bias[0].abs() * outlier + outlier  # always active
            self.fc2.weight[:, 0] /= outlier

    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class LayerNormLinear(nn.Module):
    """LayerNorm -> Linear -> GELU -> Linear over tokens; LayerNorm output channels 1 and 5 carry
    outliers (gamma x 50), the Linear reading them is scaled down to match."""

    def __init__(self, d: int = 16, seed: int = 0, outlier: float = 50.0):
        super().__init__()
        torch.manual_seed(seed)
        self.ln = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        with torch.no_grad():
            for c in (1, 5):
                self.ln.weight[c] *= outlier
                self.ln.bias[c] = 0.5 * outlier
                self.fc1.weight[:, c] /= outlier

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(self.ln(x))))


class MaskedAttention(nn.Module):
    """One attention layer over padded sequences: scores + additive mask -> softmax.

    mask_kind: "additive" ((1 - m) * -1e4, BERT), "finfo" ((1 - m) * float32 min), or "fill"
    (masked_fill with -inf)."""

    def __init__(self, d: int = 16, mask_kind: str = "additive", seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.mask_kind = mask_kind
        self.d = d

    def forward(self, x, attention_mask):
        scores = self.q(x) @ self.k(x).transpose(-2, -1) * self.d**-0.5
        m = attention_mask[:, None, :]
        if self.mask_kind == "fill":
            scores = scores.masked_fill(m == 0, float("-inf"))
        else:
            big = torch.finfo(torch.float32).min if self.mask_kind == "finfo" else -10000.0
            scores = scores + (1.0 - m) * big
        return self.o(torch.softmax(scores, dim=-1) @ self.v(x))


def padded_batches(n: int, batch: int = 4, length: int = 12, d: int = 16, seed: int = 0) -> list[list[np.ndarray]]:
    """(tokens, mask) batches: real lengths 3..length, padding slots hold large noise."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = g.standard_normal((batch, length, d)).astype(np.float32)
        mask = np.zeros((batch, length), np.float32)
        for b in range(batch):
            real = int(g.integers(3, length + 1))
            mask[b, :real] = 1
            x[b, real:] *= 5.0
        out.append([x, mask])
    return out


class PostNormFFN(nn.Module):
    """A post-norm transformer's FFN sublayer, LN(h + fc2(gelu(fc1(h)))) with h = LN(x), with
    BERT's massive activation planted the way BERT grows it: the first token carries a large
    input feature, one fc1 unit fires only there, and fc2 writes it, 40x, into one output
    channel, so the FFN output that the residual sum reads holds one huge value per sequence."""

    def __init__(self, d: int = 16, ff: int = 64, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, ff), nn.Linear(ff, d)
        with torch.no_grad():
            self.fc1.weight[0].zero_()
            self.fc1.weight[0, 0], self.fc1.bias[0] = 4.0, -8.0  # unit 0: only where h[..., 0] >> 2
            self.fc2.weight[:, 0].zero_()
            self.fc2.weight[3, 0] = 40.0 / 8.0

    def forward(self, x):
        h = self.ln1(x)
        return self.ln2(h + self.fc2(F.gelu(self.fc1(h))))


def first_token_marked(n: int, batch: int = 4, t: int = 8, d: int = 16, seed: int = 0) -> list[list[np.ndarray]]:
    """Token batches whose first token has feature 0 at 8 sigma (a [CLS] token's signature)."""
    g = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        x = g.standard_normal((batch, t, d)).astype(np.float32)
        x[:, 0, 0] = 8.0 * np.sqrt(d)
        out.append([x])
    return out
