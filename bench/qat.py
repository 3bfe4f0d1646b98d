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
import random
import time
from dataclasses import dataclass, field

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


def minilm(budget_s: float, quick: bool, log=print, lr: float | None = None, scale_lr: float | None = None) -> QatRow:
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
    report = distill(model, float_model, train, 2 if quick else 10_000, heldout=heldout, time_budget_s=budget_s, lr=lr, scale_lr=scale_lr)
    qat = torchq.export(model, x, **options)
    qat_cos = minilm_hf.cosine_to_float(qat, float_model)
    log(f"minilm QAT: {report.steps} steps in {report.seconds:.0f} s, held-back {report.start:.4g} -> {report.best:.4g} (step {report.best_step}); cosine mean {qat_cos[0]:.4f} min {qat_cos[1]:.4f}")
    n_eval = len(minilm_hf.minilm.all_evaluation_sentences())
    return QatRow(
        "all-MiniLM-L6-v2 (transformers, padded to 64, warboy)", "mean / min cosine to float", f"{ptq_cos[0]:.4f} / {ptq_cos[1]:.4f}", f"{qat_cos[0]:.4f} / {qat_cos[1]:.4f}",
        report.steps, report.seconds, report.start, report.best, report.best_step,
        f"{len(train) * 8} fine-tuning sentences (batches of 8), {len(heldout) * 8} held back, {n_eval} evaluation sentences", {"history": report.history},
    )


