"""No method collapses: the ten calibration methods of the ONNX path on real models.

    python -m bench.robustness                  # OCR recognizer + classifier, MobileNetV3 -> docs/ROBUSTNESS.md
    python -m bench.robustness --models ocr_cls --out -
    python -m bench.robustness --table-models   # also every model of the accuracy table (bench.techniques)
    python -m bench.robustness --quick          # small sample counts (the tests)

Models:

  ocr_rec          PaddleOCR PP-OCRv4 text recognizer (CTC, 6625 classes), as paddle2onnx wrote
                   it, from the rapidocr-onnxruntime wheel (bench/ocr.py). Metric: exact match of
                   the INT8 model's greedy CTC decoding of whole text lines with the float
                   model's (spaces at the ends of a line ignored: the zero padding on the right
                   makes the model emit them), on rendered lines disjoint from the calibration
                   lines. The float model reads 97 % of the lines exactly right.
  ocr_cls          PaddleOCR mobile v2.0 orientation classifier (MobileNetV3-style: hard-swish,
                   squeeze-excitation, 35 BatchNorms as separate nodes, Constant-node weights).
                   Metric: agreement with float on each line upright and rotated 180 degrees.
  mobilenet_v3     torchvision mobilenet_v3_small (hard-swish, SE) with random weights and
                   BatchNorm statistics estimated on photo crops (bench/seed_models.randomized),
                   160x160 crops of scikit-learn's sample photos. SQNR only (random weights: no task).

Every method quantizes the same optimized float graph with ranges from the same statistics
(`optimize_model`, one `Calibrator.collect_data` pass, `compute_range` per method, `quantize`
with per-channel weights and target warboy). The acceptance of issue 18: each method's output
SQNR within 6 dB of min-max's of the same symmetry, and the task metric >= 90 % of float
wherever that min-max keeps >= 90 %.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from .common import DOCS, table

SQNR_MARGIN_DB = 6.0
METRIC_FLOOR = 90.0  # % of float


@dataclass
class Model:
    name: str
    description: str
    float_model: onnx.ModelProto
    calibration: list  # Calibrator samples
    feeds: dict[str, np.ndarray]  # evaluation inputs
    metric: str | None  # None: SQNR only
    agreement: Callable[[np.ndarray, np.ndarray], float] | None  # (float output, INT8 output) -> % of float
    samples: str  # sample counts, for the table
    evaluate: Callable[[onnx.ModelProto], float] | None = None  # a table model's own metric, of a model


@dataclass
class Result:
    name: str
    description: str
    samples: str
    metric: str | None
    graph: dict[str, int]
    rows: dict[str, tuple[float | None, float]] = field(default_factory=dict)  # method -> (metric, SQNR)
    seconds: float = 0.0


def _rec(n_calib: int, n_eval: int) -> Model:
    from . import ocr

    calib, evaluation = ocr.lines(n_calib, seed=0), ocr.lines(n_eval, seed=1)
    x = ocr.recognizer_inputs(calib)

    def agreement(ref: np.ndarray, out: np.ndarray) -> float:
        # whole lines, without the spaces the padding on the right makes the model emit at the ends
        return 100.0 * float(np.mean([a.strip() == b.strip() for a, b in zip(ocr.ctc_greedy(out), ocr.ctc_greedy(ref))]))

    return Model(
        "ocr_rec",
        "PaddleOCR PP-OCRv4 recognizer (rapidocr-onnxruntime 1.4.4), rendered text lines",
        ocr.load(ocr.REC_MODEL),
        [[x[i : i + 8]] for i in range(0, len(x), 8)],
        {"x": ocr.recognizer_inputs(evaluation)},
        "exact line match with float (%)",
        agreement,
        f"{n_calib} calibration lines, {n_eval} evaluation lines",
    )


def _cls(n_calib: int, n_eval: int) -> Model:
    from . import ocr

    x, _ = ocr.classifier_inputs(ocr.lines(n_calib // 2, seed=0))
    ev, _ = ocr.classifier_inputs(ocr.lines(n_eval // 2, seed=1))

    def agreement(ref: np.ndarray, out: np.ndarray) -> float:
        return 100.0 * float(np.mean(ref.argmax(1) == out.argmax(1)))

    return Model(
        "ocr_cls",
        "PaddleOCR mobile v2.0 orientation classifier (rapidocr-onnxruntime 1.4.4), crops upright and rotated",
        ocr.load(ocr.CLS_MODEL),
        [[x[i : i + 16]] for i in range(0, len(x), 16)],
        {"x": ev},
        "orientation agreement with float (%)",
        agreement,
        f"{n_calib} calibration crops, {n_eval} evaluation crops",
    )


def _mobilenet_v3(n_calib: int, n_eval: int) -> Model:
    import torch
    import torchvision

    from . import images
    from .seed_models import randomized
    from .techniques import export_float

    size = 160
    calib, evaluation = images.crops(n_calib, size, seed=0), images.crops(n_eval, size, seed=1)
    torch.manual_seed(0)
    model = randomized(torchvision.models.mobilenet_v3_small(), calib)
    return Model(
        "mobilenet_v3",
        "torchvision mobilenet_v3_small, random weights, BatchNorm statistics from photo crops",
        export_float(model, [evaluation.numpy()], ["image"]),
        [[calib[i : i + 4].numpy()] for i in range(0, n_calib, 4)],
        {"image": evaluation.numpy()},
        None,
        None,
        f"{n_calib} calibration crops, {n_eval} evaluation crops ({size}x{size})",
    )


def _table_model(name: str) -> Callable[[bool], Model]:
    def make(quick: bool) -> Model:
        from .techniques import subjects_for

        s = subjects_for([name])[0]()
        return Model(s.name, s.description, s.float_model, s.calibration, s.test_feeds, f"{s.metric}, % of float", None, "as in docs/ACCURACY_TABLE.md", s.evaluate)

    return make


OWN_MODELS: dict[str, Callable[[bool], Model]] = {
    "ocr_rec": lambda quick: _rec(8, 8) if quick else _rec(64, 400),
    "ocr_cls": lambda quick: _cls(16, 16) if quick else _cls(64, 400),
    "mobilenet_v3": lambda quick: _mobilenet_v3(8, 8) if quick else _mobilenet_v3(32, 64),
}


def graph_counts(original: onnx.ModelProto, optimized: onnx.ModelProto) -> dict[str, int]:
    """What graph optimization left: BatchNorms in and out, and Mul / Add / Sub / Div steps by a
    constant (BatchNorms exported as such, affine steps) beside the layers."""
    constants = {i.name for i in optimized.graph.initializer} | {o for n in optimized.graph.node if n.op_type == "Constant" for o in n.output}
    ops = Counter(n.op_type for n in optimized.graph.node)
    steps = sum(1 for n in optimized.graph.node if n.op_type in ("Mul", "Add", "Sub", "Div") and any(i in constants for i in n.input))
    return {
        "BatchNormalization in": sum(n.op_type == "BatchNormalization" for n in original.graph.node),
        "BatchNormalization out": ops.get("BatchNormalization", 0),
        "Conv": ops.get("Conv", 0),
        "constant Mul/Add/Sub/Div out": steps,
        "nodes out": sum(ops.values()),
    }


def measure(model: Model, methods: list[str], log=print) -> Result:
    from onnx_backend import Calibrator, optimize_model, quantize
    from onnx_backend.calibrator import CalibrationMethod
    from onnx_backend.qmath import sqnr_db

    from .common import run_batched, session

    t0 = time.perf_counter()
    optimized = optimize_model(model.float_model)
    result = Result(model.name, model.description, model.samples, model.metric, graph_counts(model.float_model, optimized))
    reference = run_batched(session(model.float_model), model.feeds, batch=32)[0]
    float_metric = model.evaluate(model.float_model) if model.evaluate is not None else None
    calibrator = Calibrator(optimized, "min_max_asym", quiet=True)
    calibrator.collect_data(model.calibration)
    for method in methods:
        calibrator.calibration_method = CalibrationMethod.parse(method)
        qmodel = quantize(optimized, calibrator.compute_range(), per_channel=True, target="warboy")
        out = run_batched(session(qmodel), model.feeds, batch=32)[0]
        if model.agreement is not None:
            metric = model.agreement(reference, out)
        elif model.evaluate is not None:
            metric = 100.0 * model.evaluate(qmodel) / float_metric
        else:
            metric = None
        result.rows[method] = (metric, sqnr_db(reference, out))
        log(f"  {model.name:24s} {method:16s} {'' if metric is None else f'{metric:6.2f} %'}  {result.rows[method][1]:6.2f} dB")
    result.seconds = time.perf_counter() - t0
    return result


def verdicts(result: Result) -> dict[str, str]:
    """Each method against min-max of its symmetry: 'ok', or what it misses."""
    out = {}
    for method, (metric, sqnr) in result.rows.items():
        symmetry = method.rsplit("_", 1)[1]
        base = result.rows.get(f"MIN_MAX_{symmetry}")
        if base is None:
            out[method] = "no min-max to compare"
            continue
        misses = []
        if sqnr < base[1] - SQNR_MARGIN_DB:
            misses.append(f"SQNR {sqnr - base[1]:+.1f} dB")
        if metric is not None and base[0] is not None and base[0] >= METRIC_FLOOR and metric < METRIC_FLOOR:
            misses.append(f"metric {metric:.1f} % < {METRIC_FLOOR:.0f} %")
        out[method] = "ok" if not misses else "MISSED: " + ", ".join(misses)
    return out


def render_models(results: list[Result], heading: str = "###") -> str:
    """One table per model: each method's metric and SQNR against min-max of its symmetry."""
    lines = [
        f"Acceptance (issue 18): output SQNR within {SQNR_MARGIN_DB:.0f} dB of min-max's of the same symmetry, "
        f"and the metric >= {METRIC_FLOOR:.0f} % of float wherever that min-max keeps >= {METRIC_FLOOR:.0f} %. "
        "Every method quantizes the same optimized graph from the same statistics (per-channel weights, target warboy); "
        "models and set-up: bench/robustness.py.",
        "",
    ]
    for r in results:
        v = verdicts(r)
        lines += [f"{heading} {r.name}", "", f"{r.description}; {r.samples}; {r.seconds:.0f} s.", ""]
        lines += ["Graph after `optimize_model`: " + ", ".join(f"{k} {n}" for k, n in r.graph.items()) + ".", ""]
        headers = ["method", r.metric or "metric", "output SQNR (dB)", "vs min-max (dB)", "verdict"]
        rows = []
        for method, (metric, sqnr) in r.rows.items():
            base = r.rows.get(f"MIN_MAX_{method.rsplit('_', 1)[1]}")
            rows.append([method.lower(), "—" if metric is None else f"{metric:.2f}", f"{sqnr:.2f}", "—" if base is None else f"{sqnr - base[1]:+.2f}", v[method]])
        lines += [table(headers, rows), ""]
    return "\n".join(lines)


