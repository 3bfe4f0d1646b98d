"""Section: quantization-aware fine-tuning (torchq.prepare_qat + torchq.qat.distill), issue 20.

    python -m bench.qat [--quick] [--only minilm|lite0] [--budget SECONDS] [--out docs/bench/qat.md]
    (also the `qat` section of `python -m bench.run`)

Each model: PTQ with the default config (prepare -> calibrate -> export), then the same calibrated
model through prepare_qat and `distill` to the float model's outputs (MSE, no labels) within the
time budget, keeping the best state on held-back data, then `torchq.export`. Both INT8 models run
in onnxruntime; the metric is measured on evaluation data neither calibration nor fine-tuning saw.

* MiniLM (bench/minilm_hf.py: transformers' BertModel, SDPA, padded to 64 tokens, target
  warboy): mean / min cosine of the INT8 sentence embeddings to float on the paraphrase sentences.
  Fine-tuning sentences: the calibration sentences and recombinations of their halves (seeded).
* EfficientNet-Lite0 (ImageNet weights, bench/efficientnet_lite.py): top-1 agreement with float
  on evaluation crops of photos disjoint from the calibration / fine-tuning photos (bench/photos.py).
"""

from __future__ import annotations

import argparse
import copy
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch

DEFAULT_BUDGET_S = 540.0  # fine-tuning time per model, under the 10 minutes


@dataclass
class QatRow:
    model: str
    metric: str
    ptq: str
    qat: str
    steps: int
    seconds: float
    heldout_start: float
    heldout_best: float
    best_step: int
    samples: str
    extra: dict = field(default_factory=dict)


def recombined_sentences(sentences: list[str], n: int, seed: int) -> list[str]:
    """n sentences, each the first part of one sentence and the last part of another."""
    rng = random.Random(seed)
    words = [s.split() for s in sentences]
    out = []
    for _ in range(n):
        a, b = rng.sample(words, 2)
        out.append(" ".join(a[: rng.randint(1, max(1, len(a) - 1))] + b[rng.randint(1, max(1, len(b) - 1)) :]))
    return out


def _sentence_batches(sentences: list[str], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    from . import minilm_hf

    ids, mask = minilm_hf.tokenize(sentences)
    return [(torch.from_numpy(ids[i : i + batch]), torch.from_numpy(mask[i : i + batch])) for i in range(0, len(ids), batch)]


def minilm(budget_s: float, quick: bool, log=print) -> QatRow:
    import torchq
    from torchq.qat import distill

    from . import minilm_hf
    from .sentences import CALIBRATION

    torch.manual_seed(0)
    float_model = minilm_hf.load_model()
    model = minilm_hf.load_model()
    options = dict(input_names=["input_ids", "attention_mask"], output_names=["embedding"], dynamic_axes={"input_ids": {0: "batch"}, "attention_mask": {0: "batch"}, "embedding": {0: "batch"}})
    x = minilm_hf.example_inputs()
    torchq.prepare(model, torchq.QuantConfig())
    torchq.calibrate(model, minilm_hf.calibration_loader(), quiet=True)
    ptq = torchq.export(model, x, **options)
    ptq_cos = minilm_hf.cosine_to_float(ptq, float_model)
    log(f"minilm PTQ: cosine to float mean {ptq_cos[0]:.4f} min {ptq_cos[1]:.4f}")
    torchq.prepare_qat(model, torchq.QATConfig(), example_inputs=x)
    train = _sentence_batches(list(CALIBRATION) + recombined_sentences(CALIBRATION, 32 if quick else 480, seed=1), 8)
    heldout = _sentence_batches(recombined_sentences(CALIBRATION, 16 if quick else 48, seed=2), 8)
    report = distill(model, float_model, train, 2 if quick else 10_000, heldout=heldout, time_budget_s=budget_s, )
    qat = torchq.export(model, x, **options)
    qat_cos = minilm_hf.cosine_to_float(qat, float_model)
    log(f"minilm QAT: {report.steps} steps in {report.seconds:.0f} s, held-back {report.start:.4g} -> {report.best:.4g} (step {report.best_step}); cosine mean {qat_cos[0]:.4f} min {qat_cos[1]:.4f}")
    n_eval = len(minilm_hf.minilm.all_evaluation_sentences())
    return QatRow(
        "all-MiniLM-L6-v2 (transformers, padded to 64, warboy)", "mean / min cosine to float", f"{ptq_cos[0]:.4f} / {ptq_cos[1]:.4f}", f"{qat_cos[0]:.4f} / {qat_cos[1]:.4f}",
        report.steps, report.seconds, report.start, report.best, report.best_step,
        f"{len(train) * 8} fine-tuning sentences (batches of 8), {len(heldout) * 8} held back, {n_eval} evaluation sentences", {"history": report.history},
    )
