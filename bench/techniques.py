"""The accuracy techniques, model by model: float vs INT8, plain calibration vs each technique.

    python -m bench.techniques                  # full table -> docs/ACCURACY_TABLE.md (~30 min on 2 cores)
    python -m bench.techniques --models mobilenet transformer_outliers
    python -m bench.techniques --quick          # a tiny untrained model, two variants (for the tests)

Every variant quantizes the same float ONNX export (torch.onnx, TorchScript exporter, dynamic
batch) with the same calibration samples (the first 256 training samples, batches of 32), target
warboy, asymmetric MSE ranges unless the variant says otherwise:

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

Accuracy is top-1 on the held-back test split; SQNR is the output SQNR (dB) against the float
model on that split. `--weights per-tensor` repeats the table with one weight scale per tensor.
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
    calibration: list[list[np.ndarray]]
    evaluate: Callable[[onnx.ModelProto], float]
    test_feeds: dict[str, np.ndarray]


@dataclass
class Cell:
    accuracy: float
    sqnr: float
    seconds: float


@dataclass
class Row:
    subject: str
    description: str
    float_accuracy: float
    cells: dict[str, Cell] = field(default_factory=dict)
    target: dict | None = None


def export_float(model: torch.nn.Module, inputs: list[np.ndarray], names: list[str]) -> onnx.ModelProto:
    import io

    buf = io.BytesIO()
    dyn = {n: {0: "batch"} for n in [*names, "logits"]}
    with torch.no_grad():
        torch.onnx.export(model.eval(), tuple(torch.from_numpy(a[:1]) for a in inputs), buf, dynamo=False, opset_version=17, input_names=names, output_names=["logits"], dynamic_axes=dyn)
    return onnx.load_from_string(buf.getvalue())


def technique_subject(name: str) -> Subject:
    from bench import technique_models as tm

    model = tm.load(name)
    inputs, _ = tm.test_inputs(name)
    names = tm.input_names(name)
    descriptions = {
        "mobilenet": "MobileNetV2-style, depthwise + ReLU6, 16x16 digits",
        "efficientnet": "EfficientNet-style, depthwise + SiLU + SE, 16x16 digits",
        "transformer": "transformer, padded to 16 tokens, additive mask -1e4",
        "transformer_outliers": "the same with 40x outlier channels after LayerNorm",
    }
    return Subject(name, descriptions[name], export_float(model, inputs, names), tm.calibration_samples(name), lambda m: tm.evaluate(name, m), dict(zip(names, inputs)))


def digits_cnn_subject() -> Subject:
    from torchq.examples import digits

    model = digits.load_trained(ROOT / "bench" / ".cache" / "techniques")
    x, _ = digits.test_set()
    calibration = [[xb.numpy()] for xb, _ in digits.calibration_loader()]
    return Subject("digits_cnn", "torchq.examples.digits CNN, 8x8 digits", export_float(model, [x], ["image"]), calibration, digits.evaluate, {"image": x})


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
        if n == "digits_cnn":
            out.append(digits_cnn_subject)
        elif n == "quick":
            out.append(quick_subject)
        else:
            out.append(lambda n=n: technique_subject(n))
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
    row = Row(subject.name, subject.description, subject.evaluate(subject.float_model))
    for variant in variants:
        t0 = time.perf_counter()
        qmodel = quantize_variant(subject, variant, per_channel)
        seconds = time.perf_counter() - t0
        assert_valid(qmodel)
        row.cells[variant] = Cell(subject.evaluate(qmodel), sqnr_db(ref, _outputs(qmodel, subject.test_feeds)), seconds)
        c = row.cells[variant]
        log(f"  {subject.name:22s} {variant:9s} {c.accuracy:6.2f} %  {c.sqnr:6.1f} dB  {c.seconds:6.1f} s")
    if target is not None:
        row.target = fallback(subject, row, per_channel, target, log)
    return row


FALLBACK_FROM = "masks"


def fallback(subject: Subject, row: Row, per_channel: bool, target: float, log=print) -> dict:
    """The accuracy-targeted fallback with no technique (attention masks handled)."""
    import torchq
    from torchq.techniques import quantize_onnx_to_target

    best = FALLBACK_FROM
    config = torchq.QuantConfig(per_channel=per_channel, target="warboy", **VARIANTS[best])
    t0 = time.perf_counter()
    qmodel, report = quantize_onnx_to_target(subject.float_model, subject.calibration, subject.evaluate, target=target, config=config)
    seconds = time.perf_counter() - t0
    log(f"  {subject.name:22s} target    {report.describe()}  {seconds:.0f} s")
    return {"from": best, "met": report.met, "accuracy": report.metric, "float_layers": report.float_layers, "evaluations": len(report.history), "seconds": seconds}


def best_variant(row: Row) -> str:
    return max(row.cells, key=lambda v: (row.cells[v].accuracy, row.cells[v].sqnr))


def render(rows: list[Row], variants: list[str], title: str) -> str:
    lines = [f"### {title}", "", "Accuracy (%) and, below it, output SQNR against float (dB).", ""]
    head = ["model", "float", *variants, "best", "best / float"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        best = best_variant(r)
        b = r.cells[best]
        cells = [f"{r.cells[v].accuracy:.2f}<br>{r.cells[v].sqnr:.1f} dB" if v in r.cells else "" for v in variants]
        lines.append(f"| {r.subject} | {r.float_accuracy:.2f} | " + " | ".join(cells) + f" | {best}: {b.accuracy:.2f} | {b.accuracy / r.float_accuracy * 100:.2f} % |")
    lines += ["", "Seconds to quantize (calibration and techniques included):", ""]
    lines += ["| model | " + " | ".join(variants) + " |", "|" + "---|" * (len(variants) + 1)]
    for r in rows:
        lines.append(f"| {r.subject} | " + " | ".join(f"{r.cells[v].seconds:.1f}" if v in r.cells else "" for v in variants) + " |")
    targets = [r for r in rows if r.target is not None]
    if targets:
        lines += ["", "Accuracy-targeted fallback (INT8 >= 99.5 % of float), with no technique (the `masks` settings):", ""]
        lines += ["| model | from | met | accuracy | % of float | layers kept in float | evaluations | seconds |", "|---|---|---|---|---|---|---|---|"]
        for r in targets:
            t = r.target
            keep = ", ".join(t["float_layers"]) or "none"
            lines.append(f"| {r.subject} | {t['from']} | {'yes' if t['met'] else 'no'} | {t['accuracy']:.2f} | {t['accuracy'] / r.float_accuracy * 100:.2f} % | {keep} | {t['evaluations']} | {t['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["digits_cnn", "mobilenet", "efficientnet", "transformer", "transformer_outliers"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--weights", nargs="+", default=["per-channel", "per-tensor"], choices=["per-channel", "per-tensor"])
    parser.add_argument("--target", type=float, default=0.995, help="fallback target as a share of float (0: skip)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "ACCURACY_TABLE.md"), help="markdown file to write ('-': print only)")
    parser.add_argument("--quick", action="store_true", help="a tiny untrained model, plain and eq, no fallback")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if args.quick:
        args.models, args.variants, args.weights, args.target = ["quick"], ["plain", "eq"], ["per-tensor"], 0
    command = "python -m bench.techniques " + " ".join(argv if argv is not None else sys.argv[1:])
    sections = []
    built = [make() for make in subjects_for(args.models)]
    for weights in args.weights:
        print(f"{weights} weights", flush=True)
        rows = [measure(s, args.variants, weights == "per-channel", args.target or None, lambda m: print(m, flush=True)) for s in built]
        sections.append(render(rows, args.variants, f"{weights} weights"))
    text = f"# Accuracy techniques, measured\n\nGenerated by `{command.strip()}` (see bench/techniques.py for what each column does).\n\n" + "\n".join(sections)
    if args.out == "-":
        print(text)
    else:
        from onnx_backend.model_io import write_text_atomic

        write_text_atomic(args.out, text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