def render(results: list[Result], command: str, minutes: float) -> str:
    header = [
        "# No method collapses: the ten calibration methods on real models",
        "",
        f"Generated by `{command}` in {minutes:.0f} minutes (a loaded, shared 2-core machine; times are indicative). "
        "docs/METHODS.md defines the methods.",
        "",
    ]
    return "\n".join(header) + "\n" + render_models(results, "##")


def run_section(settings, workdir, log=print) -> tuple[str, list[Result]]:
    """The `robustness` section of `python -m bench.run`: the OCR models and the hard-swish net."""
    from onnx_backend.calibrator import CalibrationMethod

    methods = [m.name for m in CalibrationMethod]
    results = []
    for name, make in OWN_MODELS.items():
        log(f"[robustness] {name}")
        results.append(measure(make(settings.quick), methods, log))
    return render_models(results), results


def main(argv: list[str] | None = None) -> int:
    from onnx_backend.calibrator import CalibrationMethod

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {', '.join(OWN_MODELS)}")
    parser.add_argument("--table-models", action="store_true", help="also every model of the accuracy table (bench.techniques)")
    parser.add_argument("--methods", nargs="+", default=[m.name for m in CalibrationMethod])
    parser.add_argument("--quick", action="store_true", help="small sample counts")
    parser.add_argument("--out", default=None, help="markdown file ('-': print only; default docs/ROBUSTNESS.md)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")
    import torch

    torch.set_num_threads(1)
    from .techniques import ALL_MODELS

    names = args.models or list(OWN_MODELS)
    if args.table_models:
        names += [n for n in ALL_MODELS if n not in names]
    command = "python -m bench.robustness " + " ".join(argv if argv is not None else sys.argv[1:])
    t0 = time.perf_counter()
    results = []
    for name in names:
        make = OWN_MODELS.get(name) or _table_model(name)
        results.append(measure(make(args.quick), [m.upper() for m in args.methods], lambda m: print(m, flush=True)))
    text = render(results, command.strip(), (time.perf_counter() - t0) / 60)
    if args.out == "-":
        print(text)
        return 0
    from onnx_backend.model_io import write_text_atomic

    out = args.out or str(DOCS / "ROBUSTNESS.md")
    write_text_atomic(out, text)
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