def lite0(budget_s: float, quick: bool, log=print, lr: float | None = None, scale_lr: float | None = None) -> QatRow:
    import torchq
    from torchq.qat import distill

    from . import efficientnet_lite as effnet
    from . import photos
    from .imagenet import Sizes, _ort_logits, _torch_logits, agreement

    torch.manual_seed(0)
    size = effnet.input_size("lite0")
    sizes = Sizes(8, 16, 4) if quick else Sizes(64, 500, 8)
    float_model = effnet.load("lite0").eval()
    model = effnet.load("lite0").eval()
    cal = photos.calibration_crops(sizes.calibration, size, effnet.PREPROCESS)
    crops = photos.evaluation_crops(sizes.evaluation, size, effnet.PREPROCESS).numpy()
    reference = _torch_logits(float_model, crops)
    options = dict(input_names=["image"], output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    torchq.prepare(model, torchq.QuantConfig())
    torchq.calibrate(model, [(cal[i : i + sizes.batch],) for i in range(0, len(cal), sizes.batch)], quiet=True)
    x = (cal[:1],)
    ptq = agreement(reference, _ort_logits(torchq.export(model, x, **options), crops))
    log(f"lite0 PTQ: top-1 agreement {ptq.top1:.1f} % ({ptq.samples} crops)")
    torchq.prepare_qat(model, torchq.QATConfig(), example_inputs=x)
    n_train = 16 if quick else 1024
    train_crops = photos.calibration_crops(n_train, size, effnet.PREPROCESS, seed=11)
    held = photos.calibration_crops(16 if quick else 64, size, effnet.PREPROCESS, seed=12)
    train = [(train_crops[i : i + sizes.batch],) for i in range(0, n_train, sizes.batch)]
    heldout = [(held[i : i + sizes.batch],) for i in range(0, len(held), sizes.batch)]
    report = distill(model, float_model, train, 2 if quick else 10_000, heldout=heldout, time_budget_s=budget_s, lr=lr, scale_lr=scale_lr)
    qat = agreement(reference, _ort_logits(torchq.export(model, x, **options), crops))
    log(f"lite0 QAT: {report.steps} steps in {report.seconds:.0f} s, held-back {report.start:.4g} -> {report.best:.4g} (step {report.best_step}); top-1 agreement {qat.top1:.1f} %")
    return QatRow(
        "EfficientNet-Lite0 (ImageNet weights, warboy)", "top-1 agreement with float %", f"{ptq.top1:.1f}", f"{qat.top1:.1f}",
        report.steps, report.seconds, report.start, report.best, report.best_step,
        f"{sizes.calibration} calibration crops, {n_train} fine-tuning crops (batches of {sizes.batch}, calibration photos), {len(held)} held back, {ptq.samples} evaluation crops (other photos)",
        {"history": report.history, "ptq_top5": ptq.top5, "qat_top5": qat.top5},
    )


MODELS = {"minilm": minilm, "lite0": lite0}


def render(rows: list[QatRow], command: str) -> str:
    from .common import table

    body = table(
        ["model", "metric", "PTQ (default)", "QAT", "fine-tuning steps", "seconds", "held-back distance start -> best (step)", "data"],
        [[r.model, r.metric, r.ptq, r.qat + (f" (lr {r.extra['lr']:g}, scale_lr {r.extra['scale_lr']:g})" if r.extra.get("lr") else ""), str(r.steps), f"{r.seconds:.0f}", f"{r.heldout_start:.4g} -> {r.heldout_best:.4g} ({r.best_step})", r.samples] for r in rows],
    )
    return (
        "# Quantization-aware fine-tuning\n\n"
        f"`{command}`. PTQ: the default QuantConfig (mse, per-channel, target warboy) through prepare -> calibrate -> export. "
        "QAT: the same calibrated model through `torchq.prepare_qat` and `torchq.qat.distill` (MSE to the float outputs, "
        "Adam; lr 1e-5 for weights and 1e-3 for log-scales, the QATConfig defaults, unless the row says otherwise; LSQ gradients), the best state on the held-back batches kept, "
        "then `torchq.export`; both INT8 models run in onnxruntime. Fine-tuning time is wall time on this machine, "
        "shared with other jobs while measured.\n\n" + body + "\n"
    )


def run_section(settings, workdir, log) -> tuple[str, list[QatRow]]:
    """The `qat` section of bench.run: both models (--quick: two steps each on tiny data)."""
    torch.set_num_threads(1)
    rows = [fn(DEFAULT_BUDGET_S, settings.quick, log) for fn in MODELS.values()]
    return render(rows, "python -m bench.run" + (" --quick" if settings.quick else " --only qat")), rows


def main(argv: list[str] | None = None) -> int:
    import json
    from pathlib import Path

    from onnx_backend.model_io import write_text_atomic

    from .common import DOCS

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS))
    ap.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="fine-tuning seconds per model")
    ap.add_argument("--lr", type=float, default=None, help="weights' learning rate (default QATConfig's)")
    ap.add_argument("--scale-lr", type=float, default=None, help="log-scales' learning rate (default QATConfig's)")
    ap.add_argument("--out", default=None, help="markdown file ('-': print only; default docs/bench/qat.md)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)  # the machine is shared: more threads than free cores only adds waiting
    cache = Path("out/bench/qat")
    cache.mkdir(parents=True, exist_ok=True)
    for name in args.only:
        row = MODELS[name](args.budget, args.quick, lr=args.lr, scale_lr=args.scale_lr)
        row.extra["lr"], row.extra["scale_lr"] = args.lr, args.scale_lr
        (cache / f"{name}{'-quick' if args.quick else ''}.json").write_text(json.dumps(vars(row), indent=1))
    rows = [QatRow(**json.loads((cache / f"{n}{'-quick' if args.quick else ''}.json").read_text())) for n in MODELS if (cache / f"{n}{'-quick' if args.quick else ''}.json").is_file()]
    lrs = "".join(f" --{k} {v:g}" for k, v in (("lr", args.lr), ("scale-lr", args.scale_lr)) if v is not None)
    text = render(rows, "python -m bench.qat" + (" --quick" if args.quick else "") + f" --budget {args.budget:g}" + lrs + " --only " + " ".join(args.only))
    print(text)
    out = args.out if args.out is not None else ("-" if args.quick else str(DOCS / "bench" / "qat.md"))
    if out != "-":
        write_text_atomic(Path(out), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
