"""The accuracy techniques, model by model: float vs INT8, plain calibration vs each technique.

    python -m bench.techniques                       # per-channel weights, every model -> docs/ACCURACY_TABLE.md
    python -m bench.techniques --weights per-tensor  # the CNNs with one weight scale per tensor
                                                     #   -> docs/ACCURACY_TABLE_PER_TENSOR.md
    python -m bench.techniques --models mobilenet_16px padded_transformer_outliers --out -
    python -m bench.techniques --quick               # a tiny untrained model, two variants (for the tests)
    python -m bench.techniques --models seed_resnet50 seed_efficientnet_b0 --variants plain eq bc sq auto \
        --target 0 --out docs/ACCURACY_TABLE_SEED.md # the reference product's families, random weights: SQNR only

Models: the digits families of the accuracy benchmark (bench/digits.py, 32x32) and the
pretrained all-MiniLM-L6-v2 sentence encoder with padded batches (bench/minilm.py), exported
exactly as docs/BENCHMARKS.md exports them (dynamo, opset 18); the models trained to stress INT8
(bench/technique_models.py, 16x16 digits and padded token sequences) and torchq's own example
CNN (8x8), exported with the TorchScript exporter (opset 17). Every variant quantizes the same
float ONNX model with the same calibration samples, target warboy, asymmetric MSE ranges unless
the variant says otherwise:

  plain      onnx_backend.Calibrator + quantize: today's path, no technique
  masks      the technique pipeline with no technique: recalibration with attention masks left out
             (every column below includes this)
  eq         cross-layer equalization + high-bias absorption (pairs joined by ReLU6 left alone: exact)
  eq-relu    the same with ReLU6 -> ReLU where it joins a pair (AIMET's way; changes the function)
  bc         empirical bias correction
  adaround   AdaRound (500 iterations per layer)
  sq         SmoothQuant, alpha chosen per layer ("auto")
  auto       method auto: each tensor's range from the best of the ten methods for its readers
  all        auto + eq + sq + adaround + bc together
  best       the best of the above (by accuracy, then SQNR) -- chosen on the test split itself

Then the accuracy-targeted fallback (goal: 99.5 % of float) from the `masks` settings, i.e.
what it takes to reach the goal by keeping layers in float without any technique.

The metric is top-1 accuracy (%) on the held-back test split; for MiniLM it is the mean cosine
similarity of the INT8 embeddings to the float ones over the 96 evaluation sentences (issue 7
asks for >= 0.99), with the paraphrase retrieval accuracy of docs/BENCHMARKS.md beside it. SQNR
is the output SQNR (dB) against the float model on the same inputs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, dict] = {
    "plain": {},
    "masks": {"attention_masks": True},
    "eq": {"equalization": True},
    "eq-relu": {"equalization": True, "equalization_clip": "relu"},
    "bc": {"bias_correction": True},
    "adaround": {"adaround": True, "adaround_iterations": 500},
    "sq": {"smoothquant": "auto"},
    "auto": {"method": "auto"},
    "all": {"method": "auto", "equalization": True, "smoothquant": "auto", "adaround": True, "adaround_iterations": 500, "bias_correction": True},
}


@dataclass
class Subject:
    name: str
    description: str
    float_model: onnx.ModelProto
    calibration: list
    evaluate: Callable[[onnx.ModelProto], float]
    test_feeds: dict[str, np.ndarray]
    metric: str = "top-1 %"
    target: dict = field(default_factory=lambda: {"relative": 0.995})  # the fallback's goal
    extra: Callable[[onnx.ModelProto], str] | None = None  # a second number shown beside the metric


@dataclass
class Cell:
    accuracy: float
    sqnr: float
    seconds: float
    extra: str = ""


@dataclass
class Row:
    subject: str
    description: str
    float_accuracy: float
    metric: str = "top-1 %"
    cells: dict[str, Cell] = field(default_factory=dict)
    target: dict | None = None


def export_float(model: torch.nn.Module, inputs: list[np.ndarray], names: list[str]) -> onnx.ModelProto:
    import io

    buf = io.BytesIO()
    dyn = {n: {0: "batch"} for n in [*names, "logits"]}
    with torch.no_grad():
        torch.onnx.export(model.eval(), tuple(torch.from_numpy(a[:1]) for a in inputs), buf, dynamo=False, opset_version=17, input_names=names, output_names=["logits"], dynamic_axes=dyn)
    return onnx.load_from_string(buf.getvalue())


TECHNIQUE_MODELS = {
    "mobilenet_16px": ("mobilenet", "MobileNetV2-style, depthwise + ReLU6, 16x16 digits"),
    "efficientnet_16px": ("efficientnet", "EfficientNet-style, depthwise + SiLU + SE, 16x16 digits"),
    "padded_transformer": ("transformer", "transformer over digit patches, padded to 16 tokens, additive mask -1e4"),
    "padded_transformer_outliers": ("transformer_outliers", "the same with 40x outlier channels after LayerNorm"),
}
BENCH_DIGITS = ("cnn", "resnet", "mobilenet", "efficientnet", "vit")
CONV_MODELS = ["example_cnn", "mobilenet_16px", "efficientnet_16px"] + [f"digits_{n}" for n in BENCH_DIGITS if n != "vit"]
ALL_MODELS = ["example_cnn", *TECHNIQUE_MODELS, *(f"digits_{n}" for n in BENCH_DIGITS), "all-MiniLM-L6-v2"]


def technique_subject(name: str) -> Subject:
    from bench import technique_models as tm

    key, description = TECHNIQUE_MODELS[name]
    model = tm.load(key)
    inputs, _ = tm.test_inputs(key)
    names = tm.input_names(key)
    return Subject(name, description, export_float(model, inputs, names), tm.calibration_samples(key), lambda m: tm.evaluate(key, m), dict(zip(names, inputs)))


def _bench_export(subject, model) -> onnx.ModelProto:
    import tempfile

    from bench.subjects import export_float as bench_export_float

    with tempfile.TemporaryDirectory() as tmp:
        return bench_export_float(subject, model, Path(tmp) / "float.onnx")


def bench_digits_subject(name: str) -> Subject:
    from bench import digits
    from bench.accuracy import digits_subject
    from bench.common import Settings

    s = digits_subject(name, Settings())
    x, _ = digits.test_set()
    proto = _bench_export(s, s.build())
    return Subject(s.name, f"{s.family}, 32x32 digits (bench/digits.py)", proto, s.calibration_feeds(), digits.evaluate, {"image": x})


def minilm_subject() -> Subject:
    from bench import minilm
    from bench.accuracy import minilm_subject as bench_minilm
    from bench.common import Settings

    s = bench_minilm(Settings(), padded=True)
    proto = _bench_export(s, s.build())
    sentences = minilm.all_evaluation_sentences()
    reference = minilm.embed(proto, sentences)
    ids, mask = minilm.tokenize(sentences)

    def cosine(m) -> float:
        return minilm.cosine(minilm.embed(m, sentences), reference)[0]

    def retrieval(m) -> str:
        return f"retrieval {minilm.evaluate(m):.1f} %"

    return Subject(
        s.name,
        f"{s.family}, batches padded to {minilm.SEQ_LEN} tokens",
        proto,
        s.calibration_feeds(),
        cosine,
        {"input_ids": ids, "attention_mask": mask},
        metric="mean cosine to float",
        target={"absolute": 0.99},
        extra=retrieval,
    )


SEED_MODELS = {"seed_resnet50": "ResNet50 v1.5", "seed_efficientnet_b0": "EfficientNet-B0"}
NO_METRIC = "none: random weights (SQNR only)"


def seed_subject(name: str) -> Subject:
    """A reference-product family with random weights (bench/seed.py's set-up, 16 calibration
    crops, 4 evaluation crops): no task metric exists, so only the output SQNR is compared."""
    from bench import images
    from bench import seed_models as sm
    from bench.seed import FAMILIES

    family = SEED_MODELS[name]
    factory, size, _, _ = FAMILIES[family]
    calib, evals = images.crops(16, size, seed=0), images.crops(4, size, seed=1)
    torch.manual_seed(0)
    model = sm.randomized(factory(), calib)
    proto = export_float(model, [evals.numpy()], ["image"])
    return Subject(name, f"{family}, random weights, {size}x{size} photo crops (bench/seed.py)", proto, [[calib[i : i + 1].numpy()] for i in range(len(calib))], lambda m: 0.0, {"image": evals.numpy()}, metric=NO_METRIC)


def digits_cnn_subject() -> Subject:
    from torchq.examples import digits

    model = digits.load_trained(ROOT / "bench" / ".cache" / "techniques")
    x, _ = digits.test_set()
    calibration = [[xb.numpy()] for xb, _ in digits.calibration_loader()]
    return Subject("example_cnn", "torchq.examples.digits CNN, 8x8 digits", export_float(model, [x], ["image"]), calibration, digits.evaluate, {"image": x})


def quick_subject() -> Subject:
    from tests.technique_nets import ConvChain, images

    data = images(4)
    model = ConvChain(depthwise=True)
    g = np.random.default_rng(3)
    x = g.standard_normal((64, 3, 12, 12)).astype(np.float32)
    proto = export_float(model, [x], ["x"])
    from onnx_backend.techniques.graph import outputs_on

    labels = outputs_on(proto, [{"x": x}])[0][0].mean((2, 3)).argmax(1)

    def evaluate(m) -> float:
        return float((outputs_on(m, [{"x": x}])[0][0].mean((2, 3)).argmax(1) == labels).mean() * 100)

    return Subject("quick", "untrained conv chain (quick mode)", proto, data, evaluate, {"x": x})


def subjects_for(names: list[str]) -> list[Callable[[], Subject]]:
    out = []
    for n in names:
        if n == "example_cnn":
            out.append(digits_cnn_subject)
        elif n == "quick":
            out.append(quick_subject)
        elif n in TECHNIQUE_MODELS:
            out.append(lambda n=n: technique_subject(n))
        elif n.startswith("digits_") and n[len("digits_") :] in BENCH_DIGITS:
            out.append(lambda n=n: bench_digits_subject(n[len("digits_") :]))
        elif n in SEED_MODELS:
            out.append(lambda n=n: seed_subject(n))
        elif n == "all-MiniLM-L6-v2":
            out.append(minilm_subject)
        else:
            raise SystemExit(f"unknown model {n!r}; known: {', '.join([*ALL_MODELS, *SEED_MODELS])}")
    return out


def _outputs(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    from onnx_backend.techniques.graph import outputs_on

    return outputs_on(model, [feeds])[0][0]


def quantize_variant(subject: Subject, variant: str, per_channel: bool) -> onnx.ModelProto:
    import torchq
    from onnx_backend import Calibrator, optimize_model, quantize

    if variant == "plain":
        opt = optimize_model(subject.float_model)
        cal = Calibrator(opt, "mse_asym", quiet=True)
        cal.collect_data(subject.calibration)
        return quantize(opt, cal.compute_range(), per_channel=per_channel, target="warboy")
    config = torchq.QuantConfig(per_channel=per_channel, target="warboy", **VARIANTS[variant])
    qmodel, _ = torchq.quantize_onnx(subject.float_model, subject.calibration, config)
    return qmodel


def measure(subject: Subject, variants: list[str], per_channel: bool, target: float | None, log=print) -> Row:
    from onnx_backend import assert_valid
    from onnx_backend.qmath import sqnr_db

    ref = _outputs(subject.float_model, subject.test_feeds)
    row = Row(subject.name, subject.description, subject.evaluate(subject.float_model), subject.metric)
    for variant in variants:
        t0 = time.perf_counter()
        qmodel = quantize_variant(subject, variant, per_channel)
        seconds = time.perf_counter() - t0
        assert_valid(qmodel)
        row.cells[variant] = Cell(subject.evaluate(qmodel), sqnr_db(ref, _outputs(qmodel, subject.test_feeds)), seconds, subject.extra(qmodel) if subject.extra else "")
        c = row.cells[variant]
        log(f"  {subject.name:28s} {variant:9s} {_num(c.accuracy)}  {c.sqnr:6.1f} dB  {c.seconds:6.1f} s  {c.extra}")
    if target is not None and subject.metric != NO_METRIC:
        row.target = fallback(subject, row, per_channel, target, log)
    return row


def _num(v: float) -> str:
    """Accuracies as percentages, cosines with four decimals."""
    return f"{v:.4f}" if abs(v) <= 1.0 else f"{v:.2f}"


FALLBACK_FROM = "masks"


def fallback(subject: Subject, row: Row, per_channel: bool, target: float, log=print) -> dict:
    """The accuracy-targeted fallback with no technique (attention masks handled)."""
    import torchq
    from torchq.techniques import quantize_onnx_to_target

    best = FALLBACK_FROM
    config = torchq.QuantConfig(per_channel=per_channel, target="warboy", **VARIANTS[best])
    goal = {"target": target} if "relative" in subject.target else {"target": None, "absolute": subject.target["absolute"]}
    t0 = time.perf_counter()
    qmodel, report = quantize_onnx_to_target(subject.float_model, subject.calibration, subject.evaluate, config=config, **goal)
    seconds = time.perf_counter() - t0
    log(f"  {subject.name:28s} target    {report.describe()}  {seconds:.0f} s")
    return {"from": best, "goal": report.goal, "met": report.met, "accuracy": report.metric, "float_layers": report.float_layers, "evaluations": len(report.history), "seconds": seconds}


def best_variant(row: Row) -> str:
    return max(row.cells, key=lambda v: (row.cells[v].accuracy, row.cells[v].sqnr))


def render(rows: list[Row], variants: list[str], title: str) -> str:
    lines = [f"### {title}", "", "The metric (top-1 % unless the model says otherwise) and, below it, output SQNR against float (dB).", ""]
    head = ["model", "metric", "float", *variants, "best", "best / float"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = best_variant(r)
        b = r.cells[best]
        if r.metric == NO_METRIC:  # the SQNR is all there is
            cells = [f"{r.cells[v].sqnr:.1f} dB" if v in r.cells else "" for v in variants]
            lines.append(f"| {r.subject} | {r.metric} | n/a | " + " | ".join(cells) + f" | {best}: {b.sqnr:.1f} dB | n/a |")
            continue
        cells = [f"{_num(r.cells[v].accuracy)}<br>{r.cells[v].sqnr:.1f} dB" if v in r.cells else "" for v in variants]
        lines.append(f"| {r.subject} | {r.metric} | {_num(r.float_accuracy)} | " + " | ".join(cells) + f" | {best}: {_num(b.accuracy)} | {b.accuracy / r.float_accuracy * 100:.2f} % |")
    extras = [r for r in rows if any(c.extra for c in r.cells.values())]
    for r in extras:
        lines += ["", f"{r.subject}, beside the metric: " + "; ".join(f"{v} {c.extra}" for v, c in r.cells.items())]
    lines += ["", "Seconds to quantize (calibration and techniques included):", ""]
    lines += ["| model | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
    for r in rows:
        lines.append(f"| {r.subject} | " + " | ".join(f"{r.cells[v].seconds:.1f}" if v in r.cells else "" for v in variants) + " |")
    targets = [r for r in rows if r.target is not None]
    if targets:
        lines += ["", "Accuracy-targeted fallback with no technique (the `masks` settings): goal 99.5 % of float (MiniLM: cosine 0.99):", ""]
        lines += ["| model | goal | met | metric | % of float | layers kept in float | evaluations | seconds |", "|---|---|---|---|---|---|---|---|"]
        for r in targets:
            t = r.target
            keep = ", ".join(t["float_layers"]) or "none"
            lines.append(f"| {r.subject} | {_num(t['goal'])} | {'yes' if t['met'] else 'no'} | {_num(t['accuracy'])} | {t['accuracy'] / r.float_accuracy * 100:.2f} % | {len(t['float_layers'])}: {keep} | {t['evaluations']} | {t['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


IMAGENET_TABLE = ROOT / "docs" / "bench" / "imagenet.md"


def headline() -> str:
    """The headline rows: ImageNet EfficientNet-Lite0 / Lite1 with the ten methods and the
    techniques, as `python -m bench.imagenet` last measured them (a run of its own: half an hour)."""
    if not IMAGENET_TABLE.is_file():
        return ""
    body = IMAGENET_TABLE.read_text().split("\n", 1)[1].strip().replace("\n### ", "\n#### ")
    return "### Headline: ImageNet-pretrained EfficientNet-Lite (from docs/bench/imagenet.md)\n\n" + body + "\n\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: every model ({', '.join(ALL_MODELS)}); with --weights per-tensor, the CNNs")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--weights", default="per-channel", choices=["per-channel", "per-tensor"])
    parser.add_argument("--target", type=float, default=0.995, help="fallback target as a share of float (0: skip)")
    parser.add_argument("--out", default=None, help="markdown file to write ('-': print only; default docs/ACCURACY_TABLE[_PER_TENSOR].md)")
    parser.add_argument("--quick", action="store_true", help="a tiny untrained model, plain and eq, no fallback")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.quick:
        args.models, args.variants, args.weights, args.target = ["quick"], ["plain", "eq"], "per-tensor", 0
    per_tensor = args.weights == "per-tensor"
    models = args.models or (CONV_MODELS if per_tensor else ALL_MODELS)
    out = args.out or str(ROOT / "docs" / ("ACCURACY_TABLE_PER_TENSOR.md" if per_tensor else "ACCURACY_TABLE.md"))
    command = "python -m bench.techniques " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    rows = []
    for make in subjects_for(models):
        subject = make()
        rows.append(measure(subject, args.variants, not per_tensor, args.target or None, lambda m: print(m, flush=True)))
    minutes = (time.perf_counter() - t0) / 60
    text = (
        f"# Accuracy techniques, measured ({args.weights} weights)\n\nGenerated by `{command.strip()}` in {minutes:.0f} minutes "
        "(see bench/techniques.py for what each column does; docs/ACCURACY.md for the techniques).\n\n"
        + (headline() if not per_tensor and args.models is None else "")
        + render(rows, args.variants, f"{args.weights} weights")
    )
    args.out = out
    if args.out == "-":
        print(text)
    else:
        from onnx_backend.model_io import write_text_atomic

        write_text_atomic(args.out, text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
